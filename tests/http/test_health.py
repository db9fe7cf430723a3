"""Upstream health checks: active probes and passive accounting eject nodes and bring them
back, all-unhealthy upstreams are proxied anyway, and the state shows on /v1/healthcheck and
/metrics. End to end through a running gateway, over upstream processes stopped and
restarted; the state machine and the balancer wrapper are also tested in process."""

from __future__ import annotations

import asyncio
import datetime
import http.client
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness import EchoUpstream, Gateway, Nginx, TlsNginx, wait_for_port
from sluicegate.config.load import ConfigError, validate_config
from sluicegate.config.model import UpstreamConfig
from sluicegate.http.balancer import make_balancer
from sluicegate.http.health import (
    HTTP_FAILURE,
    PROBE_USER_AGENT,
    SUCCESS,
    TCP_FAILURE,
    HealthCheckedBalancer,
    HealthCheckers,
    parse_status_line,
)
from sluicegate.http.snapshot import Upstream, compile_snapshot
from sluicegate.plugins.base import PluginEnv

# Fast probes for tests: a stopped node is ejected within ~0.5 s.
FAST = {"interval": 0.2}
WAIT = 8.0  # upper bound on any state change; they take well under a second


# -- helpers ---------------------------------------------------------------------------
def fetch(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def names(gateway: Gateway, count: int, path: str = "/") -> list[str]:
    """`count` requests on one keep-alive connection; the echo name answering each."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    found = []
    try:
        for _ in range(count):
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200, (response.status, body)
            found.append(json.loads(body)["name"])
    finally:
        connection.close()
    return found


def healthcheck(gateway: Gateway, path: str = "/v1/healthcheck") -> Any:
    status, body = fetch(gateway.metrics_port, path)
    assert status == 200, (status, body)
    return json.loads(body)


def node_status(gateway: Gateway, upstream: str, address: str) -> str:
    for checked in healthcheck(gateway):
        if checked["name"] == upstream:
            for node in checked["nodes"]:
                if node["address"] == address:
                    return node["status"]
    raise AssertionError(f"{upstream} {address} not in {healthcheck(gateway)}")


def wait_until(predicate: Callable[[], bool], what: str, gateway: Gateway,
               timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"not {what} after {timeout}s; gateway log:\n{gateway.log()}")


def metrics(gateway: Gateway) -> str:
    status, body = fetch(gateway.metrics_port, "/metrics")
    assert status == 200
    return body.decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    return None


def checked_route(nodes: list[Any], checks: dict[str, Any], **upstream: Any) -> dict[str, Any]:
    return {"routes": [{"id": "r1", "uri": "/*", "upstream": {
        "nodes": {node.address: 1 for node in nodes}, "checks": checks, **upstream}}]}


@pytest.fixture
def start_checked(start_gateway: Callable[..., Gateway]) -> Callable[..., Gateway]:
    """start_gateway, then also wait for the metrics listener (/v1/healthcheck): it opens
    after the traffic listeners."""

    def start(config: dict[str, Any], **options: Any) -> Gateway:
        gateway = start_gateway(config, **options)
        wait_for_port(gateway.metrics_port, process=gateway.process)
        return gateway

    return start


@pytest.fixture
def pair() -> Iterator[dict[str, EchoUpstream]]:
    servers = {"a": EchoUpstream(name="a"), "b": EchoUpstream(name="b")}
    yield servers
    for server in servers.values():
        server.stop()


# -- active checks ----------------------------------------------------------------------
@pytest.mark.parametrize("probe", ["http", "tcp"])
def test_active_check_ejects_a_stopped_node_and_returns_it_after_restart(
        pair, start_checked, probe):
    a, b = pair["a"], pair["b"]
    # retries 0: a request sent to a dead node would fail, so 200s prove the ejection.
    gateway = start_checked(checked_route([a, b], {"active": {
        "type": probe, "timeout": 0.5, "http_path": "/health",
        "healthy": {**FAST, "successes": 2}, "unhealthy": {**FAST, "tcp_failures": 2}}},
        retries=0))
    assert Counter(names(gateway, 10)) == {"a": 5, "b": 5}

    b.stop()
    wait_until(lambda: node_status(gateway, "route-r1", b.address) == "unhealthy",
               "b ejected", gateway)
    assert names(gateway, 20) == ["a"] * 20
    text = metrics(gateway)
    assert metric(text, "sluicegate_upstream_node_healthy", upstream="route-r1",
                  node=b.address) == 0
    assert metric(text, "sluicegate_upstream_node_healthy", upstream="route-r1",
                  node=a.address) == 1

    pair["b"] = b = EchoUpstream(port=b.port, name="b")
    wait_until(lambda: node_status(gateway, "route-r1", b.address) == "healthy",
               "b back", gateway)
    assert set(names(gateway, 10)) == {"a", "b"}
    assert f"node {b.address} is unhealthy (2 active tcp failures)" in gateway.log()
    assert f"node {b.address} is healthy again (2 active successes)" in gateway.log()


def test_active_http_check_judges_the_status_of_http_path(pair, start_checked):
    a, b = pair["a"], pair["b"]
    # The echo upstream answers ?status=N: b's probe path says 503, an unhealthy status.
    gateway = start_checked({"upstreams": [
        {"id": "u", "nodes": {a.address: 1}, "checks": {"active": {
            "http_path": "/ping", "req_headers": ["X-Probe: yes"],
            "healthy": FAST, "unhealthy": {**FAST, "http_failures": 2}}}},
        {"id": "v", "nodes": {b.address: 1}, "checks": {"active": {
            "http_path": "/ping?status=503", "healthy": FAST,
            "unhealthy": {**FAST, "http_failures": 2}}}}],
        "routes": [{"id": "r1", "uri": "/*", "upstream_id": "u"}]})
    wait_until(lambda: node_status(gateway, "v", b.address) == "unhealthy", "v down",
               gateway)
    assert node_status(gateway, "u", a.address) == "healthy"


# -- https active checks ----------------------------------------------------------------
def _write_cert(folder: Path, name: str, common_name: str,
                issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
                dns: tuple[str, ...] = (), ca: bool = False
                ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """`name.crt` and `name.key` in `folder`: signed by `issuer`, else self-signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[0].subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns]), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.crt; backend.crt signed by it for the name backend.test only (no IP entry, so the
    name probes verify is the one they send); rogue.crt for the same name, self-signed."""
    folder = tmp_path_factory.mktemp("health-certs")
    ca = _write_cert(folder, "ca", "health test CA", ca=True)
    _write_cert(folder, "backend", "backend.test", ca, dns=("backend.test",))
    _write_cert(folder, "rogue", "backend.test", dns=("backend.test",))
    return folder


@pytest.fixture
def tls_servers(certs: Path, tmp_path: Path) -> Callable[[str], TlsNginx]:
    """Factory: tls_servers("backend" | "rogue") -> an https nginx with that certificate."""
    started: list[TlsNginx] = []

    def start(cert: str) -> TlsNginx:
        server = TlsNginx(tmp_path / f"tls-{len(started)}",
                          [(certs / f"{cert}.crt", certs / f"{cert}.key")])
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def https_checks(**active: Any) -> dict[str, Any]:
    return {"active": {"type": "https", "timeout": 0.5, "healthy": FAST,
                       "unhealthy": {**FAST, "tcp_failures": 2}, **active}}


def test_active_https_check_ejects_a_node_whose_certificate_fails_verification(
        certs, tls_servers, start_checked):
    good, rogue = tls_servers("backend"), tls_servers("rogue")
    tls = {"ca_file": str(certs / "ca.crt"), "sni": "backend.test"}
    gateway = start_checked({"upstreams": [
        # retries 0: a request sent to the rogue node fails verification (502), so 200s
        # prove it left the balancer.
        {"id": "mixed", "scheme": "https", "tls": tls, "retries": 0,
         "nodes": {good.address(): 1, rogue.address(): 1}, "checks": https_checks()},
        # Without tls.sni the probe's `host` is the name sent and verified.
        {"id": "by-host", "scheme": "https", "tls": {"ca_file": str(certs / "ca.crt")},
         "nodes": {good.address(): 1}, "checks": https_checks(host="backend.test")},
        {"id": "wrong-host", "scheme": "https", "tls": {"ca_file": str(certs / "ca.crt")},
         "nodes": {good.address(): 1}, "checks": https_checks(host="other.test")}],
        "routes": [{"id": "r1", "uri": "/*", "upstream_id": "mixed"}]})
    wait_until(lambda: node_status(gateway, "mixed", rogue.address()) == "unhealthy",
               "rogue ejected", gateway)
    wait_until(lambda: node_status(gateway, "wrong-host", good.address()) == "unhealthy",
               "name mismatch found", gateway)
    assert node_status(gateway, "mixed", good.address()) == "healthy"
    assert node_status(gateway, "by-host", good.address()) == "healthy"
    assert [fetch(gateway.port, "/")[0] for _ in range(10)] == [200] * 10
    assert healthcheck(gateway, "/v1/healthcheck/upstreams/mixed")["type"] == "https"
    log = gateway.log()
    assert f"node {rogue.address()} is unhealthy (2 active tcp failures; last: TLS: " \
        "self-signed certificate" in log
    assert "last: TLS: Hostname mismatch" in log


def test_active_https_check_without_verification_accepts_any_certificate(
        certs, tls_servers, start_checked):
    rogue = tls_servers("rogue")
    gateway = start_checked({"upstreams": [
        {"id": "unverified", "nodes": {rogue.address(): 1},
         "checks": https_checks(https_verify_certificate=False)},
        # Same node and timing, verified: once this one is ejected, the unverified upstream
        # has been probed as often.
        {"id": "verified", "scheme": "https", "tls": {"ca_file": str(certs / "ca.crt")},
         "nodes": {rogue.address(): 1}, "checks": https_checks(host="backend.test")}],
        "routes": [{"id": "r1", "uri": "/*", "upstream_id": "unverified"}]})
    wait_until(lambda: node_status(gateway, "verified", rogue.address()) == "unhealthy",
               "verified probes fail", gateway)
    assert node_status(gateway, "unverified", rogue.address()) == "healthy"
    assert "unverified" not in gateway.log()


def test_active_https_check_ejects_a_stopped_node(certs, tls_servers, start_checked):
    first, second = tls_servers("backend"), tls_servers("backend")
    gateway = start_checked({"routes": [{"id": "r1", "uri": "/*", "upstream": {
        "scheme": "https", "retries": 0,
        "tls": {"ca_file": str(certs / "ca.crt"), "sni": "backend.test"},
        "nodes": {first.address(): 1, second.address(): 1}, "checks": https_checks()}}]})
    assert [fetch(gateway.port, "/")[0] for _ in range(4)] == [200] * 4
    second.stop()
    wait_until(lambda: node_status(gateway, "route-r1", second.address()) == "unhealthy",
               "second ejected", gateway)
    assert node_status(gateway, "route-r1", first.address()) == "healthy"
    assert [fetch(gateway.port, "/")[0] for _ in range(10)] == [200] * 10


def test_https_probe_sends_host_as_header_and_tls_name():
    checks = {"active": {"type": "https", "host": "Backend.Test", "http_path": "/ready"}}
    upstream = checked_upstream({"127.0.0.1:8443": 1}, checks, scheme="https",
                                tls={"sni": "tls-name.test"})
    (state,) = upstream.health.states.values()
    assert state.server_name == "backend.test"
    assert state.probe_request.startswith(b"GET /ready HTTP/1.1\r\nHost: Backend.Test\r\n")
    # Without `host`: the upstream's tls.sni, else the node's host.
    del checks["active"]["host"]
    upstream = checked_upstream({"127.0.0.1:8443": 1}, checks, scheme="https",
                                tls={"sni": "tls-name.test"})
    assert next(iter(upstream.health.states.values())).server_name == "tls-name.test"
    upstream = checked_upstream({"127.0.0.1:8443": 1}, checks)
    assert next(iter(upstream.health.states.values())).server_name == "127.0.0.1"


# -- passive checks -----------------------------------------------------------------------
def test_passive_check_ejects_a_node_answering_500_and_active_brings_it_back(
        nginx: Nginx, echo: EchoUpstream, start_checked):
    # nginx answers /status/500 with 500; the echo upstream answers any path with 200.
    probes_before = nginx.access_log().count(PROBE_USER_AGENT.decode())
    gateway = start_checked(checked_route([nginx, echo], {
        # Probes of / succeed on both; healthy ones are probed rarely so that no probe
        # success resets nginx's failure count while the test counts the 500s.
        "active": {"healthy": {"interval": 30, "successes": 3},
                   "unhealthy": {"interval": 0.3}},
        "passive": {"unhealthy": {"http_failures": 3}}}))
    # The first probe goes out at start; its success would reset the count if it landed
    # among the 500s, so count only after it (nginx logs it before the gateway reads it).
    wait_until(lambda: nginx.access_log().count(PROBE_USER_AGENT.decode()) > probes_before,
               "the first probe of nginx", gateway)
    time.sleep(0.1)
    statuses = [fetch(gateway.port, "/status/500")[0] for _ in range(6)]
    assert statuses.count(500) == 3  # round robin: nginx got three requests
    assert node_status(gateway, "route-r1", nginx.address) == "unhealthy"
    # Ejected: every request goes to the echo upstream now, for at least 3 probe intervals.
    assert [fetch(gateway.port, "/status/500")[0] for _ in range(10)] == [200] * 10
    assert f"node {nginx.address} is unhealthy (3 passive http failures)" in gateway.log()
    wait_until(lambda: node_status(gateway, "route-r1", nginx.address) == "healthy",
               "nginx back (active probes of / succeed)", gateway)
    assert 500 in [fetch(gateway.port, "/status/500")[0] for _ in range(4)]


def test_passive_check_counts_connection_failures(pair, start_checked):
    a, b = pair["a"], pair["b"]
    gateway = start_checked(checked_route([a, b], {
        "active": {"healthy": {"interval": 30}, "unhealthy": {"interval": 30}},
        "passive": {"unhealthy": {"tcp_failures": 1}}}))
    b.stop()
    # The first request that meets the dead node fails over to a (retries) and ejects b.
    assert names(gateway, 4) == ["a"] * 4
    assert node_status(gateway, "route-r1", b.address) == "unhealthy"
    assert gateway.log().count("connect failed") == 1


# -- all nodes unhealthy ------------------------------------------------------------------
def test_all_nodes_unhealthy_are_proxied_anyway_and_counted(pair, start_checked):
    a, b = pair["a"], pair["b"]
    gateway = start_checked(checked_route([a, b], {"active": {
        "http_path": "/health?status=503", "healthy": FAST,
        "unhealthy": {**FAST, "http_failures": 1}}}))
    for node in (a, b):
        wait_until(lambda node=node: node_status(gateway, "route-r1", node.address) ==
                   "unhealthy", f"{node.name} down", gateway)
    # Real traffic still reaches them (APISIX: no healthy node, so use them all).
    assert Counter(names(gateway, 10)) == {"a": 5, "b": 5}
    text = metrics(gateway)
    assert metric(text, "sluicegate_upstream_all_unhealthy_total", upstream="route-r1") == 10
    assert metric(text, "sluicegate_upstream_node_healthy", node=a.address) == 0
    assert healthcheck(gateway)[0]["all_unhealthy_total"] == 10
    assert "every node is unhealthy, proxying to them anyway" in gateway.log()


def test_all_nodes_down_still_proxied_gives_the_upstream_error(pair, start_checked):
    a, b = pair["a"], pair["b"]
    gateway = start_checked(checked_route([a, b], {"active": {
        "type": "tcp", "healthy": FAST, "unhealthy": FAST}}))
    a.stop()
    b.stop()
    for node in (a, b):
        wait_until(lambda node=node: node_status(gateway, "route-r1", node.address) ==
                   "unhealthy", f"{node.name} down", gateway)
    status, body = fetch(gateway.port, "/")
    assert status == 502, body
    assert metric(metrics(gateway), "sluicegate_upstream_all_unhealthy_total",
                  upstream="route-r1") >= 1


# -- control endpoint, metrics, reload ------------------------------------------------------
def test_healthcheck_endpoint_lists_every_checked_upstream(pair, start_checked):
    a, b = pair["a"], pair["b"]
    gateway = start_checked({
        "upstreams": [{"id": "shared", "nodes": {a.address: 1, b.address: 2},
                       "checks": {"active": {"type": "tcp", "healthy": FAST}}},
                      {"id": "plain", "nodes": {a.address: 1}}],
        "routes": [{"id": "r1", "uri": "/one", "upstream_id": "shared"},
                   {"id": "r2", "uri": "/two", "upstream_id": "shared"},
                   {"id": "r3", "uri": "/three", "upstream_id": "plain"}]})
    report = healthcheck(gateway)
    assert [u["name"] for u in report] == ["shared"]  # once, though two routes use it
    (shared,) = report
    assert shared["type"] == "tcp"
    assert shared["all_unhealthy_total"] == 0
    assert [(n["ip"], n["port"], n["status"]) for n in shared["nodes"]] == [
        ("127.0.0.1", a.port, "healthy"), ("127.0.0.1", b.port, "healthy")]
    assert set(shared["nodes"][0]["counter"]) == {
        "success", "http_failure", "tcp_failure", "timeout_failure"}
    assert healthcheck(gateway, "/v1/healthcheck/upstreams/shared") == shared
    status, body = fetch(gateway.metrics_port, "/v1/healthcheck/upstreams/plain")
    assert status == 404 and "plain" in json.loads(body)["error_msg"]
    text = metrics(gateway)
    assert metric(text, "sluicegate_upstream_node_healthy", upstream="shared",
                  node=b.address) == 1
    assert metric(text, "sluicegate_upstream_all_unhealthy_total", upstream="shared") == 0


def test_reload_keeps_the_state_of_an_unchanged_upstream(pair, start_checked):
    a, b = pair["a"], pair["b"]
    # Slow unhealthy probes: fresh state would need 2 x 0.5 s to find b down again.
    checks = {"active": {"type": "tcp", "healthy": FAST,
                         "unhealthy": {"interval": 0.5, "tcp_failures": 2}}}
    config = {"upstreams": [{"id": "u", "nodes": {a.address: 1, b.address: 1},
                             "checks": checks}],
              "routes": [{"id": "r1", "uri": "/*", "upstream_id": "u"}]}
    gateway = start_checked(config)
    b.stop()
    wait_until(lambda: node_status(gateway, "u", b.address) == "unhealthy", "b down",
               gateway)
    gateway.write_config({**gateway.config, "routes": [
        *config["routes"], {"id": "r2", "uri": "/other", "upstream_id": "u"}]})
    gateway.reload()
    wait_until(lambda: "config reloaded" in gateway.log(), "reloaded", gateway)
    assert node_status(gateway, "u", b.address) == "unhealthy"
    assert names(gateway, 6, "/other") == ["a"] * 6


def test_two_workers_report_health_through_the_supervisor(pair, start_checked):
    a, b = pair["a"], pair["b"]
    gateway = start_checked(checked_route([a, b], {"active": {
        "type": "tcp", "healthy": FAST, "unhealthy": FAST}}), workers=2)
    b.stop()
    wait_until(lambda: node_status(gateway, "route-r1", b.address) == "unhealthy",
               "b down in the merged report", gateway)
    text = metrics(gateway)
    assert metric(text, "sluicegate_upstream_node_healthy", node=b.address) == 0
    assert metric(text, "sluicegate_upstream_node_healthy", node=a.address) == 1


# -- retry_timeout ---------------------------------------------------------------------
class SlowDropper:
    """Accepts connections, waits, and closes them without answering; counts them."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.accepted = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Timer(self.delay, conn.close).start()

    def close(self) -> None:
        self.sock.close()


def test_retry_timeout_bounds_the_time_spent_retrying(start_gateway):
    sinks = [SlowDropper(0.5) for _ in range(3)]
    try:
        gateway = start_gateway({"routes": [
            {"id": "fast-giveup", "uri": "/limited", "upstream": {
                "nodes": {s.address: 1 for s in sinks}, "retries": 2, "retry_timeout": 0.3}},
            {"id": "patient", "uri": "/unlimited", "upstream": {
                "nodes": {s.address: 1 for s in sinks}, "retries": 2}}]})
        assert fetch(gateway.port, "/limited")[0] == 502
        assert sum(s.accepted for s in sinks) == 1  # 0.5 s > retry_timeout: no retry
        assert fetch(gateway.port, "/unlimited")[0] == 502
        assert sum(s.accepted for s in sinks) == 4  # every node tried
    finally:
        for sink in sinks:
            sink.close()


# -- config errors -----------------------------------------------------------------------
@pytest.mark.parametrize(("checks", "error"), [
    ({"passive": {}}, "routes[0].upstream.checks: needs 'active'"),
    ({"active": {"healthy": {"interval": 0}}},
     "routes[0].upstream.checks.active.healthy.interval: Input should be greater than"),
    ({"active": {"type": "udp"}}, "routes[0].upstream.checks.active.type: Input should be"),
    ({"active": {"unhealthy": {"http_statuses": [99]}}},
     "routes[0].upstream.checks.active.unhealthy.http_statuses[0]: Input should be greater"),
    ({"active": {"unhealthy": {"tcp_failures": 0}}},
     "routes[0].upstream.checks.active.unhealthy.tcp_failures: Input should be greater"),
    ({"active": {"healthy": {"successes": 255}}},
     "routes[0].upstream.checks.active.healthy.successes: Input should be less than"),
    ({"active": {}, "passive": {"unhealthy": {"timeouts": -1}}},
     "routes[0].upstream.checks.passive.unhealthy.timeouts: Input should be greater"),
    ({"active": {"req_headers": ["X-Bad\r\nInjected: 1"]}},
     "routes[0].upstream.checks.active.req_headers: "),
    ({"active": {"http_path": "health"}}, "routes[0].upstream.checks.active.http_path: "),
    ({"active": {"interval": 1}}, "routes[0].upstream.checks.active.interval: Extra inputs"),
])
def test_config_errors_name_the_field(checks, error):
    with pytest.raises(ConfigError) as caught:
        validate_config({"routes": [{"uri": "/*", "upstream": {
            "nodes": {"127.0.0.1:8080": 1}, "checks": checks}}]})
    assert any(line.startswith(error) for line in caught.value.errors), caught.value.errors


def test_checks_take_apisix_defaults():
    checks = UpstreamConfig.model_validate({"nodes": {"127.0.0.1:1": 1}, "checks": {
        "active": {}, "passive": {}}}).checks
    assert checks.active.type == "http" and checks.active.timeout == 1
    assert checks.active.concurrency == 10 and checks.active.http_path == "/"
    assert checks.active.healthy.model_dump() == {
        "interval": 1, "http_statuses": [200, 302], "successes": 2}
    assert checks.active.unhealthy.model_dump() == {
        "interval": 1, "http_statuses": [429, 404, 500, 501, 502, 503, 504, 505],
        "http_failures": 5, "tcp_failures": 2, "timeouts": 3}
    assert checks.passive.healthy.successes == 5
    assert checks.passive.unhealthy.model_dump() == {
        "http_statuses": [429, 500, 503], "http_failures": 5, "tcp_failures": 2,
        "timeouts": 7}


# -- the state machine and the balancer, in process ------------------------------------------
class NoVars:
    consumer_name = None

    def var(self, name: str) -> str | None:
        return None


def checked_upstream(nodes: dict[str, int], checks: dict[str, Any], **extra: Any) -> Upstream:
    return Upstream(UpstreamConfig.model_validate(
        {"nodes": nodes, "checks": checks, **extra}), "u")


def test_failures_must_come_in_a_row_and_successes_bring_a_node_back():
    upstream = checked_upstream({"10.0.0.1:80": 1, "10.0.0.2:80": 1}, {"active": {
        "healthy": {"successes": 2}, "unhealthy": {"http_failures": 3}}})
    health = upstream.health
    state = health.states["10.0.0.1:80"]
    for kind in (HTTP_FAILURE, HTTP_FAILURE, SUCCESS, HTTP_FAILURE, HTTP_FAILURE):
        health.probe_result(state, kind)
    assert state.healthy  # the success in between reset the count
    health.probe_result(state, HTTP_FAILURE)
    assert not state.healthy and health.down == {upstream.nodes[0]}
    health.probe_result(state, SUCCESS)
    health.probe_result(state, TCP_FAILURE)  # a failure resets the successes
    health.probe_result(state, SUCCESS)
    assert not state.healthy
    health.probe_result(state, SUCCESS)
    assert state.healthy and not health.down


def test_balancer_skips_unhealthy_nodes_and_uses_all_when_none_is_healthy():
    upstream = checked_upstream({"10.0.0.1:80": 1, "10.0.0.2:80": 1, "10.0.0.3:80": 1},
                                {"active": {"unhealthy": {"tcp_failures": 1}}})
    health, balancer = upstream.health, upstream.balancer
    assert isinstance(balancer, HealthCheckedBalancer)
    first, second, third = upstream.nodes
    ctx = NoVars()
    health.probe_result(health.states[second.address], TCP_FAILURE)
    picks = Counter(balancer.pick(ctx).address for _ in range(100))
    assert picks == {first.address: 50, third.address: 50}
    # A retry skips the tried node as well as the unhealthy one.
    assert balancer.pick(ctx, {first}) is third
    assert balancer.pick(ctx, {first, third}) is None
    for node in (first, third):
        health.probe_result(health.states[node.address], TCP_FAILURE)
    assert health.all_down
    assert len({balancer.pick(ctx) for _ in range(30)}) == 3 and health.fallbacks == 30


def test_passive_statuses_count_only_with_passive_checks():
    active_only = checked_upstream({"10.0.0.1:80": 1}, {"active": {}})
    node = active_only.nodes[0]
    for _ in range(10):
        active_only.health.passive_status(node, 500)
    assert not active_only.health.down
    both = checked_upstream({"10.0.0.1:80": 1}, {"active": {}, "passive": {
        "unhealthy": {"http_failures": 2, "timeouts": 1}}})
    node = both.nodes[0]
    both.health.passive_status(node, 500)
    both.health.passive_status(node, 404)  # in neither list: does not count
    assert not both.health.down
    both.health.passive_status(node, 503)
    assert both.health.down == {node}


def test_unchecked_upstreams_keep_their_plain_balancer():
    upstream = Upstream(UpstreamConfig.model_validate({"nodes": {"10.0.0.1:80": 1,
                                                                 "10.0.0.2:80": 1}}), "u")
    assert upstream.health is None
    assert type(upstream.balancer) is type(make_balancer("roundrobin", upstream.nodes))


@pytest.mark.parametrize(("line", "status"), [
    (b"HTTP/1.1 200 OK\r\n", 200), (b"HTTP/1.0 503\r\n", 503), (b"SSH-2.0-OpenSSH\r\n", None),
    (b"HTTP/1.1 20 OK\r\n", None), (b"", None)])
def test_probe_status_line_parsing(line, status):
    assert parse_status_line(line) == status


def test_one_state_per_upstream_and_reloads_carry_it_over():
    checks = {"active": {"type": "tcp", "unhealthy": {"tcp_failures": 1}}}
    # A service's inline upstream is compiled once per route: both copies share one state.
    config = validate_config({
        "services": [{"id": "s", "upstream": {"nodes": {"10.0.0.1:80": 1, "10.0.0.2:80": 1},
                                              "checks": checks}}],
        "routes": [{"id": "r1", "uri": "/a", "service_id": "s"},
                   {"id": "r2", "uri": "/b", "service_id": "s"}]}).config

    async def scenario() -> None:
        checkers = HealthCheckers()
        first = compile_snapshot(config, PluginEnv())
        checkers.attach(first)
        assert [h.id for h in checkers.checked] == ["service-s"] and len(checkers.probing) == 1
        health = checkers.checked[0]
        r1, r2 = (route.upstream for route in first.routes)
        assert r1 is not r2 and r1.health is health and r2.health is health
        health.probe_result(health.states["10.0.0.2:80"], TCP_FAILURE)
        for upstream in (r1, r2):
            assert {upstream.balancer.pick(NoVars()).address for _ in range(4)} == {
                "10.0.0.1:80"}
        second = compile_snapshot(config, PluginEnv(), version=2)
        checkers.attach(second)
        carried = checkers.checked[0]
        assert carried is not health and not carried.states["10.0.0.2:80"].healthy
        assert second.routes[0].upstream.balancer.pick(NoVars(), None).address == "10.0.0.1:80"
        checkers.stop()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not checkers.tasks  # probe tasks ended, none leaked

    asyncio.run(scenario())
