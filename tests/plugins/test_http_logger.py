"""http-logger: batches of access log entries POSTed to a collector (APISIX options), with a
bounded queue that drops and counts entries while the collector is down or slow, never
holding up requests. End to end: a real gateway, nginx upstream, and a collector HTTP server
on loopback (tests/servers/log_collector.py)."""

from __future__ import annotations

import http.client
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness import Gateway, Nginx, wait_for_port
from servers.log_collector import LogCollector
from sluicegate.config.load import ConfigError, validate_config
from sluicegate.plugins.base import PluginEnv, validate_plugin
from sluicegate.plugins.http_logger import HttpLogger

FIELDS = {"time", "client_ip", "method", "uri", "host", "status", "upstream_status",
          "upstream_addr", "route_id", "consumer", "request_id", "latency_ms",
          "upstream_latency_ms", "bytes_sent", "bytes_received", "user_agent"}
# Timers that never fire during a test: only the behaviour under test sends.
NEVER = 3600


@pytest.fixture
def collector() -> Iterator[LogCollector]:
    server = LogCollector()
    yield server
    server.stall = False
    server.stop()


@pytest.fixture
def start_logged(start_gateway: Callable[..., Gateway], nginx: Nginx
                 ) -> Callable[..., Gateway]:
    """A gateway with one route to nginx carrying http-logger (these options) and
    prometheus; waits for /metrics too."""

    def start(**logger: Any) -> Gateway:
        gateway = start_gateway({"routes": [{"id": "r1", "uri": "/*", "upstream": {
            "nodes": {nginx.address: 1}}, "plugins": {"http-logger": logger,
                                                      "prometheus": {}}}]})
        wait_for_port(gateway.metrics_port, process=gateway.process)
        return gateway

    return start


def get(port: int, path: str = "/", headers: dict[str, str] | None = None,
        timeout: float = 5) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def requests(gateway: Gateway, count: int, path: str = "/") -> list[int]:
    """`count` GETs on one keep-alive connection; a client timeout far below any stalled
    collector's, so a request held up by logging fails the test."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    statuses = []
    try:
        for _ in range(count):
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        connection.close()
    return statuses


def metric(gateway: Gateway, family: str, **labels: str) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.metrics_port, timeout=5)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    for line in text.splitlines():
        match = re.fullmatch(rf"{family}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


def wait_for_metric(gateway: Gateway, family: str, at_least: float, **labels: str) -> float:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        value = metric(gateway, family, **labels)
        if value >= at_least:
            return value
        time.sleep(0.05)
    pytest.fail(f"{family}{labels} stayed below {at_least}; log:\n{gateway.log()}")


# -- batching ------------------------------------------------------------------------------
def test_http_logger_posts_batches_of_batch_max_size(collector, start_logged):
    gateway = start_logged(uri=collector.url, batch_max_size=3, inactive_timeout=NEVER,
                           buffer_duration=NEVER)
    assert requests(gateway, 6, "/?page=2") == [200] * 6
    entries = collector.wait_for_entries(6)
    assert [len(post.entries()) for post in collector.posts] == [3, 3]
    post = collector.posts[0]
    assert post.path == "/logs"
    assert post.headers["content-type"] == "application/json"
    assert post.body.startswith(b"[{")
    first = entries[0]
    assert set(first) == FIELDS
    assert (first["method"], first["uri"], first["status"]) == ("GET", "/", 200)
    assert first["upstream_addr"] and first["route_id"] == "r1"


@pytest.mark.parametrize("timer", ["inactive_timeout", "buffer_duration"])
def test_http_logger_sends_a_partial_batch_when_a_timer_fires(collector, start_logged, timer):
    gateway = start_logged(uri=collector.url, batch_max_size=100,
                           **{"inactive_timeout": NEVER, "buffer_duration": NEVER,
                              timer: 0.3})
    assert requests(gateway, 2) == [200, 200]
    collector.wait_for_entries(2)
    (post,) = collector.posts
    assert len(post.entries()) == 2


def test_http_logger_new_line_sends_one_json_object_per_line(collector, start_logged):
    gateway = start_logged(uri=collector.url, batch_max_size=3, concat_method="new_line")
    assert requests(gateway, 3) == [200] * 3
    collector.wait_for_entries(3)
    (post,) = collector.posts
    assert post.headers["content-type"] == "text/plain"
    lines = post.body.split(b"\n")
    assert len(lines) == 3 and all(line.startswith(b"{") for line in lines)


def test_http_logger_sends_a_batch_of_one_as_a_bare_object(collector, start_logged):
    # APISIX does the same: collectors written for it expect an object here.
    gateway = start_logged(uri=collector.url, batch_max_size=1)
    get(gateway.port)
    collector.wait_for_entries(1)
    assert collector.posts[0].body.startswith(b"{")


def test_http_logger_sends_auth_header_as_authorization(collector, start_logged):
    gateway = start_logged(uri=collector.url, batch_max_size=1,
                           auth_header="Bearer collector-token")
    get(gateway.port)
    collector.wait_for_entries(1)
    assert collector.posts[0].headers["authorization"] == "Bearer collector-token"
    assert b"collector-token" not in collector.posts[0].body


def test_http_logger_never_sends_credentials(collector, start_logged):
    gateway = start_logged(uri=collector.url, batch_max_size=1)
    assert get(gateway.port, "/?apikey=qs-secret-1&password=qs-secret-2", headers={
        "Authorization": "Basic dXNlcjpwdy1zZWNyZXQtMw==", "apikey": "hdr-secret-4",
        "Cookie": "session=cookie-secret-5", "X-Api-Key": "hdr-secret-6"}) == 200
    collector.wait_for_entries(1)
    body = collector.posts[0].body.decode()
    for secret in ("qs-secret-1", "qs-secret-2", "dXNlcjpw", "hdr-secret-4",
                   "cookie-secret-5", "hdr-secret-6", "apikey", "password", "Authorization"):
        assert secret not in body


def test_http_logger_includes_the_response_body_when_asked(collector, start_logged):
    gateway = start_logged(uri=collector.url, batch_max_size=2, include_resp_body=True,
                           max_resp_body_bytes=12)
    assert requests(gateway, 2) == [200, 200]
    entries = collector.wait_for_entries(2)
    assert [entry["resp_body"] for entry in entries] == [Nginx.BODY[:12]] * 2


# -- a collector that is down, slow or refusing -----------------------------------------------
def test_http_logger_collector_down_drops_and_counts_then_resumes(collector, start_logged):
    gateway = start_logged(uri=collector.url, batch_max_size=1, name="audit")
    collector.stop()
    assert requests(gateway, 10) == [200] * 10
    dropped = wait_for_metric(gateway, "sluicegate_http_logger_dropped_total", 10,
                              name="audit", reason="send_failed")
    assert dropped == 10
    assert metric(gateway, "sluicegate_http_logger_failed_batches_total", name="audit") == 10
    assert "http-logger 'audit': dropped a batch" in gateway.log()

    collector.start()  # same port
    assert requests(gateway, 3) == [200] * 3
    assert len(collector.wait_for_entries(3)) == 3
    assert wait_for_metric(gateway, "sluicegate_http_logger_sent_entries_total", 3,
                           name="audit") == 3
    assert metric(gateway, "sluicegate_http_logger_sent_batches_total", name="audit") == 3
    assert "'audit': the collector accepts batches again" in gateway.log()


def test_http_logger_queue_is_bounded_while_the_collector_stalls(collector, start_logged):
    collector.stall = True  # accepts the POST, never answers while set
    gateway = start_logged(uri=collector.url, batch_max_size=1, max_pending_entries=5,
                           timeout=60, name="slow")
    # The client's 5 s timeout is far below the logger's 60: these complete only because
    # the log phase never waits for the collector.
    assert requests(gateway, 30) == [200] * 30
    dropped = wait_for_metric(gateway, "sluicegate_http_logger_dropped_total", 24,
                              name="slow", reason="queue_full")
    assert dropped in (24, 25)  # 5 wait, 1 in flight (unless still queued at the time)
    collector.stall = False
    entries = collector.wait_for_entries(30 - int(dropped))
    assert len(entries) == 30 - dropped


def test_http_logger_retries_a_refused_batch_max_retry_count_times(collector, start_logged):
    gateway = start_logged(uri=collector.url, batch_max_size=1, max_retry_count=2,
                           retry_delay=0.1, name="retrying")
    collector.fail_next(2, status=500)
    get(gateway.port)
    collector.wait_for_entries(1)
    assert [post.status for post in collector.posts] == [500, 500, 200]
    assert collector.posts[0].body == collector.posts[2].body
    assert wait_for_metric(gateway, "sluicegate_http_logger_sent_batches_total", 1,
                           name="retrying") == 1
    assert metric(gateway, "sluicegate_http_logger_dropped_total", name="retrying") == 0


def test_http_logger_drops_a_batch_refused_more_than_max_retry_count(collector, start_logged):
    gateway = start_logged(uri=collector.url, batch_max_size=1, max_retry_count=1,
                           retry_delay=0.1, name="giving-up")
    collector.fail_next(2, status=503)
    get(gateway.port)
    assert wait_for_metric(gateway, "sluicegate_http_logger_failed_batches_total", 1,
                           name="giving-up") == 1
    assert metric(gateway, "sluicegate_http_logger_dropped_total", name="giving-up",
                  reason="send_failed") == 1
    assert [post.status for post in collector.posts] == [503, 503]
    get(gateway.port)  # the next batch goes through
    assert len(collector.wait_for_entries(1)) == 1


def test_http_logger_sends_queued_entries_when_the_gateway_stops(collector, start_logged):
    gateway = start_logged(uri=collector.url, batch_max_size=100, inactive_timeout=NEVER,
                           buffer_duration=NEVER)
    assert requests(gateway, 4) == [200] * 4
    assert collector.posts == []
    assert gateway.stop() == 0
    assert len(collector.wait_for_entries(4)) == 4
    log = gateway.log_path.read_text()
    assert "Traceback" not in log and "Unclosed" not in log


def test_http_logger_stop_is_not_held_up_by_a_stalled_collector(collector, start_logged):
    collector.stall = True
    gateway = start_logged(uri=collector.url, batch_max_size=1, timeout=60)
    assert requests(gateway, 2) == [200, 200]
    # The harness kills a gateway that takes over 15 s; a clean exit means the last
    # flush gave up well before the logger's 60 s timeout.
    assert gateway.stop() == 0


# -- config ---------------------------------------------------------------------------------
def test_http_logger_takes_apisix_defaults():
    model, _, errors = validate_plugin("http-logger", {"uri": "http://127.0.0.1:1/"},
                                       "plugins.http-logger")
    assert errors == []
    assert (model.timeout, model.name, model.batch_max_size, model.inactive_timeout,
            model.buffer_duration, model.max_retry_count, model.retry_delay,
            model.concat_method, model.ssl_verify, model.include_req_body,
            model.include_resp_body) == (3, "http logger", 1000, 5, 60, 0, 1, "json", True,
                                         False, False)


def test_http_logger_instances_with_the_same_options_share_one_queue():
    conf = {"uri": "http://127.0.0.1:1/shared", "batch_max_size": 7}
    first, second, other = (HttpLogger(validate_plugin("http-logger", c,
                                                       "plugins.http-logger")[0], PluginEnv())
                            for c in (conf, dict(conf), {**conf, "batch_max_size": 8}))
    assert first.sender is second.sender
    assert other.sender is not first.sender


@pytest.mark.parametrize(("conf", "error"), [
    ({}, "routes[0].plugins.http-logger.uri: Field required"),
    ({"uri": "ftp://logs.example/"},
     "routes[0].plugins.http-logger.uri: must be an http:// or https:// URL"),
    ({"uri": "http:///path"}, "routes[0].plugins.http-logger.uri: must be an http://"),
    ({"uri": "http://logs:notaport/"}, "routes[0].plugins.http-logger.uri: not a URL"),
    ({"uri": "http://logs/", "batch_max_size": 0},
     "routes[0].plugins.http-logger.batch_max_size: Input should be greater"),
    ({"uri": "http://logs/", "concat_method": "csv"},
     "routes[0].plugins.http-logger.concat_method: Input should be 'json' or 'new_line'"),
    ({"uri": "http://logs/", "include_req_body": True},
     "routes[0].plugins.http-logger.include_req_body: not supported"),
    ({"uri": "http://logs/", "auth_header": "a\r\nX-Injected: 1"},
     "routes[0].plugins.http-logger.auth_header: must be one line"),
    ({"uri": "http://logs/", "timeout": 0},
     "routes[0].plugins.http-logger.timeout: Input should be greater"),
    ({"uri": "http://logs/", "max_pending_entries": 0},
     "routes[0].plugins.http-logger.max_pending_entries: Input should be greater"),
    ({"uri": "http://logs/", "log_format": {}},
     "routes[0].plugins.http-logger.log_format: Extra inputs"),
])
def test_http_logger_bad_config_names_the_field(conf, error):
    with pytest.raises(ConfigError) as caught:
        validate_config({"routes": [{"uri": "/*", "upstream": {"nodes": {"127.0.0.1:1": 1}},
                                     "plugins": {"http-logger": conf}}]})
    assert any(line.startswith(error) for line in caught.value.errors), caught.value.errors
