"""100,000 intercepted prefixes, end to end on a real kernel, in both modes: the gateway
accepts the spec, installs it (one nftables set lookup / the LPM tries), and steers a
connection to an address matched by the last prefix while an address outside every prefix
is reached directly. Client — gateway — server rig of tests/net; nginx in the server
namespace answers `server=<address it was reached at> remote=<address it saw>`, so the
body tells whether the gateway (its server-side address) or the client made the
connection."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from net.bpffs import bpffs_fixture  # noqa: F401  (the `bpffs` fixture)
from net.conftest import rig_fixture  # noqa: F401  (the `rig` fixture)
from net.rig import PYTHON, Rig

PREFIXES = 100_000
STARTUP_TIMEOUT = 60.0  # parsing and installing 100k prefixes takes seconds, not minutes


def many_prefixes(last: str, count: int = PREFIXES) -> list[str]:
    """`count` distinct, non-overlapping prefixes: count-1 /24s spread below 10.200.0.0
    (the rig's addresses are in 10.200.0.0/16), then `last` as a /32, which is also the
    highest address: the prefix that matches comes last in the config and in the set."""
    bottom = int(ipaddress.IPv4Address("1.0.0.0")) >> 8
    top = int(ipaddress.IPv4Address("10.200.0.0")) >> 8
    stride = (top - bottom) // (count - 1)
    assert stride >= 2, "prefixes would touch and be merged into fewer"
    spread = [str(ipaddress.IPv4Network(((bottom + i * stride) << 8, 24)))
              for i in range(count - 1)]
    return [*spread, f"{last}/32"]


def outside_address(rig: Rig) -> str:
    """A second address of the server, next to the captured one and in no prefix."""
    return str(ipaddress.IPv4Address(rig.server_v4) + 1)


def ebpf_unsupported() -> str | None:
    try:
        from sluicegate.bpf import libbpf

        libbpf.library()
    except Exception as error:  # libbpf1 missing or unloadable
        return f"libbpf is not usable here: {error}"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "this kernel has no BTF (/sys/kernel/btf/vmlinux): CO-RE programs cannot load"
    return None


def start_gateway(rig: Rig, mode: str, destinations: list[str]) -> subprocess.Popen[str]:
    config = {
        "gateway": {"listen": ["127.0.0.1:9080"], "metrics_listen": "127.0.0.1:9091",
                    "workers": 1, "drain_timeout": 1},
        "plugins": [{"name": "tproxy", "config": {
            "listen": "0.0.0.0:80", "tproxy": True, "mode": mode, "handle": "http",
            "destinations": destinations}}]}
    path = rig.workdir / "gateway.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML, and much faster to write at 100k
    log_path = rig.workdir / "gateway.log"
    with log_path.open("w") as log:
        process = rig.gateway.popen([PYTHON, "-m", "sluicegate", "run", "-c", str(path)],
                                    stdout=log, stderr=subprocess.STDOUT)
    rig.processes.append(process)
    installed = f"interception installed ({mode})"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while installed not in log_path.read_text():
        if process.poll() is not None:
            raise AssertionError(f"gateway exited {process.returncode}: "
                                 f"{log_path.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"interception not installed within {STARTUP_TIMEOUT:g}s:"
                                 f" {log_path.read_text()[-2000:]}")
        time.sleep(0.1)
    return process


def get(rig: Rig, address: str) -> tuple[int, str]:
    result = rig.client.run(["curl", "-s", "-m", "5", "-w", "\n%{http_code}",
                             f"http://{address}/"])
    body, _, code = result.stdout.rpartition("\n")
    return int(code), body.strip()


@pytest.mark.parametrize("mode", ["tproxy", "ebpf"])
def test_100k_prefixes_steer_the_last_prefix_and_nothing_outside(
        rig: Rig, tmp_path: Path, request: Any, mode: str) -> None:
    if mode == "ebpf":
        reason = ebpf_unsupported()
        if reason is not None:
            pytest.skip(reason)
        request.getfixturevalue("bpffs")
    outside = outside_address(rig)
    rig.server.run(["ip", "addr", "add", f"{outside}/24", "dev", rig.server_if])
    rig.start_nginx(80)
    destinations = many_prefixes(rig.server_v4)
    start_gateway(rig, mode, destinations)

    # Matched by the last prefix: the server sees the gateway's address, not the client's.
    assert get(rig, rig.server_v4) == (
        200, f"server={rig.server_v4} remote={rig.gateway_server_v4}")
    # In no prefix: forwarded untouched, the server sees the client itself.
    assert get(rig, outside) == (200, f"server={outside} remote={rig.client_v4}")
    # The log says what was installed without listing 100k prefixes in one line.
    logged = (rig.workdir / "gateway.log").read_text()
    line = next(line for line in logged.splitlines() if "interception installed" in line)
    assert len(line) < 2000 and "more" in line, line[:300]
    if mode == "tproxy":
        # One rule with a set, not 100k rules.
        listing = rig.gateway.run(["nft", "-j", "list", "table", "inet", "sluicegate"],
                                  timeout=30).stdout
        rules = [item["rule"] for item in json.loads(listing)["nftables"] if "rule" in item]
        assert len(rules) < 10


def test_ebpf_mode_refuses_more_prefixes_than_its_tries_hold_naming_the_option(
        rig: Rig, bpffs: Path) -> None:
    from sluicegate.intercept.ebpf import MAX_PREFIXES

    reason = ebpf_unsupported()
    if reason is not None:
        pytest.skip(reason)
    # Every other address of 1.0.0.0/8 as a /32: nothing merges.
    base = int(ipaddress.IPv4Address("1.0.0.0"))
    too_many = [str(ipaddress.IPv4Address(base + 2 * i)) for i in range(MAX_PREFIXES + 1)]
    with pytest.raises(AssertionError) as failed:
        start_gateway(rig, "ebpf", too_many)
    assert (f"destinations: {MAX_PREFIXES + 1} IPv4 prefixes (after merging); eBPF mode "
            f"holds at most {MAX_PREFIXES} per family") in str(failed.value)


def test_validate_accepts_100k_prefixes_and_merges_them_as_written(tmp_path: Path) -> None:
    from sluicegate.intercept.spec import InterceptSpec

    destinations = many_prefixes("10.200.1.2")
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps({"plugins": [{"name": "tproxy", "config": {
        "listen": "0.0.0.0:80", "destinations": destinations}}]}))
    result = subprocess.run([PYTHON, "-m", "sluicegate", "validate", str(path)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout
    # Distinct, non-touching prefixes stay as they are; touching and nested ones merge.
    spec = InterceptSpec.from_options(80, destinations=destinations)
    assert [str(n) for n in spec.destinations] == destinations
    merged = InterceptSpec.from_options(80, destinations=[
        "10.0.0.0/25", "10.0.0.128/25", "10.0.1.0/24", "10.0.1.7", "192.0.2.1/24",
        "fd00::/65", "fd00:0:0:0:8000::/65"])
    assert [str(n) for n in merged.destinations] == [
        "10.0.0.0/23", "192.0.2.0/24", "fd00::/64"]
