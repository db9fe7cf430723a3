"""The dashboard's HTTP side on a running gateway: who may read it, where it is served,
and that its JSON says what /metrics and the config say."""

from __future__ import annotations

import http.client
import re
import socket
import time

import pytest
import yaml

from admin.client import admin_port
from dashboard.views import (
    ADMIN_KEY,
    dashboard_config,
    dashboard_json,
    dashboard_port,
    eventually,
    http_get,
    metrics_text,
    requests_by_route,
    send,
    wait_for_log,
)
from harness import ROOT, free_port


def one_route(nginx, **route) -> list[dict]:
    return [{"id": "r1", "uri": "/*", "upstream": {"nodes": {nginx.address: 1}}, **route}]


def test_dashboard_json_needs_the_admin_key(nginx, start_gateway):
    port = dashboard_port(start_gateway(dashboard_config(one_route(nginx))))
    for what in ("summary", "stats"):
        assert dashboard_json(port, what, key=None)[0] == 401
        assert dashboard_json(port, what, key="wrong")[0] == 401
        assert dashboard_json(port, what)[0] == 200


def test_dashboard_page_loads_without_a_key_and_only_from_the_gateway(nginx, start_gateway):
    port = dashboard_port(start_gateway(dashboard_config(one_route(nginx))))
    status, headers, body = http_get(port, "/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b'id="key-form"' in body
    # The browser may load nothing from anywhere else (no CDN, no fonts).
    policy = headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    for path, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css"),
                       ("/vendor/uplot/uPlot.esm.js", "text/javascript"),
                       ("/vendor/uplot/LICENSE", "text/plain")):
        status, headers, _ = http_get(port, path)
        assert (status, headers["content-type"].split(";")[0]) == (200, kind), path
    assert http_get(port, "/../pyproject.toml")[0] == 404
    assert http_get(port, "/nothing-here.js")[0] == 404


def test_dashboard_refuses_addresses_outside_allow_admin(nginx, start_gateway):
    gateway = start_gateway(dashboard_config(
        one_route(nginx), admin={"key": ADMIN_KEY, "allow_admin": ["10.9.8.0/24"]}))
    port = dashboard_port(gateway)
    assert http_get(port, "/")[0] == 403
    assert dashboard_json(port, "stats")[0] == 403


def test_admin_api_serves_the_dashboard_too(nginx, start_gateway):
    gateway = start_gateway(dashboard_config(one_route(nginx)))
    port = admin_port(gateway)
    status, headers, _ = http_get(port, "/dashboard")
    assert (status, headers["location"]) == (302, "/dashboard/")
    status, headers, body = http_get(port, "/dashboard/")
    assert status == 200 and b'id="key-form"' in body
    assert dashboard_json(port, "summary", key=None)[0] == 401
    status, summary = dashboard_json(port, "summary")
    assert status == 200 and [r["id"] for r in summary["routes"]] == ["r1"]
    # The rest of the Admin API still needs its key.
    assert http_get(port, "/apisix/admin/routes")[0] == 401


def test_dashboard_can_be_turned_off(nginx, start_gateway):
    taken = free_port()
    gateway = start_gateway(dashboard_config(
        one_route(nginx), dashboard={"enabled": False, "listen": f"127.0.0.1:{taken}"}))
    port = admin_port(gateway)
    assert dashboard_json(port, "stats")[0] == 404
    assert http_get(port, "/dashboard/", {"X-API-KEY": ADMIN_KEY})[0] == 404
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", taken), 0.5):
        pass


def test_gateway_runs_on_when_the_dashboard_port_is_taken(nginx, start_gateway):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        gateway = start_gateway(dashboard_config(
            one_route(nginx), dashboard={"listen": f"127.0.0.1:{taken}"}))
        wait_for_log(gateway, rf"dashboard: cannot listen on 127\.0\.0\.1:{taken}")
        assert send(gateway, "/") == [200]
        assert dashboard_json(admin_port(gateway), "stats")[0] == 200


@pytest.mark.parametrize("workers", [1, 2])
def test_stats_count_what_metrics_count(nginx, start_gateway, workers):
    routes = [{"id": "home", "uri": "/", "upstream": {"nodes": {nginx.address: 1}}},
              {"id": "codes", "uri": "/status/*", "upstream": {"nodes": {nginx.address: 1}}}]
    gateway = start_gateway(dashboard_config(routes), workers=workers)
    port = dashboard_port(gateway)
    assert dashboard_json(port, "stats")[0] == 200  # the first sample: nothing yet
    send(gateway, "/", 25)
    send(gateway, "/status/503", 4)
    send(gateway, "/status/201", 3)
    send(gateway, "/no/route/here", 2)  # counted under route "" by the global rule
    expected = requests_by_route(metrics_text(gateway))
    assert expected == {"home": 25, "codes": 7, "": 2}

    def shown() -> dict[str, int]:
        time.sleep(0.3)  # past the sample interval, so the next poll takes a new sample
        return {row["route"]: row["requests"] for row in dashboard_json(port, "stats")[1]
                ["routes"]}

    eventually(lambda: shown() == expected, timeout=5, what="stats route counts")
    rows = {row["route"]: row for row in dashboard_json(port, "stats")[1]["routes"]}
    assert rows["codes"]["errors"] == 4
    assert rows["codes"]["codes"] == {"2xx": 3, "5xx": 4}
    assert rows["home"]["errors"] == 0
    assert rows["home"]["p99_overall"] is not None and rows["home"]["p99_overall"] < 1.0


def test_stats_series_show_live_rates_and_latency(nginx, start_gateway):
    routes = [{"id": "home", "uri": "/", "upstream": {"nodes": {nginx.address: 1}}},
              {"id": "codes", "uri": "/status/*", "upstream": {"nodes": {nginx.address: 1}}}]
    gateway = start_gateway(dashboard_config(routes))
    port = dashboard_port(gateway)
    sent = 0
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        sent += len(send(gateway, "/", 20))
        send(gateway, "/status/500", 5)
        dashboard_json(port, "stats")  # a page polling
        time.sleep(0.2)
    stats = dashboard_json(port, "stats")[1]
    series = stats["series"]
    assert len(series["t"]) >= 2
    assert set(series["routes"]) == {"home", "codes"}
    home = series["routes"]["home"]
    busy = [rate for rate in home["rps"] if rate]
    assert busy and max(busy) > 10
    assert all(share == 0 for share in home["error_rate"] if share is not None)
    assert all(share == 1 for share in series["routes"]["codes"]["error_rate"]
               if share is not None)
    assert all(0 < p50 <= p99 < 1 for p50, p99 in zip(home["p50"], home["p99"], strict=True)
               if p50 is not None)
    rows = {row["route"]: row for row in stats["routes"]}
    assert rows["home"]["rps"] > 10 and rows["codes"]["error_rate"] == 1


def test_top_consumers_rank_by_requests(nginx, start_gateway):
    routes = [{"id": "r1", "uri": "/", "upstream": {"nodes": {nginx.address: 1}},
               "plugins": {"key-auth": {}}}]
    consumers = [{"username": "alice", "plugins": {"key-auth": {"key": "alice-key"}}},
                 {"username": "bob", "plugins": {"key-auth": {"key": "bob-key"}}}]
    gateway = start_gateway(dashboard_config(routes, consumers=consumers))
    port = dashboard_port(gateway)
    dashboard_json(port, "stats")
    for user, times in (("alice", 3), ("bob", 9)):
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        for _ in range(times):
            connection.request("GET", "/", headers={"apikey": f"{user}-key"})
            assert connection.getresponse().read() is not None
        connection.close()

    def ranking() -> list[tuple[str, int]]:
        time.sleep(0.3)
        return [(row["consumer"], row["requests"])
                for row in dashboard_json(port, "stats")[1]["consumers"]]

    eventually(lambda: ranking() == [("bob", 9), ("alice", 3)], timeout=5,
               what="consumers ranked")


def test_summary_describes_routes_services_upstreams_and_config(nginx, start_gateway):
    upstream_nodes = {nginx.address: 1}
    gateway = start_gateway(dashboard_config(
        [{"id": "api", "name": "API", "uri": "/api/*", "methods": ["GET"],
          "service_id": "svc", "plugins": {"cors": {}}},
         {"uri": "/inline", "upstream": {"nodes": upstream_nodes}}],
        services=[{"id": "svc", "upstream_id": "pool", "plugins": {"proxy-rewrite": {}}}],
        upstreams=[{"id": "pool", "type": "least_conn", "nodes": upstream_nodes}]))
    status, summary = dashboard_json(dashboard_port(gateway), "summary")
    assert status == 200 and summary["config_error"] is None
    routes = {route["id"]: route for route in summary["routes"]}
    assert (routes["api"]["name"], routes["api"]["uris"], routes["api"]["methods"],
            routes["api"]["service_id"], routes["api"]["upstream"],
            routes["api"]["plugins"]) == ("API", ["/api/*"], ["GET"], "svc", "pool", ["cors"])
    # An unnamed route: listed under its position, as metrics label it.
    assert routes["2"]["upstream"] == "route-2"
    assert summary["services"] == [{"id": "svc", "name": None, "hosts": None,
                                    "plugins": ["proxy-rewrite"], "upstream": "pool"}]
    upstreams = {u["id"]: u for u in summary["upstreams"]}
    assert upstreams["pool"]["type"] == "least_conn"
    assert upstreams["pool"]["nodes"] == [{"address": nginx.address, "weight": 1,
                                           "priority": 0, "health": "unchecked"}]
    assert upstreams["route-2"]["owner"] == "route 2"
    assert summary["global_plugins"] == ["prometheus"] and summary["prometheus"] is True
    config = summary["config"]
    assert config["revision"] >= 1 and config["stale"] is False
    assert config["file_modified_at"] <= time.time()
    # Counters of /metrics without a chart of their own, grouped by what they count.
    gateway_families = {family["name"] for family in summary["counters"]["gateway"]}
    assert {"sluicegate_http_connections", "sluicegate_workers"} <= gateway_families
    assert "sluicegate_intercepted_requests" in {
        family["name"] for family in summary["counters"]["interception"]}


def test_summary_follows_a_config_change(nginx, start_gateway):
    gateway = start_gateway(dashboard_config(one_route(nginx)))
    port = dashboard_port(gateway)
    before = dashboard_json(port, "summary")[1]["config"]["revision"]
    config = dict(gateway.config)
    config["routes"] = [*config["routes"], {"id": "r2", "uri": "/two",
                                            "upstream": {"nodes": {nginx.address: 1}}}]
    gateway.write_config(config)

    def routes() -> list[str]:
        summary = dashboard_json(port, "summary")[1]
        return [r["id"] for r in summary["routes"]] if \
            summary["config"]["revision"] > before else []

    eventually(lambda: routes() == ["r1", "r2"], timeout=10, interval=0.5,
               what="the new route listed")
    assert dashboard_json(port, "summary")[1]["config"]["changed_at"] is not None


def test_settings_shown_in_the_docs_validate():
    from sluicegate.config.load import validate_config

    block = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "dashboard.md").read_text(),
                       re.S)[0]
    config = validate_config(yaml.safe_load(block)).config
    assert (config.dashboard.enabled, config.dashboard.listen) == (True, "127.0.0.1:9000")
