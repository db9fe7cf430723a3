"""The dashboard page in headless Chromium against a running gateway: what an operator
sees must be what /metrics and the health checks say."""

from __future__ import annotations

import http.client
import threading
import time
from typing import Any

import pytest

from dashboard.browser import PageWatch
from dashboard.views import (
    ADMIN_KEY,
    dashboard_config,
    dashboard_port,
    eventually,
    metrics_text,
    requests_by_route,
    requests_by_route_and_code,
    send,
)
from harness import EchoUpstream
from sluicegate.dashboard.stats import RATE_WINDOW

# Active checks in the health test: probe every second, one failed connect is enough.
CHECK_INTERVAL = 1.0
TCP_FAILURES = 1
# The page polls stats every second; allow two polls and a second of scheduling slack.
PAGE_LAG = 3.0


def shown_number(page: Any, selector: str) -> int | None:
    text = page.locator(selector).first.text_content(timeout=1000) or ""
    digits = text.replace(",", "").strip()
    return int(digits) if digits.isdigit() else None


def open_dashboard(watch: PageWatch, port: int, key: str = ADMIN_KEY) -> None:
    page = watch.page
    page.goto(f"http://127.0.0.1:{port}/")
    page.locator("#key-dialog").wait_for(state="visible")
    page.fill("#key-input", key)
    page.click("#key-submit")


def test_page_asks_for_the_key_and_refuses_a_wrong_one(nginx, start_gateway, watched_page,
                                                       artifacts):
    gateway = start_gateway(dashboard_config([{"id": "r1", "uri": "/",
                                               "upstream": {"nodes": {nginx.address: 1}}}]))
    watch = watched_page
    open_dashboard(watch, dashboard_port(gateway), key="not-the-key")
    error = watch.page.locator("#key-error")
    error.wait_for(state="visible")
    assert "refused the key" in (error.text_content() or "")
    # The wrong key is not kept: a reload asks again.
    watch.page.reload()
    watch.page.locator("#key-dialog").wait_for(state="visible")
    watch.page.fill("#key-input", ADMIN_KEY)
    watch.page.click("#key-submit")
    watch.page.locator("#key-dialog").wait_for(state="hidden")
    watch.page.locator('#routes tr[data-route="r1"]').wait_for()
    # The right key is kept for this tab: a reload goes straight to the dashboard.
    watch.page.reload()
    watch.page.locator('#routes tr[data-route="r1"]').wait_for()
    assert not watch.page.locator("#key-dialog").is_visible()
    # Chromium logs each refused request (401) as a console error; nothing else may fail.
    assert [e for e in watch.errors if "401" not in e] == []
    assert watch.outside == []


@pytest.mark.parametrize("workers", [1, 2])
def test_page_shows_the_request_counts_of_metrics(nginx, start_gateway, watched_page,
                                                  artifacts, workers):
    upstream = {"nodes": {nginx.address: 1}}
    gateway = start_gateway(dashboard_config(
        [{"id": "home", "uri": "/", "upstream": upstream, "plugins": {"proxy-rewrite": {}}},
         {"id": "broken", "uri": "/status/*", "upstream": upstream}]), workers=workers)
    watch = watched_page
    open_dashboard(watch, dashboard_port(gateway))
    page = watch.page
    page.locator('#routes tr[data-route="home"]').wait_for()
    assert send(gateway, "/", 37) == [200] * 37
    assert send(gateway, "/status/500", 6) == [500] * 6
    assert send(gateway, "/status/404", 2) == [404] * 2
    counted = requests_by_route(metrics_text(gateway))
    assert counted == {"home": 37, "broken": 8}
    for route, expected in counted.items():
        eventually(lambda route=route, expected=expected: shown_number(
            page, f'#routes tr[data-route="{route}"] td.requests') == expected,
            timeout=PAGE_LAG + 2, what=f"route {route} shows {expected} requests")
    text = metrics_text(gateway)
    assert shown_number(page, '#routes tr[data-route="broken"] td.errors') == \
        requests_by_route_and_code(text, "broken", "5") == 6
    assert shown_number(page, '#routes tr[data-route="home"] td.errors') == 0
    # The route's plugins, from the config.
    assert page.locator('#routes tr[data-route="home"] .tag').all_text_contents() == \
        ["proxy-rewrite"]
    # Live rates: requests go on while the page draws them. The share is over the last
    # RATE_WINDOW seconds, which still hold the two 404s at first: it reaches 100.0 once
    # they left it, as long as 500s keep coming (so the traffic runs until it did).
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            send(gateway, "/status/500", 5)
            send(gateway, "/", 5)
            time.sleep(0.1)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        rate = page.locator('#routes tr[data-route="broken"] td.error-rate')
        eventually(lambda: rate.text_content() == "100.0",
                   timeout=RATE_WINDOW + PAGE_LAG + 2, what="the 5xx share of route broken")
        eventually(lambda: page.locator("#chart-rps .u-legend").count() == 1 and
                   "home" in (page.locator("#chart-rps .u-legend").text_content() or ""),
                   timeout=PAGE_LAG, what="a chart line for route home")
    finally:
        stop.set()
        sender.join(10)
    assert page.locator("#chart-rps canvas").count() == 1
    page.screenshot(path=str(artifacts / f"traffic-{workers}-workers.png"), full_page=True)
    assert watch.errors == []
    assert watch.outside == []


def test_page_shows_a_killed_upstream_unhealthy_within_the_check_interval(
        nginx, start_gateway, watched_page, artifacts):
    doomed = EchoUpstream(name="doomed")
    try:
        checks = {"active": {"type": "http", "http_path": "/", "timeout": 1,
                             "healthy": {"interval": CHECK_INTERVAL, "successes": 1},
                             "unhealthy": {"interval": CHECK_INTERVAL,
                                           "tcp_failures": TCP_FAILURES}}}
        gateway = start_gateway(dashboard_config(
            [{"id": "r1", "uri": "/", "upstream_id": "pool"}],
            upstreams=[{"id": "pool", "nodes": {nginx.address: 1, doomed.address: 1},
                        "checks": checks}]))
        watch = watched_page
        open_dashboard(watch, dashboard_port(gateway))
        page = watch.page
        node = page.locator(f'#upstreams tr[data-upstream="pool"] '
                            f'[data-node="{doomed.address}"]')
        survivor = page.locator(f'#upstreams tr[data-upstream="pool"] '
                                f'[data-node="{nginx.address}"]')
        eventually(lambda: node.get_attribute("data-health") == "healthy",
                   timeout=CHECK_INTERVAL + PAGE_LAG + 5, what="the node healthy at first")
        doomed.stop()
        killed_at = time.monotonic()
        # Unhealthy after TCP_FAILURES failed probes, one an interval; the probe that finds
        # the node gone may wait its timeout; then the page's next poll.
        limit = CHECK_INTERVAL * TCP_FAILURES + checks["active"]["timeout"] + PAGE_LAG
        eventually(lambda: node.get_attribute("data-health") == "unhealthy",
                   timeout=limit, interval=0.1, what="the killed node shown unhealthy")
        took = time.monotonic() - killed_at
        assert "unhealthy" in (node.text_content() or "")
        assert survivor.get_attribute("data-health") == "healthy"
        page.screenshot(path=str(artifacts / "upstream-unhealthy.png"), full_page=True)
        assert took <= limit
        assert watch.errors == []
        assert watch.outside == []
    finally:
        doomed.stop()


def test_page_served_by_the_admin_api_works_too(nginx, start_gateway, watched_page):
    from admin.client import admin_port

    gateway = start_gateway(dashboard_config([{"id": "r1", "uri": "/",
                                               "upstream": {"nodes": {nginx.address: 1}}}]))
    watch = watched_page
    watch.page.goto(f"http://127.0.0.1:{admin_port(gateway)}/dashboard")
    watch.page.locator("#key-dialog").wait_for(state="visible")
    assert watch.page.url.endswith("/dashboard/")
    watch.page.fill("#key-input", ADMIN_KEY)
    watch.page.click("#key-submit")
    send(gateway, "/", 3)
    eventually(lambda: shown_number(watch.page, '#routes tr[data-route="r1"] td.requests')
               == 3, timeout=PAGE_LAG + 2, what="route r1 shows 3 requests")
    assert watch.errors == []
    assert watch.outside == []


def test_page_shows_ai_token_usage_per_model_and_consumer(start_gateway, watched_page,
                                                          artifacts):
    import json

    from ai.gateways import ai_route, samples
    from servers.fake_llm import FakeLLM

    fake = FakeLLM(api_key="sk-provider-4f7c2a9e1b").start()
    try:
        plugins = {"ai-proxy": ai_route("openai", f"{fake.url}/v1"), "key-auth": {}}
        gateway = start_gateway(dashboard_config(
            [{"id": "llm", "uri": "/v1/*", "plugins": plugins}],
            consumers=[{"username": user, "plugins": {"key-auth": {"key": f"{user}-key"}}}
                       for user in ("alice", "bob")]))
        asked = (("alice", "gpt-4o-mini", "say hello to the dashboard"),
                 ("bob", "gpt-4o", "one two three four five six"),
                 ("bob", "gpt-4o", "again"))
        for user, model, text in asked:
            body = json.dumps({"model": model, "messages": [{"role": "user",
                                                              "content": text}]})
            connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
            connection.request("POST", "/v1/chat/completions", body=body,
                               headers={"apikey": f"{user}-key",
                                        "Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200, response.read()
            response.read()
            connection.close()
        expected: dict[tuple[str, str], dict[str, int]] = {}
        for labels, value in samples(metrics_text(gateway), "sluicegate_ai_tokens_total"):
            row = expected.setdefault((labels["model"], labels["consumer"]),
                                      {"prompt": 0, "completion": 0})
            row[labels["type"]] += int(value)
        assert set(expected) == {("gpt-4o-mini", "alice"), ("gpt-4o", "bob")}
        watch = watched_page
        open_dashboard(watch, dashboard_port(gateway))
        page = watch.page
        for (model, consumer), tokens in expected.items():
            row = f'#ai-tokens tr[data-model="{model}"][data-consumer="{consumer}"]'
            page.locator(row).wait_for(timeout=(PAGE_LAG + 6) * 1000)
            for kind, value in tokens.items():
                assert value > 0
                assert shown_number(page, f"{row} td.{kind}") == value
        page.locator("#ai").screenshot(path=str(artifacts / "ai-tokens.png"))
        assert watch.errors == []
        assert watch.outside == []
    finally:
        fake.stop()
