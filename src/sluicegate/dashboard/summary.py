"""What the dashboard shows besides traffic: the config being served (routes, services,
upstreams with node health, interception entries) and the counters of `/metrics` that
have no chart of their own (AI tokens, kernel and interception counters, L4 streams).

The counters are read from the same exposition text `/metrics` serves (`render`), so the
page shows exactly what Prometheus scrapes, including families added to the exposition
later: they are grouped by name, not looked up one by one. No I/O here.
"""

from __future__ import annotations

import re
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from sluicegate.config.model import GatewayConfig, RouteConfig, UpstreamConfig
from sluicegate.observe.exposition import render

# Families the page draws or tabulates elsewhere (traffic charts, route rows, health).
SHOWN_ELSEWHERE = frozenset({
    "sluicegate_http_requests", "sluicegate_http_latency_seconds",
    "sluicegate_upstream_node_healthy"})
# Groups of the remaining families, by name; the first pattern that matches wins.
GROUPS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("ai", re.compile(r"token|_ai_|llm")),
    ("interception", re.compile(r"intercept")),
    ("kernel", re.compile(r"xdp|bpf|kernel|flow|sockmap|splice|_tc_")),
    ("stream", re.compile(r"_stream_")),
    ("gateway", re.compile(r".")),
)
# Rows per family at most: a family labelled by client address could be huge.
MAX_SAMPLES = 200


def exported_families(snapshot: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The families of `/metrics` for this snapshot, grouped (see GROUPS): each with its
    name, type, help and samples (histogram buckets left out, they are charted)."""
    groups: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in GROUPS}
    text = render(snapshot).decode("utf-8", errors="replace")
    for family in text_string_to_metric_families(text):
        if family.name in SHOWN_ELSEWHERE:
            continue
        samples = []
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            samples.append({"name": sample.name, "labels": dict(sample.labels),
                            "value": sample.value})
        group = next(name for name, pattern in GROUPS if pattern.search(family.name))
        groups[group].append({"name": family.name, "type": family.type,
                              "help": family.documentation, "samples": samples[:MAX_SAMPLES],
                              "truncated": len(samples) > MAX_SAMPLES})
    return groups


def _upstream_row(upstream_id: str, conf: UpstreamConfig, owner: str | None,
                  health: dict[tuple[str, str], float]) -> dict[str, Any]:
    checked = conf.checks is not None
    nodes = []
    for node in conf.nodes:
        address = f"[{node.host}]:{node.port}" if ":" in node.host else \
            f"{node.host}:{node.port}"
        state = health.get((upstream_id, address))
        nodes.append({"address": address, "weight": node.weight, "priority": node.priority,
                      "health": "unchecked" if not checked else
                      ("unknown" if state is None else
                       "healthy" if state >= 1 else "unhealthy")})
    active = conf.checks.active if conf.checks is not None else None
    return {"id": upstream_id, "name": conf.name, "owner": owner, "type": conf.type,
            "scheme": conf.scheme, "checks": None if conf.checks is None else {
                "active": None if active is None else {
                    "type": active.type, "interval": active.healthy.interval,
                    "unhealthy_interval": active.unhealthy.interval},
                "passive": conf.checks.passive is not None},
            "nodes": nodes}


def _route_row(order: int, route: RouteConfig, config: GatewayConfig) -> dict[str, Any]:
    route_id = route.id or str(order + 1)  # the data plane's label of an unnamed route
    plugins = set(route.plugins)
    if route.plugin_config_id:
        for resource in config.plugin_configs:
            if resource.id == route.plugin_config_id:
                plugins |= set(resource.plugins)
    if route.upstream is not None:
        upstream = route.upstream.id or f"route-{route_id}"
    elif route.upstream_id:
        upstream = route.upstream_id
    else:
        service = next((s for s in config.services if s.id == route.service_id), None)
        upstream = None
        if service is not None:
            upstream = (service.upstream.id or f"service-{service.id}") \
                if service.upstream is not None else service.upstream_id
    return {"id": route_id, "name": route.name, "uris": [route.uri] if route.uri else
            list(route.uris or []), "methods": route.methods,
            "hosts": [route.host] if route.host else route.hosts,
            "service_id": route.service_id, "upstream": upstream,
            "plugin_config_id": route.plugin_config_id, "plugins": sorted(plugins),
            "status": route.status}


def describe_config(config: GatewayConfig, health: dict[tuple[str, str], float]
                    ) -> dict[str, Any]:
    """Routes, services and upstreams (inline ones too, under the id the health checks
    and metrics use) with node health from the snapshot."""
    routes = [_route_row(order, route, config) for order, route in enumerate(config.routes)]
    upstreams = [_upstream_row(u.id or "", u, None, health) for u in config.upstreams]
    for order, route in enumerate(config.routes):
        if route.upstream is not None:
            route_id = route.id or str(order + 1)
            upstreams.append(_upstream_row(route.upstream.id or f"route-{route_id}",
                                           route.upstream, f"route {route_id}", health))
    services = []
    for service in config.services:
        upstream = None
        if service.upstream is not None:
            upstream = service.upstream.id or f"service-{service.id}"
            upstreams.append(_upstream_row(upstream, service.upstream,
                                           f"service {service.id}", health))
        elif service.upstream_id:
            upstream = service.upstream_id
        services.append({"id": service.id, "name": service.name, "hosts": service.hosts,
                         "plugins": sorted(service.plugins), "upstream": upstream})
    global_plugins = sorted({entry.name for entry in config.plugins if not entry.service} |
                            {name for rule in config.global_rules for name in rule.plugins})
    # Request metrics exist only where the prometheus plugin runs: the page says so.
    prometheus = "prometheus" in global_plugins or any(
        "prometheus" in item.plugins for item in
        (*config.routes, *config.services, *config.plugin_configs))
    return {"routes": routes, "services": services, "upstreams": upstreams,
            "global_plugins": global_plugins, "consumers": len(config.consumers),
            "stream_routes": len(config.stream_routes), "prometheus": prometheus,
            "interception": _interception(config)}


def _interception(config: GatewayConfig) -> list[dict[str, Any]]:
    from sluicegate.intercept.entries import intercept_entries

    try:
        entries = intercept_entries(config)
    except ValueError:  # validated before; a describing page must not fail on it
        return []
    return [{"scope": entry.scope, "listen": f"{entry.host}:{entry.port}",
             "transparent": entry.spec is not None,
             "mode": entry.mode if entry.spec is not None else "listener",
             "protocols": list(entry.conf.protocols), "handle": entry.conf.handle,
             "fail_open": entry.fail_open} for entry in entries]
