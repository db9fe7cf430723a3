"""What a running gateway says about itself: /metrics, the dashboard's JSON, its log. The
dashboard tests compare what the page shows with these."""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from harness import Gateway

ADMIN_KEY = "dashboard-test-key-0123456789"
T = TypeVar("T")


def dashboard_config(routes: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    """A config with request metrics on every route (a global prometheus rule) and the test
    admin key; the harness puts the dashboard on a port the kernel picks (see
    `dashboard_port`)."""
    config: dict[str, Any] = {
        "admin": {"key": ADMIN_KEY},
        "global_rules": [{"id": "metrics", "plugins": {"prometheus": {}}}],
        "routes": routes,
    }
    config.update(sections)
    return config


def dashboard_port(gateway: Gateway, timeout: float = 20.0) -> int:
    """The dashboard's port, from the gateway's log line `dashboard on http://...:PORT/`."""
    return int(wait_for_log(gateway, r"dashboard on http://\S+?:(\d+)/", timeout).group(1))


def wait_for_log(gateway: Gateway, pattern: str, timeout: float = 20.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, gateway.log())
        if found:
            return found
        if gateway.process.poll() is not None:
            raise RuntimeError(f"gateway exited with {gateway.process.returncode}:\n"
                               f"{gateway.log()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{pattern!r} not in the gateway log:\n{gateway.log()}")
        time.sleep(0.05)


def http_get(port: int, path: str, headers: dict[str, str] | None = None
             ) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def dashboard_json(port: int, what: str, key: str | None = ADMIN_KEY) -> tuple[int, Any]:
    status, _, body = http_get(port, f"/apisix/admin/dashboard/{what}",
                               {"X-API-KEY": key} if key is not None else {})
    return status, json.loads(body) if body else None


def metrics_text(gateway: Gateway) -> str:
    status, _, body = http_get(gateway.metrics_port, "/metrics")
    assert status == 200, body
    return body.decode()


def requests_by_route(text: str) -> dict[str, int]:
    """sluicegate_http_requests_total summed by route, as Prometheus would sum it."""
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "sluicegate_http_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                route = sample.labels["route"]
                counts[route] = counts.get(route, 0) + int(sample.value)
    return counts


def requests_by_route_and_code(text: str, route: str, code_prefix: str) -> int:
    total = 0
    for family in text_string_to_metric_families(text):
        if family.name == "sluicegate_http_requests":
            total += sum(int(s.value) for s in family.samples if s.name.endswith("_total")
                         and s.labels["route"] == route
                         and s.labels["code"].startswith(code_prefix))
    return total


def send(gateway: Gateway, path: str, times: int = 1) -> list[int]:
    """`times` GETs on one keep-alive connection; the statuses."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    statuses = []
    try:
        for _ in range(times):
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        connection.close()
    return statuses


def eventually(check: Callable[[], T], timeout: float, interval: float = 0.2,
               what: str = "condition") -> T:
    """The first truthy result of `check` within `timeout` seconds, else AssertionError
    with the last result."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not reached in {timeout}s (last: {last!r})")
