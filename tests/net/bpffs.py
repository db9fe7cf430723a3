"""A bpffs for one test, and the check that no BPF link of ours reached the root namespace.

`ip netns exec` gives each command a private mount namespace with /sys remounted, so pins
under /sys/fs/bpf would vanish with each process (KERNEL.md). The test mounts a bpffs on a
folder of its own tmp_path instead (outside /sys: every `ip netns exec` child sees it),
points SLUICEGATE_BPFFS at it for the processes it starts, and unmounts it afterwards,
which drops whatever is still pinned there.

Tests outside tests/net import the fixture: `from net.bpffs import bpffs_fixture`.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluicegate.bpf import libbpf
from sluicegate.intercept.ebpf import BPFFS_ENV, PROGRAMS


def our_links_in_root_namespace() -> list[str]:
    """sluicegate programs attached to this (root) namespace (sk_lookup) or to the tcx
    ingress of one of its interfaces; there must never be any."""
    root = os.stat("/proc/self/ns/net").st_ino
    found = []
    for fd, link in libbpf.links():
        os.close(fd)
        if link.get("program") in PROGRAMS and link.get("netns_ino") == root:
            found.append(f"{link['type']} link {link['id']} ({link['program']})")
    for index, name in socket.if_nameindex():
        for prog_id in libbpf.attached_programs(index, libbpf.BPF_TCX_INGRESS):
            if libbpf.program_name(prog_id) in PROGRAMS:
                found.append(f"program {prog_id} on tcx ingress of {name}")
    return found


@pytest.fixture(name="bpffs")
def bpffs_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The pin folder (`<tmp>/bpffs/sluicegate`) on a bpffs mounted for this test; set in
    SLUICEGATE_BPFFS for every process the test starts."""
    mount = tmp_path / "bpffs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mount)], check=True,
                   capture_output=True)
    folder = mount / "sluicegate"
    monkeypatch.setenv(BPFFS_ENV, str(folder))
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
    leaked = our_links_in_root_namespace()
    assert not leaked, f"BPF links of sluicegate in the root network namespace: {leaked}"
