"""The gateway with the `tproxy` plugin, end to end on a real kernel: sluicegate runs in the
gateway namespace of a client — gateway — server rig (tests/net), curl in the client
namespace talks to nginx in the server namespace and never learns a proxy exists."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from net.conftest import rig_fixture  # noqa: F401  (the `rig` fixture)
from net.rig import PYTHON, Rig, stop

METRICS = "127.0.0.1:9091"


def seed(**tproxy: Any) -> dict[str, Any]:
    """The seed config of DEVELOPERS.md, with extra tproxy options."""
    return {"plugins": [
        {"name": "tproxy", "service": "your_service_name",
         "config": {"listen": "0.0.0.0:80", "tproxy": True, **tproxy}},
        {"name": "prometheus", "config": {"metrics": True}}]}


def start_gateway(rig: Rig, config: dict[str, Any], name: str = "gateway"
                  ) -> subprocess.Popen[str]:
    path = rig.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (rig.workdir / f"{name}.log").open("w")
    process = rig.gateway.popen([PYTHON, "-m", "sluicegate", "run", "-c", str(path)],
                                stdout=log, stderr=subprocess.STDOUT)
    rig.processes.append(process)
    rig.gateway.wait_listening(80, process=process)
    _wait_rules(rig)
    return process


def _wait_rules(rig: Rig, timeout: float = 10.0) -> None:
    # The listener opens before the rules go in (nothing is captured without a socket).
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tables(rig):
            return
        time.sleep(0.05)
    raise TimeoutError("interception rules never appeared")


def tables(rig: Rig) -> list[str]:
    out = rig.gateway.run(["nft", "list", "tables"]).stdout
    return [line for line in out.splitlines() if "sluicegate" in line]


def fwmark_rules(rig: Rig) -> list[str]:
    lines = []
    for flag in ("-4", "-6"):
        out = rig.gateway.run(["ip", flag, "rule"]).stdout
        lines += [line for line in out.splitlines() if "fwmark" in line]
    return lines


def curl(rig: Rig, url: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return rig.client.run(["curl", "-s", "-m", "5", "-w", "\n%{http_code}", *extra, url],
                          check=check)


def body_and_status(result: subprocess.CompletedProcess) -> tuple[str, int]:
    body, _, code = result.stdout.rpartition("\n")
    return body.rstrip("\n"), int(code)


def metrics(rig: Rig) -> str:
    return rig.gateway.run(["curl", "-s", "-m", "5", f"http://{METRICS}/metrics"]).stdout


def test_seed_config_intercepts_http_and_sends_it_to_its_original_destination(rig):
    rig.start_nginx(80)
    start_gateway(rig, seed())
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert status == 200
    # The server was reached at its own address, by the gateway (not by the client).
    assert body == f"server={rig.server_v4} remote={rig.gateway_server_v4}"


def test_excluded_destination_on_the_listeners_port_is_not_intercepted(rig):
    # The transparent listener is on 0.0.0.0:80, the captured port itself: a SYN to an
    # excluded destination must not find it through the rule that lets intercepted
    # connections skip the prefix lookups (it matches only sockets bound to a destination).
    rig.start_nginx(80)
    start_gateway(rig, seed(exclude=[f"{rig.server_v4}/32"]))
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert status == 200 and body == f"server={rig.server_v4} remote={rig.client_v4}"
    body, status = body_and_status(curl(rig, f"http://[{rig.server_v6}]/"))
    assert status == 200 and body == f"server={rig.server_v6} remote={rig.gateway_server_v6}"


def test_top_level_interception_block_intercepts_like_the_plugin_entry(rig):
    rig.start_nginx(80)
    start_gateway(rig, {"interception": {"listen": "0.0.0.0:80", "preserve_source": True},
                        "plugins": [{"name": "prometheus", "config": {"metrics": True}}]})
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert status == 200 and body == f"server={rig.server_v4} remote={rig.client_v4}"


def test_intercepted_ipv6_http_reaches_its_original_destination(rig):
    rig.start_nginx(80)
    start_gateway(rig, seed())
    body, status = body_and_status(curl(rig, f"http://[{rig.server_v6}]/"))
    assert status == 200
    assert body == f"server={rig.server_v6} remote={rig.gateway_server_v6}"


def test_intercepted_requests_are_counted_in_metrics_with_the_interception_route(rig):
    rig.start_nginx(80)
    start_gateway(rig, seed())
    for _ in range(3):
        curl(rig, f"http://{rig.server_v4}/")
    text = metrics(rig)
    counted = [line for line in text.splitlines()
               if line.startswith("sluicegate_http_requests_total{")
               and 'route="intercept-your_service_name"' in line
               and f'node="{rig.server_v4}:80"' in line]
    assert counted and counted[0].endswith(" 3.0"), text
    assert (f'sluicegate_intercepted_requests_total{{mode="tproxy",'
            f'original_destination="{rig.server_v4}:80"}} 3.0') in text, text


def test_access_log_carries_the_original_destination_and_mode(rig):
    rig.start_nginx(80)
    log_path = rig.workdir / "access.log"
    config = seed()
    config["plugins"].append({"name": "file-logger", "config": {"path": str(log_path)}})
    process = start_gateway(rig, config)
    curl(rig, f"http://[{rig.server_v6}]/")
    stop(process)
    entry = json.loads(log_path.read_text().splitlines()[-1])
    assert entry["original_destination"] == f"[{rig.server_v6}]:80"
    assert entry["intercept_mode"] == "tproxy"
    assert entry["status"] == 200


def test_preserve_source_makes_the_server_see_the_client_address(rig):
    rig.start_nginx(80)
    start_gateway(rig, seed(preserve_source=True))
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert status == 200
    assert body == f"server={rig.server_v4} remote={rig.client_v4}"
    body, status = body_and_status(curl(rig, f"http://[{rig.server_v6}]/"))
    assert status == 200
    assert body == f"server={rig.server_v6} remote={rig.client_v6}"


def test_plugins_of_the_named_service_apply_to_intercepted_traffic(rig):
    rig.start_nginx(80)
    config = seed()
    config["services"] = [{"id": "web", "name": "your_service_name",
                           "plugins": {"key-auth": {}}}]
    config["consumers"] = [{"username": "alice", "plugins": {"key-auth": {"key": "k-alice"}}}]
    start_gateway(rig, config)
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert status == 401 and "Missing API key" in body
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/", "-H",
                                        "apikey: k-alice"))
    assert status == 200 and body.startswith(f"server={rig.server_v4}")


def test_routes_of_the_named_service_match_intercepted_traffic_by_host(rig):
    rig.start_nginx(80)
    config = seed()
    config["services"] = [{"id": "web", "name": "your_service_name"}]
    config["routes"] = [{"id": "blocked", "uri": "/*", "host": "blocked.example",
                         "service_id": "web",
                         "plugins": {"response-rewrite": {"status_code": 403,
                                                          "body": "blocked\n"}},
                         "upstream": {"nodes": {f"{rig.server_v4}:80": 1}}}]
    start_gateway(rig, config)
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/", "-H",
                                        "Host: blocked.example"))
    assert (status, body) == (403, "blocked")
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert status == 200 and body.startswith(f"server={rig.server_v4}")


def test_connection_to_a_dead_destination_is_reset_promptly(rig):
    start_gateway(rig, seed())  # nothing listens in the server namespace
    started = time.monotonic()
    result = curl(rig, f"http://{rig.server_v4}/", check=False)
    elapsed = time.monotonic() - started
    # curl: 56 = connection reset while receiving, 52 = empty reply; never a 502 page.
    assert result.returncode in (52, 56), result
    assert elapsed < 2.0


def test_sigterm_removes_every_rule_and_route_it_installed(rig):
    rig.start_nginx(80)
    process = start_gateway(rig, seed())
    assert len(tables(rig)) == 1 and fwmark_rules(rig)
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    assert tables(rig) == []
    assert fwmark_rules(rig) == []
    # And traffic flows directly again.
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert status == 200 and body.endswith(f"remote={rig.client_v4}")


def transparent_timewait(rig: Rig) -> list[str]:
    out = rig.gateway.run(["ss", "-tnH", "state", "time-wait"]).stdout
    # Columns: Recv-Q Send-Q Local Peer; the gateway's transparent side is the server's.
    return [line for line in out.splitlines() if line.split()[2:3] == [f"{rig.server_v4}:80"]]


# Sends one `Connection: close` request from a fixed source port and reads until the
# server side closes: the gateway's transparent socket closes first and stays in TIME_WAIT.
CLOSE_FIRST_CLIENT = """
import socket, sys
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("0.0.0.0", int(sys.argv[2])))
sock.connect((sys.argv[1], 80))
sock.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := sock.recv(65536):
    data += chunk
print(data.split(b" ")[1].decode())
"""


def test_after_stop_a_client_reusing_its_source_port_reaches_the_server_directly(rig):
    # A TIME_WAIT socket with the server's address as its local address makes the router
    # drop a later SYN on the same 4-tuple; stopping must clear them (fail-open).
    rig.start_nginx(80)
    process = start_gateway(rig, seed())
    port = "40123"
    assert rig.client.python(CLOSE_FIRST_CLIENT, rig.server_v4, port).stdout.strip() == "200"
    assert transparent_timewait(rig), "expected the gateway's socket in TIME_WAIT"
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    assert transparent_timewait(rig) == []
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/", "--local-port", port))
    assert status == 200 and body.endswith(f"remote={rig.client_v4}")


def test_restart_after_kill_9_leaves_exactly_one_table(rig):
    rig.start_nginx(80)
    first = start_gateway(rig, seed(), "first")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert len(tables(rig)) == 1  # a crash leaves its table behind...
    second = start_gateway(rig, seed(), "second")
    assert len(tables(rig)) == 1  # ...which the next start replaces
    _, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert status == 200
    stop(second)
    assert tables(rig) == []


def test_intercept_status_and_down_commands(rig):
    rig.start_nginx(80)
    process = start_gateway(rig, seed())
    curl(rig, f"http://{rig.server_v4}/")
    shown = json.loads(rig.gateway.run([PYTHON, "-m", "sluicegate", "intercept",
                                        "status"]).stdout)
    assert shown["installed"] is True
    captured = [r for r in shown["rules"] if "capture tcp ipv4" in (r.get("comment") or "")]
    assert captured and captured[0]["packets"] > 0
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    rig.gateway.run([PYTHON, "-m", "sluicegate", "intercept", "down"])
    assert tables(rig) == [] and fwmark_rules(rig) == []


def test_validate_warns_about_the_undefined_service_of_the_seed_config(tmp_path: Path):
    path = tmp_path / "seed.yaml"
    path.write_text(yaml.safe_dump(seed()))
    result = subprocess.run([PYTHON, "-m", "sluicegate", "validate", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "plugins[0].service" in result.stderr and "original destination" in result.stderr


# -- L4: intercepted TCP relayed as bytes, intercepted UDP ----------------------------------

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


def start_l4_gateway(rig: Rig, config: dict[str, Any]) -> subprocess.Popen[str]:
    path = rig.workdir / "l4.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (rig.workdir / "l4.log").open("w")
    process = rig.gateway.popen([PYTHON, "-m", "sluicegate", "run", "-c", str(path)],
                                stdout=log, stderr=subprocess.STDOUT)
    rig.processes.append(process)
    rig.gateway.wait_listening(9080, process=process)  # the HTTP listener opens first
    _wait_rules(rig)
    return process


def test_intercepted_tcp_in_tcp_mode_is_relayed_to_its_original_destination(rig):
    rig.start_nginx(80)
    start_l4_gateway(rig, seed(handle="tcp"))
    for url, server, gateway in ((f"http://{rig.server_v4}/", rig.server_v4,
                                  rig.gateway_server_v4),
                                 (f"http://[{rig.server_v6}]/", rig.server_v6,
                                  rig.gateway_server_v6)):
        body, status = body_and_status(curl(rig, url))
        assert (status, body) == (200, f"server={server} remote={gateway}")
    text = metrics(rig)
    assert 'sluicegate_stream_connections_total{protocol="tcp",route="intercept-your_servi' \
           'ce_name"} 2.0' in text, text


def test_intercepted_tcp_relay_preserves_the_client_address(rig):
    rig.start_nginx(80)
    start_l4_gateway(rig, seed(handle="tcp", preserve_source=True))
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert (status, body) == (200, f"server={rig.server_v4} remote={rig.client_v4}")


def test_intercepted_udp_is_answered_from_its_original_destination(rig):
    rig.start_udp_echo(5300)
    start_l4_gateway(rig, seed(protocols=["udp"], ports=["5300"], listen="0.0.0.0:15300"))
    for server, gateway in ((rig.server_v4, rig.gateway_server_v4),
                            (rig.server_v6, rig.gateway_server_v6)):
        reply = udp_exchange(rig, server, 5300, "ping")
        assert reply["from"] == [server, 5300]  # the client sees the server answer
        assert reply["data"] == f"echo ping seen-from={gateway}"


def test_intercepted_udp_with_preserve_source_reaches_the_server_from_the_client(rig):
    rig.start_udp_echo(5300)
    start_l4_gateway(rig, seed(protocols=["udp"], ports=["5300"], listen="0.0.0.0:15300",
                               preserve_source=True))
    reply = udp_exchange(rig, rig.server_v4, 5300, "hi")
    assert reply == {"data": f"echo hi seen-from={rig.client_v4}",
                     "from": [rig.server_v4, 5300]}


def test_stream_route_claims_intercepted_tcp_before_the_original_destination(rig):
    rig.start_nginx(8080)  # nothing listens on port 80: only the stream route can answer
    config = seed(handle="tcp")
    config["stream_routes"] = [{"id": "to-8080", "server_port": 80,
                                "upstream": {"nodes": {f"{rig.server_v4}:8080": 1}}}]
    start_l4_gateway(rig, config)
    body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
    assert status == 200 and body.startswith(f"server={rig.server_v4}")
    text = metrics(rig)
    assert 'sluicegate_stream_connections_total{protocol="tcp",route="to-8080"} 1.0' in text


def test_two_workers_share_the_transparent_listener_and_the_supervisor_owns_the_rules(rig):
    rig.start_nginx(80)
    path = rig.workdir / "workers.yaml"
    path.write_text(yaml.safe_dump(seed()))
    process = rig.gateway.popen([PYTHON, "-m", "sluicegate", "run", "-c", str(path),
                                 "--workers", "2"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
    rig.processes.append(process)
    rig.gateway.wait_listening(80, process=process)
    _wait_rules(rig)
    for _ in range(6):  # new connections, spread over both workers by SO_REUSEPORT
        body, status = body_and_status(curl(rig, f"http://{rig.server_v4}/"))
        assert (status, body) == (200, f"server={rig.server_v4} remote={rig.gateway_server_v4}")
    assert len(tables(rig)) == 1
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    assert tables(rig) == [] and fwmark_rules(rig) == []


def test_spec_that_would_loop_onto_the_gateway_is_refused_with_one_line(rig):
    path = rig.workdir / "loop.yaml"
    path.write_text(yaml.safe_dump(seed(destinations=[f"{rig.gateway_client_v4}/32"])))
    result = rig.gateway.run([PYTHON, "-m", "sluicegate", "run", "-c", str(path)],
                             check=False, timeout=30)
    assert result.returncode == 4, result
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "cannot intercept" in output and "loop" in output.lower(), output
    assert tables(rig) == [] and fwmark_rules(rig) == []
