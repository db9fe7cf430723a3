"""`mode: ebpf` end to end on a real kernel: sluicegate runs in the gateway namespace of a
client — gateway — server rig (tests/net) with sk_lookup steering and no firewall rule;
curl (or a UDP client) in the client namespace talks to the server namespace and never
learns a proxy exists. The pins live on a bpffs of the test's own (net/bpffs.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from net.bpffs import bpffs_fixture  # noqa: F401  (the `bpffs` fixture)
from net.conftest import rig_fixture  # noqa: F401  (the `rig` fixture)
from net.rig import PYTHON, Rig, stop

METRICS = "127.0.0.1:9091"
INSTALLED = "interception installed (ebpf)"
PROGRAMS = {"sg_sk_lookup", "sg_tc_mark"}


def seed(**tproxy: Any) -> dict[str, Any]:
    """The seed config (a tproxy plugin entry), in eBPF mode, with extra options."""
    return {"plugins": [
        {"name": "tproxy", "service": "your_service_name",
         "config": {"listen": "0.0.0.0:80", "tproxy": True, "mode": "ebpf", **tproxy}},
        {"name": "prometheus", "config": {"metrics": True}}]}


def start_gateway(rig: Rig, config: dict[str, Any], name: str = "gateway",
                  *extra: str) -> subprocess.Popen[str]:
    path = rig.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = rig.workdir / f"{name}.log"
    log = log_path.open("w")
    process = rig.gateway.popen([PYTHON, "-m", "sluicegate", "run", "-c", str(path), *extra],
                                stdout=log, stderr=subprocess.STDOUT)
    rig.processes.append(process)
    _wait_installed(process, log_path)
    return process


def _wait_installed(process: subprocess.Popen[str], log_path: Path,
                    timeout: float = 20.0) -> None:
    # The gateway logs this line once steering, routing and marking are all in place.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if INSTALLED in log_path.read_text():
            return
        if process.poll() is not None:
            raise AssertionError(f"gateway exited {process.returncode}: "
                                 f"{log_path.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"interception never installed: {log_path.read_text()}")


def curl(rig: Rig, url: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return rig.client.run(["curl", "-s", "-m", "5", "-w", "\n%{http_code}", *extra, url],
                          check=check)


def body_and_status(result: subprocess.CompletedProcess) -> tuple[str, int]:
    body, _, code = result.stdout.rpartition("\n")
    return body.rstrip("\n"), int(code)


UDP_CLIENT = """
import json, socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(5)
sock.sendto(payload, (host, port))
data, peer = sock.recvfrom(65535)
print(json.dumps({"data": data.decode(), "from": list(peer[:2])}))
"""


def udp_exchange(rig: Rig, host: str, port: int, payload: str) -> dict[str, Any]:
    return json.loads(rig.client.python(UDP_CLIENT, host, str(port), payload).stdout)


def sluicegate(rig: Rig, *args: str) -> Any:
    result = rig.gateway.run([PYTHON, "-m", "sluicegate", *args])
    return json.loads(result.stdout) if result.stdout.lstrip().startswith("{") \
        else result.stdout


def bpf_status(rig: Rig) -> dict[str, Any]:
    return sluicegate(rig, "bpf", "status")


def nft_tables(rig: Rig) -> list[str]:
    out = rig.gateway.run(["nft", "list", "tables"]).stdout
    return [line for line in out.splitlines() if "sluicegate" in line]


def fwmark_rules(rig: Rig) -> list[str]:
    lines = []
    for flag in ("-4", "-6"):
        out = rig.gateway.run(["ip", flag, "rule"]).stdout
        lines += [line for line in out.splitlines() if "fwmark" in line]
    return lines


def pinned_names(status: dict[str, Any]) -> list[str]:
    return sorted(Path(item["pin"]).name for item in status["pinned"])


# -- HTTP ----------------------------------------------------------------------------------

def test_ebpf_seed_config_intercepts_http_and_sends_it_to_its_original_destination(
        rig, bpffs):
    rig.start_nginx(80)
    start_gateway(rig, seed())
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert status == 200
    # The server was reached at its own address, by the gateway (not by the client).
    assert body == f"server={rig.server_v4} remote={rig.gateway_server_v4}"
    assert nft_tables(rig) == []  # no firewall rule at all in eBPF mode


def test_ebpf_intercepted_ipv6_http_reaches_its_original_destination(rig, bpffs):
    rig.start_nginx(80)
    start_gateway(rig, seed())
    body, status = body_and_status(curl(rig, f"http://[{rig.server_v6}]/"))
    assert (status, body) == (200, f"server={rig.server_v6} remote={rig.gateway_server_v6}")


def test_ebpf_steers_captured_ports_to_a_listener_on_another_port(rig, bpffs):
    rig.start_nginx(8080)
    start_gateway(rig, {"interception": {"listen": "0.0.0.0:15001", "mode": "ebpf",
                                         "ports": ["8000-8099"]}})
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}:8080/"))
    assert (status, body) == (200, f"server={rig.server_v4} remote={rig.gateway_server_v4}")
    # Port 80 is not captured: the connection goes straight to the server namespace.
    rig.start_nginx(80)
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert (status, body) == (200, f"server={rig.server_v4} remote={rig.client_v4}")


def test_ebpf_excluded_destinations_are_not_intercepted(rig, bpffs):
    rig.start_nginx(80)
    start_gateway(rig, seed(exclude=[f"{rig.server_v4}/32"]))
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert (status, body) == (200, f"server={rig.server_v4} remote={rig.client_v4}")
    body, status = body_and_status(curl(rig, f"http://[{rig.server_v6}]/"))
    assert (status, body) == (200, f"server={rig.server_v6} remote={rig.gateway_server_v6}")


def test_ebpf_captures_only_on_the_configured_interfaces(rig, bpffs):
    rig.start_nginx(80)
    start_gateway(rig, seed(interfaces=[rig.gateway_server_if]))  # not where clients are
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert (status, body) == (200, f"server={rig.server_v4} remote={rig.client_v4}")


def test_ebpf_preserve_source_makes_the_server_see_the_client_address(rig, bpffs):
    rig.start_nginx(80)
    start_gateway(rig, seed(preserve_source=True))
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert (status, body) == (200, f"server={rig.server_v4} remote={rig.client_v4}")
    body, status = body_and_status(curl(rig, f"http://[{rig.server_v6}]/"))
    assert (status, body) == (200, f"server={rig.server_v6} remote={rig.client_v6}")
    metrics = rig.gateway.run(["curl", "-s", "-m", "5", f"http://{METRICS}/metrics"]).stdout
    for destination in (f"{rig.server_v4}:80", f"[{rig.server_v6}]:80"):
        assert (f'sluicegate_intercepted_requests_total{{mode="ebpf",'
                f'original_destination="{destination}"}} 1.0') in metrics, metrics
    # The server's replies to the client's address were marked back to the gateway.
    assert sluicegate(rig, "intercept", "status")["counters"]["reply_marked"] > 0


def test_ebpf_two_workers_share_the_listeners_the_supervisor_opened(rig, bpffs):
    rig.start_nginx(80)
    process = start_gateway(rig, seed(), "workers", "--workers", "2")
    for _ in range(6):  # new connections, spread over both workers by SO_REUSEPORT
        body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
        assert (status, body) == (200, f"server={rig.server_v4} remote={rig.gateway_server_v4}")
    # One socket per worker and family, each held by the supervisor and its worker (the
    # workers opened none of their own).
    listeners = rig.gateway.run(["ss", "-Hltnp", "sport = :80"]).stdout.splitlines()
    assert len(listeners) == 4, listeners
    assert all(line.count("pid=") == 2 for line in listeners), listeners
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    assert not bpffs.exists() and fwmark_rules(rig) == []


# -- UDP and L4 ------------------------------------------------------------------------------

def test_ebpf_intercepted_udp_is_answered_from_its_original_destination(rig, bpffs):
    rig.start_udp_echo(5300)
    start_gateway(rig, seed(protocols=["udp"], ports=["5300"], listen="0.0.0.0:15300"))
    for server, gateway in ((rig.server_v4, rig.gateway_server_v4),
                            (rig.server_v6, rig.gateway_server_v6)):
        reply = udp_exchange(rig, server, 5300, "ping")
        assert reply == {"data": f"echo ping seen-from={gateway}", "from": [server, 5300]}


def test_ebpf_intercepted_udp_with_preserve_source_reaches_the_server_from_the_client(
        rig, bpffs):
    rig.start_udp_echo(5300)
    start_gateway(rig, seed(protocols=["udp"], ports=["5300"], listen="0.0.0.0:15300",
                            preserve_source=True))
    reply = udp_exchange(rig, rig.server_v4, 5300, "hi")
    assert reply == {"data": f"echo hi seen-from={rig.client_v4}",
                     "from": [rig.server_v4, 5300]}
    # Intercepted (not forwarded directly): steered to the listener, the reply marked back.
    counters = sluicegate(rig, "intercept", "status")["counters"]
    assert counters["assigned"] >= 1 and counters["reply_marked"] >= 1, counters


def test_ebpf_intercepted_tcp_in_tcp_mode_is_relayed_to_its_original_destination(rig, bpffs):
    rig.start_nginx(80)
    start_gateway(rig, seed(handle="tcp"))
    body, status = body_and_status(curl(rig, f"http://[{rig.server_v6}]/"))
    assert (status, body) == (200, f"server={rig.server_v6} remote={rig.gateway_server_v6}")


# -- lifecycle -------------------------------------------------------------------------------

def test_ebpf_sigterm_removes_every_object_and_route_it_installed(rig, bpffs):
    rig.start_nginx(80)
    process = start_gateway(rig, seed())
    status = bpf_status(rig)
    assert {"sg_sk_lookup", "sg_tc_mark", "sg_sockets"} <= set(pinned_names(status))
    assert {link["type"] for link in status["links"]} == {"netns", "tcx"}
    assert fwmark_rules(rig)
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    assert not bpffs.exists()
    assert fwmark_rules(rig) == []
    body, status_code = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert status_code == 200 and body.endswith(f"remote={rig.client_v4}")


def test_ebpf_fails_open_after_kill_9(rig, bpffs):
    rig.start_nginx(80)
    process = start_gateway(rig, seed())
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    # The links died with the process: nothing is marked or steered any more, so the
    # connection is forwarded to the server (the leftover fwmark rule matches nothing).
    assert bpf_status(rig)["links"] == []
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert (status, body) == (200, f"server={rig.server_v4} remote={rig.client_v4}")


def test_ebpf_without_fail_open_keeps_capturing_after_kill_9_until_intercept_down(rig, bpffs):
    rig.start_nginx(80)
    process = start_gateway(rig, seed(fail_open=False))
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    assert {link["type"] for link in bpf_status(rig)["links"]} == {"netns", "tcx"}
    result = curl(rig, f"http://{rig.server_v4}/", check=False)
    assert result.returncode != 0  # captured, but nothing serves it: refused
    assert sluicegate(rig, "intercept", "down").strip() == "interception removed"
    assert not bpffs.exists() and fwmark_rules(rig) == []
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert (status, body) == (200, f"server={rig.server_v4} remote={rig.client_v4}")


def test_ebpf_restart_after_kill_9_leaves_exactly_one_set_of_objects(rig, bpffs):
    rig.start_nginx(80)
    first = start_gateway(rig, seed(fail_open=False), "first")
    installed = pinned_names(bpf_status(rig))
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    second = start_gateway(rig, seed(fail_open=False), "second")
    status = bpf_status(rig)
    assert pinned_names(status) == installed
    # One sk_lookup link on the namespace, one tcx link per interface: the first run's
    # pinned links were detached and replaced.
    netns_links = [link for link in status["links"] if link["type"] == "netns"]
    assert len(netns_links) == 1
    assert len([link for link in status["links"] if link["type"] == "tcx"]) == 2
    assert len(fwmark_rules(rig)) == 2  # one per family
    body, code = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert (code, body) == (200, f"server={rig.server_v4} remote={rig.gateway_server_v4}")
    stop(second)
    assert not bpffs.exists() and fwmark_rules(rig) == []


def test_ebpf_intercept_status_shows_the_mode_counters_and_listeners(rig, bpffs):
    rig.start_nginx(80)
    start_gateway(rig, seed())
    curl(rig, f"http://{rig.server_v4}/")
    shown = sluicegate(rig, "intercept", "status")
    assert shown["mode"] == "ebpf" and shown["installed"] is True
    assert shown["counters"]["assigned"] >= 1 and shown["counters"]["marked"] >= 1
    assert set(shown["sockets"]) == {"tcp/ipv4", "tcp/ipv6"}
    assert {link["program"] for link in shown["links"]} == PROGRAMS


def test_ebpf_spec_that_would_loop_onto_the_gateway_is_refused_with_one_line(rig, bpffs):
    path = rig.workdir / "loop.yaml"
    path.write_text(yaml.safe_dump(seed(destinations=[f"{rig.gateway_client_v4}/32"])))
    result = rig.gateway.run([PYTHON, "-m", "sluicegate", "run", "-c", str(path)],
                             check=False, timeout=30)
    assert result.returncode == 4, result
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "cannot intercept" in output and "loop" in output.lower(), output
    assert not bpffs.exists() and fwmark_rules(rig) == []
