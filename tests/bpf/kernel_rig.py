"""Shared by test_xdp_filter.py and test_kernel_metrics.py: sluicegate with a `kernel:` block
in the gateway namespace of a client — gateway — server rig (tests/net), pins on the test's
own bpffs, and the check that none of these programs reached the root namespace."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from net.rig import PYTHON, Rig
from sluicegate.bpf import libbpf
from sluicegate.bpf.kernel import program_pins

METRICS_URL = "http://127.0.0.1:9091/metrics"
XDP_READY = "XDP filter attached"
FLOWS_READY = "kernel flow metrics attached"
SERVING = "serving"
PROMETHEUS = {"name": "prometheus", "config": {"metrics": True}}


def our_programs_in_root_namespace() -> list[str]:
    """XDP or tcx programs of the `kernel:` block on an interface of this (root) namespace;
    there must never be any."""
    ours = set(program_pins())
    found = []
    shown = subprocess.run(["ip", "-j", "-d", "link", "show"], capture_output=True,
                           text=True, check=True).stdout
    for link in json.loads(shown or "[]"):
        prog = (link.get("xdp") or {}).get("prog") or {}
        if prog.get("id") and libbpf.program_name(prog["id"]) in ours:
            found.append(f"XDP program {prog['id']} on {link['ifname']}")
    for index, name in socket.if_nameindex():
        for attach in (libbpf.BPF_TCX_INGRESS, libbpf.BPF_TCX_EGRESS):
            for prog_id in libbpf.attached_programs(index, attach):
                if libbpf.program_name(prog_id) in ours:
                    found.append(f"program {prog_id} on tcx of {name}")
    return found


@pytest.fixture(name="kernel_bpffs")
def kernel_bpffs_fixture(bpffs: Path) -> Iterator[Path]:
    """The `bpffs` fixture (net/bpffs.py), plus: nothing of ours on a root interface."""
    yield bpffs
    leaked = our_programs_in_root_namespace()
    assert not leaked, f"kernel programs of sluicegate in the root namespace: {leaked}"


def start_gateway(rig: Rig, config: dict[str, Any], name: str = "gateway", *extra: str,
                  ready: tuple[str, ...] = (XDP_READY, SERVING)) -> subprocess.Popen[str]:
    """`sluicegate run` in the gateway namespace; returns once every `ready` line is in
    its log (the log is `<workdir>/<name>.log`)."""
    path = rig.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = rig.workdir / f"{name}.log"
    with log_path.open("w") as log:
        process = rig.gateway.popen([PYTHON, "-m", "sluicegate", "run", "-c", str(path),
                                     *extra], stdout=log, stderr=subprocess.STDOUT)
    rig.processes.append(process)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log_path.read_text()
        if all(line in text for line in ready):
            return process
        if process.poll() is not None:
            raise AssertionError(f"gateway exited {process.returncode}: {text}")
        time.sleep(0.05)
    raise AssertionError(f"gateway not ready: {log_path.read_text()}")


def run_gateway(rig: Rig, config: dict[str, Any], name: str = "once"
                ) -> subprocess.CompletedProcess[str]:
    """`sluicegate run` expected to exit by itself (a refused start)."""
    path = rig.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return rig.gateway.run([PYTHON, "-m", "sluicegate", "run", "-c", str(path)],
                           check=False, timeout=60)


def add_second_client_address(rig: Rig) -> tuple[str, str]:
    """Another address on the client host (v4, v6): a second source that is not denied or
    limited. Same /24 and /64, so the gateway routes it back."""
    v4 = rig.client_v4.rsplit(".", 1)[0] + ".3"
    v6 = rig.client_v6.rsplit(":", 1)[0] + ":3"
    rig.client.run(["ip", "addr", "add", f"{v4}/24", "dev", rig.client_if])
    rig.client.run(["ip", "-6", "addr", "add", f"{v6}/64", "dev", rig.client_if, "nodad"])
    return v4, v6


CLOSED_PORT_ROUND_TRIP = """
import socket, sys
source, target = sys.argv[1], sys.argv[2]
sock = socket.socket(socket.AF_INET6 if ":" in target else socket.AF_INET)
sock.settimeout(5)
sock.bind((source, 0))
try:
    sock.connect((target, 9))
except ConnectionRefusedError:
    pass
"""


def warm_neighbours(rig: Rig, *sources: str) -> None:
    """Resolve every neighbour on the client → server path from each client source, before
    a filter runs: a denied address's IPv6 neighbour solicitations are dropped like the rest
    of its packets, and must not hold up another address's first packets."""
    for source in sources:
        target = rig.server_v6 if ":" in source else rig.server_v4
        # A connection to a closed port: the server's RST proves the round trip.
        rig.client.python(CLOSED_PORT_ROUND_TRIP, source, target)


def curl(rig: Rig, url: str, source: str | None = None, seconds: int = 5
         ) -> subprocess.CompletedProcess[str]:
    """curl in the client namespace (from `source` when given); never raises."""
    argv = ["curl", "-s", "-m", str(seconds), "-o", "-", "-w", "\n%{http_code}"]
    if source is not None:
        argv += ["--interface", source]
    return rig.client.run([*argv, url], check=False, timeout=seconds + 10)


def answered(result: subprocess.CompletedProcess[str]) -> tuple[int, str]:
    """(HTTP status, body) of a `curl` result; (0, "") when nothing answered."""
    if result.returncode != 0:
        return 0, ""
    body, _, code = result.stdout.rpartition("\n")
    return int(code), body.strip()


def url(host: str, port: int = 80) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def metrics(rig: Rig) -> str:
    return rig.gateway.run(["curl", "-s", "-m", "5", METRICS_URL]).stdout


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` (with its _total suffix)."""
    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found.append((dict(sample.labels), sample.value))
    return found


def sample(text: str, name: str, **labels: str) -> float | None:
    matching = [value for found, value in samples(text, name)
                if all(found.get(key) == value_ for key, value_ in labels.items())]
    return sum(matching) if matching else None


def bpf_status(rig: Rig) -> dict[str, Any]:
    result = rig.gateway.run([PYTHON, "-m", "sluicegate", "bpf", "status"])
    return json.loads(result.stdout)


def pinned_names(status: dict[str, Any]) -> set[str]:
    return {Path(item["pin"]).name for item in status["pinned"]}


def xdp_count(status: dict[str, Any], interface: str, reason: str) -> int:
    rows = status.get("kernel", {}).get("xdp", [])
    return sum(row["packets"] for row in rows
               if row["interface"] == interface and row["reason"] == reason)


def programs_on(rig: Rig, ifname: str) -> dict[str, Any]:
    """What runs on a gateway interface: the XDP program and the tcx programs by name."""
    code = f"""
import json, socket
from sluicegate.bpf import libbpf
index = socket.if_nametoindex({ifname!r})
names = lambda ids: sorted(libbpf.program_name(i) for i in ids)
print(json.dumps({{"ingress": names(libbpf.attached_programs(index, libbpf.BPF_TCX_INGRESS)),
                  "egress": names(libbpf.attached_programs(index, libbpf.BPF_TCX_EGRESS))}}))
"""
    shown = json.loads(rig.gateway.python(code).stdout)
    links = json.loads(rig.gateway.run(["ip", "-j", "-d", "link", "show", "dev",
                                        ifname]).stdout)
    xdp = links[0].get("xdp") or {}
    prog = xdp.get("prog") or {}
    shown["xdp"] = prog.get("name", "") if prog else ""
    shown["xdp_mode"] = {1: "native", 2: "generic"}.get(xdp.get("mode"), "") if xdp else ""
    return shown


def wait_for(condition: Any, what: str, timeout: float = 15.0) -> Any:
    """Poll `condition()` until it returns something true; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.1)


def is_root() -> bool:
    return os.geteuid() == 0
