"""The `kernel.xdp` filter end to end: sluicegate attaches `sg_xdp_filter` to the gateway's
client-facing veth of a client — gateway — server rig (tests/net); clients in the client
namespace talk to nginx (or a UDP sink) in the server namespace, routed by the gateway.
Denied and rate-limited packets are dropped before the gateway's network stack."""

from __future__ import annotations

import json
import signal
import textwrap
from typing import Any

import pytest

from bpf.kernel_rig import (
    PROMETHEUS,
    SERVING,
    add_second_client_address,
    answered,
    bpf_status,
    curl,
    is_root,
    kernel_bpffs_fixture,  # noqa: F401  (the `kernel_bpffs` fixture)
    metrics,
    pinned_names,
    programs_on,
    run_gateway,
    sample,
    start_gateway,
    url,
    wait_for,
    warm_neighbours,
    xdp_count,
)
from net.bpffs import bpffs_fixture  # noqa: F401  (the `bpffs` fixture)
from net.conftest import rig_fixture  # noqa: F401  (the `rig` fixture)
from net.rig import PYTHON, Rig, stop

root_only = pytest.mark.skipif(not is_root(), reason="XDP needs root")


def kernel(rig: Rig, **xdp: Any) -> dict[str, Any]:
    """A config with an XDP filter on the gateway's client-facing interface."""
    return {"kernel": {"xdp": {"interfaces": [rig.gateway_client_if], **xdp}},
            "plugins": [PROMETHEUS]}


def nginx_clients(rig: Rig) -> set[str]:
    """The client addresses nginx logged (first field of each access-log line)."""
    log = rig.workdir / f"nginx-{rig.server.name}" / "access.log"
    return {line.split(" ", 1)[0] for line in log.read_text().splitlines() if line}


# -- deny lists ----------------------------------------------------------------------------

@root_only
@pytest.mark.parametrize("mode", ["native", "generic"])
def test_xdp_denied_client_gets_no_answer_while_others_do(rig, kernel_bpffs, mode):
    rig.start_nginx(80)
    other_v4, other_v6 = add_second_client_address(rig)
    warm_neighbours(rig, rig.client_v4, rig.client_v6, other_v4, other_v6)
    start_gateway(rig, kernel(rig, mode=mode,
                              deny=[f"{rig.client_v4}/32", f"{rig.client_v6}/128"]))
    assert programs_on(rig, rig.gateway_client_if)["xdp_mode"] == mode
    for denied, allowed, server in ((rig.client_v4, other_v4, rig.server_v4),
                                    (rig.client_v6, other_v6, rig.server_v6)):
        assert answered(curl(rig, url(server), source=denied, seconds=2)) == (0, "")
        status, body = answered(curl(rig, url(server), source=allowed))
        assert (status, body) == (200, f"server={server} remote={allowed}")
    # Dropped before the gateway's stack: nginx never saw the denied addresses.
    assert nginx_clients(rig) == {other_v4, other_v6}
    status = bpf_status(rig)
    assert status["kernel"]["xdp_modes"] == {rig.gateway_client_if: mode}
    assert xdp_count(status, rig.gateway_client_if, "denied") >= 2
    assert xdp_count(status, rig.gateway_client_if, "passed") > 0
    rules = {row["rule"]: row["packets"] for row in status["kernel"]["xdp_rules"]}
    assert rules[f"{rig.client_v4}/32"] >= 1 and rules[f"{rig.client_v6}/128"] >= 1
    text = metrics(rig)
    assert sample(text, "sluicegate_kernel_xdp_dropped_packets_total",
                  interface=rig.gateway_client_if, reason="denied") >= 2
    assert sample(text, "sluicegate_kernel_xdp_rule_dropped_packets_total",
                  rule=f"{rig.client_v4}/32") >= 1


@root_only
def test_xdp_deny_prefix_covers_every_address_inside_it(rig, kernel_bpffs):
    rig.start_nginx(80)
    other_v4, _ = add_second_client_address(rig)
    prefix = rig.client_v4.rsplit(".", 1)[0] + ".0/24"  # both client addresses
    start_gateway(rig, kernel(rig, deny=[prefix]))
    for source in (rig.client_v4, other_v4):
        assert answered(curl(rig, url(rig.server_v4), source=source, seconds=2)) == (0, "")
    # IPv6 is not in the list: it still flows.
    status, _ = answered(curl(rig, url(rig.server_v6)))
    assert status == 200


# -- rate limits ---------------------------------------------------------------------------

# Runs in the server namespace: counts UDP datagrams per source; answers "report" (from
# the server namespace itself) with the counts as JSON.
UDP_SINK = textwrap.dedent("""
    import json, socket, sys
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind(("0.0.0.0", int(sys.argv[1])))
    counts = {}
    while True:
        data, peer = sock.recvfrom(2048)
        if data == b"report":
            sock.sendto(json.dumps(counts).encode(), peer)
        else:
            counts[peer[0]] = counts.get(peer[0], 0) + 1
""")

REPORT = textwrap.dedent("""
    import socket, sys
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.sendto(b"report", ("127.0.0.1", int(sys.argv[1])))
    print(sock.recv(65535).decode())
""")

# Runs in the client namespace: COUNT datagrams from SOURCE as fast as Python sends them.
FLOOD = textwrap.dedent("""
    import json, socket, sys, time
    source, target, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sent, start = 0, time.monotonic()
    for _ in range(count):
        try:
            sock.sendto(b"x" * 64, (target, port))
            sent += 1
        except OSError:
            pass
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - start}))
""")

SINK_PORT = 9999


def udp_counts(rig: Rig) -> dict[str, int]:
    return json.loads(rig.server.python(REPORT, str(SINK_PORT)).stdout)


def flood(rig: Rig, source: str, count: int) -> dict[str, Any]:
    return json.loads(rig.client.python(FLOOD, source, rig.server_v4, str(SINK_PORT),
                                        str(count), timeout=60).stdout)


@root_only
def test_xdp_rate_limit_cuts_a_flood_from_one_source_and_spares_another(rig, kernel_bpffs):
    rate, burst = 100, 50
    sink = rig.start_in(rig.server, [PYTHON, "-c", UDP_SINK, str(SINK_PORT)])
    rig.server.wait_listening(SINK_PORT, "udp", process=sink)
    other_v4, _ = add_second_client_address(rig)
    start_gateway(rig, kernel(rig, rate_limit={"rate": rate, "burst": burst}))
    # One datagram first, so neighbour resolution is done before the flood.
    flood(rig, other_v4, 1)
    wait_for(lambda: udp_counts(rig).get(other_v4) == 1, "the first datagram arrives")
    flooded = flood(rig, rig.client_v4, 3000)
    calm = flood(rig, other_v4, 40)
    assert calm["sent"] == 40
    # The other source's datagrams all arrive (41 in all: within its own burst); they were
    # sent after the flood on the same path, so the flood's count is final then.
    counts = wait_for(lambda: (c := udp_counts(rig)).get(other_v4) == 41 and c,
                      "the other source's datagrams arrive")
    through = counts.get(rig.client_v4, 0)
    # The burst passes, then `rate` a second for as long as the flood lasted (plus a
    # second of slack for scheduling): far below the 3000 sent.
    assert burst <= through <= burst + rate * (flooded["seconds"] + 1), (through, flooded)
    status = bpf_status(rig)
    assert xdp_count(status, rig.gateway_client_if, "rate_limited") >= 1000
    sources = {row["source"]: row["dropped"] for row in status["kernel"]["xdp_sources"]}
    assert sources.get(rig.client_v4, 0) >= 1000 and other_v4 not in sources
    assert sample(metrics(rig), "sluicegate_kernel_xdp_dropped_packets_total",
                  interface=rig.gateway_client_if, reason="rate_limited") >= 1000


@root_only
def test_xdp_exempt_sources_skip_the_rate_limits_but_not_the_deny_list(rig, kernel_bpffs):
    sink = rig.start_in(rig.server, [PYTHON, "-c", UDP_SINK, str(SINK_PORT)])
    rig.server.wait_listening(SINK_PORT, "udp", process=sink)
    other_v4, _ = add_second_client_address(rig)
    prefix = rig.client_v4.rsplit(".", 1)[0] + ".0/24"  # both client addresses
    start_gateway(rig, kernel(rig, rate_limit={"rate": 100, "burst": 50}, exempt=[prefix],
                              deny=[f"{other_v4}/32"]))
    flooded = flood(rig, rig.client_v4, 3000)
    flood(rig, other_v4, 10)
    status = bpf_status(rig)
    assert xdp_count(status, rig.gateway_client_if, "rate_limited") == 0
    assert xdp_count(status, rig.gateway_client_if, "passed") >= flooded["sent"]
    assert xdp_count(status, rig.gateway_client_if, "denied") == 10


# Runs in the client namespace: COUNT connection attempts at once from SOURCE; reports how
# many were established within half a second (before any SYN is retransmitted, at 1 s).
SYN_BURST = textwrap.dedent("""
    import json, select, socket, sys, time
    source, target, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    start = time.monotonic()
    pending = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        try:
            sock.connect((target, port))
        except BlockingIOError:
            pass
        pending.append(sock)
    connected, deadline = 0, start + 0.5
    while pending and time.monotonic() < deadline:
        _, ready, _ = select.select([], pending, [], max(0.0, deadline - time.monotonic()))
        for sock in ready:
            pending.remove(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                connected += 1
    print(json.dumps({"connected": connected, "seconds": time.monotonic() - start}))
""")


@root_only
def test_xdp_syn_rate_limit_drops_new_connections_over_the_rate(rig, kernel_bpffs):
    rate, burst, attempts = 1, 3, 30
    rig.start_nginx(80)
    other_v4, _ = add_second_client_address(rig)
    start_gateway(rig, kernel(rig, syn_rate_limit={"rate": rate, "burst": burst}))
    shown = json.loads(rig.client.python(SYN_BURST, rig.client_v4, rig.server_v4, "80",
                                         str(attempts)).stdout)
    assert burst <= shown["connected"] <= burst + rate * (shown["seconds"] + 1), shown
    status = bpf_status(rig)
    assert xdp_count(status, rig.gateway_client_if, "syn_limited") >= \
        attempts - shown["connected"]
    # Another source has its own bucket; and the limited source's established
    # connections were not touched (only SYNs count).
    status_code, body = answered(curl(rig, url(rig.server_v4), source=other_v4))
    assert (status_code, body) == (200, f"server={rig.server_v4} remote={other_v4}")
    assert xdp_count(status, rig.gateway_client_if, "rate_limited") == 0


# -- lifecycle -----------------------------------------------------------------------------

def both(rig: Rig) -> dict[str, Any]:
    """XDP filter and flow metrics on the client-facing interface."""
    config = kernel(rig, deny=[f"{rig.client_v4}/32"])
    config["kernel"]["flow_metrics"] = {}
    return config


READY_BOTH = ("XDP filter attached", "kernel flow metrics attached", SERVING)
OURS = {"sg_xdp_filter", "sg_flow_in", "sg_flow_out", "sg_flow_retx"}


@root_only
def test_xdp_filter_and_flow_programs_are_removed_on_sigterm(rig, kernel_bpffs):
    rig.start_nginx(80)
    process = start_gateway(rig, both(rig), ready=READY_BOTH)
    status = bpf_status(rig)
    assert pinned_names(status) >= OURS
    assert {"sg_xdp_stats", "sg_xdp_deny4", "sg_flow_ports"} <= pinned_names(status)
    types = sorted(link["type"] for link in status["links"])
    assert types.count("xdp") == 1 and types.count("tcx") == 2, types
    on = programs_on(rig, rig.gateway_client_if)
    assert (on["xdp"], on["ingress"], on["egress"]) == ("sg_xdp_filter", ["sg_flow_in"],
                                                        ["sg_flow_out"])
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    assert not kernel_bpffs.exists()
    on = programs_on(rig, rig.gateway_client_if)
    assert (on["xdp"], on["ingress"], on["egress"]) == ("", [], [])
    status_code, _ = answered(curl(rig, url(rig.server_v4)))
    assert status_code == 200  # the deny list went with the gateway


@root_only
def test_xdp_filter_goes_with_a_killed_gateway_and_a_restart_cleans_up(rig, kernel_bpffs):
    rig.start_nginx(80)
    first = start_gateway(rig, both(rig), "first", ready=READY_BOTH)
    installed = pinned_names(bpf_status(rig))
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    # The links were the process's: the filter and the counters stopped with it (the
    # denied client is answered), only the pins are left.
    on = programs_on(rig, rig.gateway_client_if)
    assert (on["xdp"], on["ingress"], on["egress"]) == ("", [], [])
    left = bpf_status(rig)
    assert pinned_names(left) == installed and left["links"] == []
    status_code, _ = answered(curl(rig, url(rig.server_v4)))
    assert status_code == 200
    second = start_gateway(rig, both(rig), "second", ready=READY_BOTH)
    status = bpf_status(rig)
    assert pinned_names(status) == installed
    types = sorted(link["type"] for link in status["links"])
    assert types.count("xdp") == 1 and types.count("tcx") == 2, types
    assert answered(curl(rig, url(rig.server_v4), seconds=2)) == (0, "")
    stop(second)
    assert second.returncode == 0
    assert not kernel_bpffs.exists()


@root_only
def test_two_workers_the_supervisor_owns_the_filter(rig, kernel_bpffs):
    rig.start_nginx(80)
    other_v4, _ = add_second_client_address(rig)
    process = start_gateway(rig, kernel(rig, deny=[f"{rig.client_v4}/32"]), "workers",
                            "--workers", "2")
    assert answered(curl(rig, url(rig.server_v4), source=rig.client_v4, seconds=2)) == (0, "")
    assert answered(curl(rig, url(rig.server_v4), source=other_v4))[0] == 200
    assert sample(metrics(rig), "sluicegate_kernel_xdp_dropped_packets_total",
                  interface=rig.gateway_client_if, reason="denied") >= 1
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    assert not kernel_bpffs.exists()


# -- refusals ------------------------------------------------------------------------------

@root_only
def test_native_mode_without_a_native_hook_refuses_to_start_with_exit_3(rig, kernel_bpffs):
    # Loopback has no driver XDP hook.
    result = run_gateway(rig, {"kernel": {"xdp": {"interfaces": ["lo"], "mode": "native"}}})
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "Traceback" not in output
    line = next(line for line in output.splitlines() if "cannot start" in line)
    assert "XDP filter" in line and "lo" in line and "Operation not supported" in line, line
    assert not kernel_bpffs.exists()


@root_only
def test_optional_kernel_block_runs_without_what_the_kernel_lacks(rig, kernel_bpffs):
    rig.start_nginx(80)
    config = {"kernel": {"optional": True,
                         "xdp": {"interfaces": ["lo"], "mode": "native"},
                         "flow_metrics": {"interfaces": [rig.gateway_client_if]}},
              "plugins": [PROMETHEUS]}
    process = start_gateway(rig, config, ready=("kernel flow metrics attached", SERVING))
    log = (rig.workdir / "gateway.log").read_text()
    skipped = [line for line in log.splitlines() if "not available, running without it" in line]
    assert len(skipped) == 1 and "Operation not supported" in skipped[0], log
    assert process.poll() is None
    assert answered(curl(rig, url(rig.server_v4)))[0] == 200
    assert "sg_xdp_filter" not in pinned_names(bpf_status(rig))


@root_only
def test_a_missing_interface_refuses_to_start_with_exit_4(rig, kernel_bpffs):
    result = run_gateway(rig, {"kernel": {"optional": True,
                                          "xdp": {"interfaces": ["nope0"]}}})
    output = result.stdout + result.stderr
    assert result.returncode == 4, output
    assert "interface nope0 not found" in output and "Traceback" not in output


def test_kernel_block_errors_name_the_field(tmp_path):
    import subprocess

    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"kernel": {
        "xdp": {"interfaces": ["eth1"], "mode": "fast",
                "deny": ["10.0.0.0/8", "2001:db8::/32", "10.0.0.300/8"],
                "rate_limit": {"rate": 0}},
        "flow_metrics": {"top_remotes": -1}, "typo": 1}}))
    result = subprocess.run([PYTHON, "-m", "sluicegate", "validate", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    errors = result.stderr
    assert "kernel.xdp.deny[2]: '10.0.0.300/8' is not an IP address or CIDR" in errors
    assert "kernel.xdp.mode:" in errors and "kernel.xdp.rate_limit.rate:" in errors
    assert "kernel.flow_metrics.top_remotes:" in errors and "kernel.typo:" in errors


def test_flow_metrics_without_xdp_need_their_own_interfaces(tmp_path):
    from sluicegate.config.load import ConfigError, validate_config

    with pytest.raises(ConfigError) as caught:
        validate_config({"kernel": {"flow_metrics": True}})
    assert caught.value.errors == [
        "kernel.flow_metrics.interfaces: required when there is no xdp block"]
    validated = validate_config({"kernel": {"flow_metrics": {"interfaces": ["eth0"]}}})
    assert validated.config.kernel == {"flow_metrics": {"interfaces": ["eth0"]}}


# -- with interception ---------------------------------------------------------------------

@root_only
@pytest.mark.parametrize("mode", ["ebpf", "tproxy"])
def test_xdp_filter_runs_beside_interception_and_both_are_removed(rig, kernel_bpffs, mode):
    rig.start_nginx(80)
    other_v4, _ = add_second_client_address(rig)
    config = kernel(rig, deny=[f"{rig.client_v4}/32"])
    config["interception"] = {"listen": "0.0.0.0:80", "mode": mode}
    process = start_gateway(rig, config, ready=("interception installed", "XDP filter attached",
                                                 SERVING))
    # The allowed client is intercepted (the server sees the gateway), the denied one is
    # dropped before interception sees it.
    status, body = answered(curl(rig, url(rig.server_v4), source=other_v4))
    assert (status, body) == (200, f"server={rig.server_v4} remote={rig.gateway_server_v4}")
    assert answered(curl(rig, url(rig.server_v4), source=rig.client_v4, seconds=2)) == (0, "")
    # Both share the pin folder; `intercept status` still reports the interception mode.
    names = pinned_names(bpf_status(rig))
    assert "sg_xdp_filter" in names and ("sg_sk_lookup" in names) == (mode == "ebpf")
    shown = json.loads(rig.gateway.run([PYTHON, "-m", "sluicegate", "intercept",
                                        "status"]).stdout)
    assert shown["mode"] == mode and shown["installed"] is True
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    assert not kernel_bpffs.exists()
    status, body = answered(curl(rig, url(rig.server_v4), source=rig.client_v4))
    assert (status, body) == (200, f"server={rig.server_v4} remote={rig.client_v4}")
