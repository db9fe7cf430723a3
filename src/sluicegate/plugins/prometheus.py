"""prometheus: count requests, latency and bandwidth for `/metrics`.

The exposition endpoint is `gateway.metrics_listen` (default 127.0.0.1:9091, path
`/metrics`), served while any route or global rule enables this plugin. With several
workers it reports the sum over all of them.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from sluicegate.plugins.base import Plugin, PluginConfig, register


class PrometheusConfig(PluginConfig):
    metrics: bool = Field(True, description="Collect metrics for the traffic this plugin "
                          "sees (false keeps the plugin configured but silent).")
    prefer_name: bool = Field(False, description="Label routes by `name` instead of `id` "
                              "where a route has a name (APISIX option).")


@register
class Prometheus(Plugin):
    name = "prometheus"
    priority = 500
    schema = PrometheusConfig

    def __init__(self, conf: PrometheusConfig, env: Any) -> None:
        super().__init__(conf, env)
        self.store = env.metrics
        self.enabled = conf.metrics and self.store is not None
        self.prefer_name = conf.prefer_name

    def log(self, ctx: Any) -> None:
        if not self.enabled:
            return
        route = ctx.route
        if route is None:
            route_label = service = ""
        else:
            route_label = (route.name or route.id) if self.prefer_name else route.id
            service = route.service_id or ""
        self.store.record(ctx.response_status, route_label, service, ctx.consumer_name or "",
                          ctx.upstream_addr or "", time.monotonic() - ctx.start_time,
                          ctx.upstream_latency, ctx.upstream_status, ctx.bytes_received,
                          ctx.bytes_sent)
        if ctx.original_destination is not None:
            host, port = ctx.original_destination
            self.store.record_interception(ctx.intercept_mode or "",
                                           f"[{host}]:{port}" if ":" in host else
                                           f"{host}:{port}")
