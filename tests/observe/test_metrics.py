"""`/metrics` as Prometheus scrapes it from a running gateway."""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import Gateway, wait_for_port

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def scrape(gateway: Any) -> str:
    # The metrics listener opens just after the traffic port the harness waits for.
    wait_for_port(gateway.metrics_port, timeout=5)
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        # The Prometheus text format (0.0.4, or 1.0.0 from newer prometheus_client).
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        return response.read().decode()


def samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Samples called `name` whose labels include `labels`."""
    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                found.append((sample.labels, sample.value))
    return found


def total(text: str, name: str, **labels: str) -> float:
    return sum(value for _, value in samples(text, name, **labels))


def send(gateway: Any, path: str, method: str = "GET", body: bytes | None = None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def metered(nginx: Any, echo: Any) -> dict[str, Any]:
    nodes = {"nodes": {nginx.address: 1}}
    return {"routes": [
        {"id": "ok", "uri": "/", "upstream": nodes, "plugins": {"prometheus": {}}},
        {"id": "codes", "uri": "/status/*", "upstream": nodes, "plugins": {"prometheus": {}}},
        {"id": "slow", "uri": "/slow", "upstream": {"nodes": {echo.address: 1}},
         "plugins": {"prometheus": {}}},
        # The echo upstream reads the whole request body before answering (nginx's
        # `return` may answer first).
        {"id": "upload", "uri": "/upload", "upstream": {"nodes": {echo.address: 1}},
         "plugins": {"prometheus": {}}},
    ]}


@pytest.fixture(scope="module")
def traffic(nginx, echo, tmp_path_factory) -> Iterator[tuple[Any, str]]:
    """A gateway after a known set of requests, and its /metrics text (one gateway for the
    tests that only read that text)."""
    gateway = Gateway(tmp_path_factory.mktemp("metrics"), metered(nginx, echo))
    try:
        yield gateway, run_traffic(gateway)
    finally:
        gateway.stop()


def run_traffic(gateway: Any) -> str:
    for _ in range(7):
        assert send(gateway, "/") == 200
    for _ in range(2):
        assert send(gateway, "/upload", "POST", b"x" * 100) == 200
    for _ in range(4):
        assert send(gateway, "/status/404") == 404
    for _ in range(2):
        assert send(gateway, "/status/503") == 503
    assert send(gateway, "/slow?delay=0.3") == 200
    return scrape(gateway)


def test_requests_are_counted_by_route_and_status(traffic):
    _, text = traffic
    counts = {(labels["route"], labels["code"]): value
              for labels, value in samples(text, "sluicegate_http_requests_total")}
    assert counts == {("ok", "200"): 7, ("codes", "404"): 4, ("codes", "503"): 2,
                      ("slow", "200"): 1, ("upload", "200"): 2}


def test_request_counts_carry_node_and_empty_service_and_consumer(traffic, nginx):
    _, text = traffic
    ((labels, value),) = samples(text, "sluicegate_http_requests_total", route="ok")
    assert value == 7
    assert labels["node"] == nginx.address
    assert labels["service"] == ""
    assert labels["consumer"] == ""


def test_latency_histogram_counts_every_request(traffic):
    _, text = traffic
    for route, count in (("ok", 7), ("codes", 6), ("slow", 1), ("upload", 2)):
        assert total(text, "sluicegate_http_latency_seconds_count", type="request",
                     route=route) == count
        assert total(text, "sluicegate_http_latency_seconds_count", type="upstream",
                     route=route) == count
        buckets = samples(text, "sluicegate_http_latency_seconds_bucket", type="request",
                          route=route)
        by_bound = {labels["le"]: value for labels, value in buckets}
        assert by_bound["+Inf"] == count
        ordered = sorted(by_bound.items(), key=lambda item: float(item[0]))
        values = [value for _, value in ordered]
        assert values == sorted(values)  # cumulative


def test_latency_histogram_puts_a_slow_request_in_the_right_bucket(traffic):
    _, text = traffic
    buckets = {labels["le"]: value for labels, value in
               samples(text, "sluicegate_http_latency_seconds_bucket", type="request",
                       route="slow")}
    assert buckets["0.2"] == 0
    assert buckets["0.5"] == 1
    assert total(text, "sluicegate_http_latency_seconds_sum", type="request",
                 route="slow") >= 0.3


def test_bandwidth_counts_body_bytes_both_ways(traffic, nginx):
    _, text = traffic
    assert total(text, "sluicegate_bandwidth_bytes_total", type="egress",
                 route="ok") == 7 * len(nginx.BODY)
    assert total(text, "sluicegate_bandwidth_bytes_total", type="ingress", route="ok") == 0
    assert total(text, "sluicegate_bandwidth_bytes_total", type="ingress",
                 route="upload") == 200
    assert total(text, "sluicegate_bandwidth_bytes_total", type="ingress", route="codes") == 0


def test_upstream_responses_are_counted_by_node_and_status(traffic, nginx, echo):
    _, text = traffic
    counts = {(labels["node"], labels["code"]): value
              for labels, value in samples(text, "sluicegate_upstream_responses_total")}
    assert counts == {(nginx.address, "200"): 7, (nginx.address, "404"): 4,
                      (nginx.address, "503"): 2, (echo.address, "200"): 3}


def test_metrics_pass_promtool_check(traffic):
    _, text = traffic
    if not os.path.exists(PROMTOOL):
        pytest.fail("promtool is not installed: install Debian's `prometheus` package "
                    "(`make test` does: apt-get install prometheus)")
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", \
        result.stdout + result.stderr


def test_unmatched_requests_are_counted_as_404_with_a_global_rule(nginx, start_gateway):
    gateway = start_gateway({
        "global_rules": [{"id": "metrics", "plugins": {"prometheus": {}}}],
        "routes": [{"id": "ok", "uri": "/", "upstream": {"nodes": {nginx.address: 1}}}]})
    assert send(gateway, "/") == 200
    for path in ("/missing", "/also/missing", "/x?y=1"):
        assert send(gateway, path) == 404
    text = scrape(gateway)
    counts = {(labels["route"], labels["code"]): value
              for labels, value in samples(text, "sluicegate_http_requests_total")}
    assert counts == {("ok", "200"): 1, ("", "404"): 3}
    assert total(text, "sluicegate_http_latency_seconds_count", type="request",
                 route="") == 3
    # No upstream was asked for the 404s.
    assert total(text, "sluicegate_upstream_responses_total") == 1


def test_metrics_count_requests_made_since_the_last_scrape(nginx, echo, start_gateway):
    gateway = start_gateway(metered(nginx, echo))
    send(gateway, "/")
    assert total(scrape(gateway), "sluicegate_http_requests_total", route="ok") == 1
    send(gateway, "/")
    send(gateway, "/")
    assert total(scrape(gateway), "sluicegate_http_requests_total", route="ok") == 3


def test_metrics_endpoint_answers_404_elsewhere(nginx, echo, start_gateway):
    gateway = start_gateway(metered(nginx, echo))
    wait_for_port(gateway.metrics_port, timeout=5)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/other", timeout=10)
    assert caught.value.code == 404


def test_no_metrics_listener_without_the_prometheus_plugin(nginx, start_gateway):
    gateway = start_gateway({"routes": [
        {"id": "ok", "uri": "/", "upstream": {"nodes": {nginx.address: 1}}}]})
    assert send(gateway, "/") == 200
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5)
