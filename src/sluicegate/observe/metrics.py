"""Request metrics: plain counters on the hot path, Prometheus families at scrape time.

Each worker counts into its own `MetricsStore` (dict increments, ~1 µs a request);
`/metrics` merges the snapshots of all workers, so the exposition reports the sum.
prometheus_client renders the text format from families built at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

# Seconds; APISIX's default buckets (in ms) 1..60000, rescaled, plus sub-millisecond ones
# because a local proxy answers in well under 1 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                   5.0, 10.0, 30.0, 60.0)


class Histogram:
    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect_left(LATENCY_BUCKETS, value)] += 1
        self.count += 1
        self.total += value


class _LazyHistogram:
    """A histogram put into `store[key]` on its first observation."""

    __slots__ = ("histogram", "key", "store")

    def __init__(self, store: dict[Any, Histogram], key: tuple[str, ...]) -> None:
        self.store, self.key, self.histogram = store, key, None

    def observe(self, value: float) -> None:
        histogram = self.histogram
        if histogram is None:
            histogram = self.histogram = self.store.setdefault(self.key, Histogram())
        histogram.observe(value)


class MetricsStore:
    """Counters of one worker. Keys are label tuples; values plain numbers."""

    def __init__(self) -> None:
        # (code, route, service, consumer, node) -> count
        self.requests: dict[tuple[str, str, str, str, str], int] = {}
        # (type, route, service, consumer, node) -> Histogram
        self.latency: dict[tuple[str, str, str, str, str], Histogram] = {}
        # (type, route, service, consumer, node) -> bytes
        self.bandwidth: dict[tuple[str, str, str, str, str], int] = {}
        # (node, code) -> count of upstream responses
        self.upstream_status: dict[tuple[str, str], int] = {}
        self.gauges: dict[str, float] = {}
        # (route, service, consumer, node) -> cached keys and histograms, see record()
        self.series: dict[tuple[str, str, str, str], tuple[Any, ...]] = {}
        # (mode, original destination) -> count of intercepted requests
        self.intercepted: dict[tuple[str, str], int] = {}
        # (protocol, stream route) -> [connections or flows, bytes in, bytes out]
        self.stream: dict[tuple[str, str], list[int]] = {}
        # (plugin, outcome) -> requests whose rate-limit store could not answer
        self.limit_store_errors: dict[tuple[str, str], int] = {}
        # (logger name, kind) -> count; kinds in HTTP_LOGGER_KINDS
        self.http_logger: dict[tuple[str, str], int] = {}
        # AI gateway (plugins/ai_proxy.py); AiLabels = (route, consumer, provider, model)
        # (*AiLabels, code) -> requests; (*AiLabels, error type) -> errors
        self.ai_requests: dict[tuple[str, ...], int] = {}
        self.ai_errors: dict[tuple[str, ...], int] = {}
        # (type prompt|completion, source provider|estimate, *AiLabels) -> tokens
        self.ai_tokens: dict[tuple[str, ...], int] = {}
        # AiLabels -> Histogram: whole request; time to the first token of a stream
        self.ai_latency: dict[tuple[str, ...], Histogram] = {}
        self.ai_ttft: dict[tuple[str, ...], Histogram] = {}
        # AiLabels -> USD spent (plugins/ai_budget.py prices the tokens)
        self.ai_spend: dict[tuple[str, ...], float] = {}
        # (route, provider, model, reason) -> tries that failed and moved on to another
        # instance (plugins/ai_proxy_multi.py)
        self.ai_fallbacks: dict[tuple[str, str, str, str], int] = {}

    def record(self, code: int, route: str, service: str, consumer: str, node: str,
               latency: float, upstream_latency: float, upstream_status: int,
               bytes_in: int, bytes_out: int) -> None:
        # One lookup of the label set's cached keys and histograms instead of building
        # five label tuples per request (the prometheus plugin's cost in the bench).
        labels = (route, service, consumer, node)
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = self._new_series(labels)
        request_histogram, upstream_histogram, ingress, egress, by_code = series
        key = by_code.get(code)
        if key is None:
            key = by_code[code] = (str(code), *labels)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        request_histogram.observe(latency)
        if upstream_status:
            upstream_histogram.observe(upstream_latency)
            status_key = (node, str(upstream_status))
            self.upstream_status[status_key] = self.upstream_status.get(status_key, 0) + 1
        bandwidth = self.bandwidth
        bandwidth[ingress] = bandwidth.get(ingress, 0) + bytes_in
        bandwidth[egress] = bandwidth.get(egress, 0) + bytes_out

    def _new_series(self, labels: tuple[str, str, str, str]) -> tuple[Any, ...]:
        latency = self.latency
        request = latency.setdefault(("request", *labels), Histogram())
        # Created on first use only, so an upstream-less label set exports no series.
        upstream = _LazyHistogram(latency, ("upstream", *labels))
        return request, upstream, ("ingress", *labels), ("egress", *labels), {}

    def record_stream(self, protocol: str, route: str, bytes_in: int, bytes_out: int) -> None:
        counts = self.stream.get((protocol, route))
        if counts is None:
            counts = self.stream[(protocol, route)] = [0, 0, 0]
        counts[0] += 1
        counts[1] += bytes_in
        counts[2] += bytes_out

    def record_interception(self, mode: str, original_destination: str) -> None:
        key = (mode, original_destination)
        self.intercepted[key] = self.intercepted.get(key, 0) + 1

    def count_http_logger(self, name: str, kind: str, amount: int = 1) -> None:
        key = (name, kind)
        self.http_logger[key] = self.http_logger.get(key, 0) + amount

    def record_ai(self, labels: tuple[str, str, str, str], code: int, error: str | None,
                  prompt_tokens: int, completion_tokens: int, estimated: bool,
                  latency: float, ttft: float | None) -> None:
        """One AI request; labels are (route, consumer, provider, model)."""
        key = (*labels, str(code))
        self.ai_requests[key] = self.ai_requests.get(key, 0) + 1
        if error is not None:
            key = (*labels, error)
            self.ai_errors[key] = self.ai_errors.get(key, 0) + 1
        source = "estimate" if estimated else "provider"
        tokens = self.ai_tokens
        if prompt_tokens:
            key = ("prompt", source, *labels)
            tokens[key] = tokens.get(key, 0) + prompt_tokens
        if completion_tokens:
            key = ("completion", source, *labels)
            tokens[key] = tokens.get(key, 0) + completion_tokens
        for store, value in ((self.ai_latency, latency), (self.ai_ttft, ttft)):
            if value is None:
                continue
            histogram = store.get(labels)
            if histogram is None:
                histogram = store[labels] = Histogram()
            histogram.observe(value)

    def record_ai_spend(self, labels: tuple[str, str, str, str], usd: float) -> None:
        """What one AI request cost; labels are (route, consumer, provider, model)."""
        self.ai_spend[labels] = self.ai_spend.get(labels, 0.0) + usd

    def record_ai_fallback(self, route: str, provider: str, model: str, reason: str
                           ) -> None:
        """A try at one AI provider instance that failed (`reason`: 429, 5xx, timeout,
        connect_error...) and was followed by a try at another."""
        key = (route, provider, model, reason)
        self.ai_fallbacks[key] = self.ai_fallbacks.get(key, 0) + 1

    def record_limit_store_error(self, plugin: str, outcome: str) -> None:
        key = (plugin, outcome)
        self.limit_store_errors[key] = self.limit_store_errors.get(key, 0) + 1

    def _observe(self, key: tuple[str, str, str, str, str], value: float) -> None:
        histogram = self.latency.get(key)
        if histogram is None:
            histogram = self.latency[key] = Histogram()
        histogram.observe(value)

    def snapshot(self) -> dict[str, Any]:
        """A picklable copy for the process that serves /metrics."""
        return {
            "requests": dict(self.requests),
            "latency": {k: (list(h.buckets), h.count, h.total) for k, h in self.latency.items()},
            "bandwidth": dict(self.bandwidth),
            "upstream_status": dict(self.upstream_status),
            "gauges": dict(self.gauges),
            "intercepted": dict(self.intercepted),
            "stream": {k: list(v) for k, v in self.stream.items()},
            "limit_store_errors": dict(self.limit_store_errors),
            "http_logger": dict(self.http_logger),
            "ai": {
                "requests": dict(self.ai_requests),
                "errors": dict(self.ai_errors),
                "tokens": dict(self.ai_tokens),
                "latency": {k: (list(h.buckets), h.count, h.total)
                            for k, h in self.ai_latency.items()},
                "ttft": {k: (list(h.buckets), h.count, h.total)
                         for k, h in self.ai_ttft.items()},
                "spend": dict(self.ai_spend),
                "fallbacks": dict(self.ai_fallbacks),
            },
        }


# Gauges that say how current a worker's config is: merged by the worst worker, not summed
# (the oldest revision served, the longest time since the store confirmed it, any stale).
GAUGE_MERGE = {"config_revision": min, "config_age_seconds": max, "config_stale": max}


def merge_snapshots(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    snapshots = list(snapshots)
    merged: dict[str, Any] = {"requests": {}, "latency": {}, "bandwidth": {},
                              "upstream_status": {}, "gauges": {}, "intercepted": {},
                              "http_logger": {}}
    merged["limit_store_errors"] = {}
    for snap in snapshots:
        for name in ("limit_store_errors", "requests", "bandwidth", "upstream_status",
                     "gauges", "intercepted",
                     "http_logger"):
            target = merged[name]
            for key, value in snap.get(name, {}).items():
                target[key] = target.get(key, 0) + value
        # Health checks run per worker: a node counts as healthy when every worker finds it
        # so; requests proxied to all-unhealthy upstreams add up.
        health = merged.setdefault("upstream_health", {})
        for key, value in snap.get("upstream_health", {}).items():
            health[key] = min(health.get(key, value), value)
        fallbacks = merged.setdefault("upstream_all_unhealthy", {})
        for key, value in snap.get("upstream_all_unhealthy", {}).items():
            fallbacks[key] = fallbacks.get(key, 0) + value
        stream = merged.setdefault("stream", {})
        for key, counts in snap.get("stream", {}).items():
            stream[key] = [a + b for a, b in zip(stream.get(key, [0, 0, 0]), counts,
                                                 strict=True)]
        _merge_histograms(merged["latency"], snap["latency"])
        ai = merged.setdefault("ai", {"requests": {}, "errors": {}, "tokens": {},
                                      "latency": {}, "ttft": {}, "spend": {},
                                      "fallbacks": {}})
        for name, section in snap.get("ai", {}).items():
            if name in ("latency", "ttft"):
                _merge_histograms(ai[name], section)
                continue
            target = ai[name]
            for key, value in section.items():
                target[key] = target.get(key, 0) + value
    for name, pick in GAUGE_MERGE.items():
        values = [snap["gauges"][name] for snap in snapshots if name in snap.get("gauges", {})]
        if values:
            merged["gauges"][name] = pick(values)
    return merged


def _merge_histograms(target: dict[Any, Any], source: dict[Any, Any]) -> None:
    for key, (buckets, count, total) in source.items():
        if key in target:
            old_buckets, old_count, old_total = target[key]
            target[key] = ([a + b for a, b in zip(old_buckets, buckets, strict=True)],
                           old_count + count, old_total + total)
        else:
            target[key] = (list(buckets), count, total)


# http-logger counters: kind -> (metric family, help, extra labels).
HTTP_LOGGER_KINDS = {
    "sent_entries": ("sluicegate_http_logger_sent_entries",
                     "Log entries the collector accepted (2xx), by http-logger name", {}),
    "sent_batches": ("sluicegate_http_logger_sent_batches",
                     "Batches the collector accepted (2xx), by http-logger name", {}),
    "failed_batches": ("sluicegate_http_logger_failed_batches",
                       "Batches given up after max_retry_count retries, by http-logger name",
                       {}),
    "dropped_queue_full": ("sluicegate_http_logger_dropped",
                           "Log entries lost: queue_full (max_pending_entries waiting while "
                           "the collector was down or slow) or send_failed (in a failed "
                           "batch)", {"reason": "queue_full"}),
    "dropped_send_failed": ("sluicegate_http_logger_dropped", "", {"reason": "send_failed"}),
}

GAUGE_HELP = {
    "http_connections": "Client connections open now",
    "upstream_idle_connections": "Idle keep-alive connections to upstreams",
    "workers": "Worker processes serving traffic",
    "config_version": "Version of the config snapshot being served (reloads count up)",
    "config_revision": "Config store revision being served (the oldest over workers)",
    "config_age_seconds": "Seconds since the config store last confirmed the served config "
                          "is current (grows while etcd is unreachable; the worst worker)",
    "config_stale": "1 while a worker cannot reach its config store (serving the last good "
                    "config), else 0",
}


class SnapshotCollector(Collector):
    """Turns a merged snapshot into Prometheus metric families at scrape time."""

    def __init__(self, source: Any) -> None:
        self.source = source  # () -> merged snapshot

    def collect(self) -> Iterator[Any]:
        snap = self.source()
        labels = ["route", "service", "consumer", "node"]
        requests = CounterMetricFamily("sluicegate_http_requests",
                                       "HTTP requests by route and response status",
                                       labels=["code", *labels])
        for key, value in sorted(snap["requests"].items()):
            requests.add_metric(list(key), value)
        yield requests
        latency = HistogramMetricFamily(
            "sluicegate_http_latency_seconds",
            "Request latency (type=request: whole request in the gateway; "
            "type=upstream: until the upstream response head)", labels=["type", *labels])
        _add_histograms(latency, snap["latency"])
        yield latency
        bandwidth = CounterMetricFamily("sluicegate_bandwidth_bytes",
                                        "Bytes received from clients (ingress) and sent to them "
                                        "(egress), bodies only", labels=["type", *labels])
        for key, value in sorted(snap["bandwidth"].items()):
            bandwidth.add_metric(list(key), value)
        yield bandwidth
        upstream = CounterMetricFamily("sluicegate_upstream_responses",
                                       "Responses received from upstream nodes by status",
                                       labels=["node", "code"])
        for key, value in sorted(snap["upstream_status"].items()):
            upstream.add_metric(list(key), value)
        yield upstream
        intercepted = CounterMetricFamily(
            "sluicegate_intercepted_requests",
            "Requests that arrived by transparent interception, by mode and original "
            "destination", labels=["mode", "original_destination"])
        for key, value in sorted(snap.get("intercepted", {}).items()):
            intercepted.add_metric(list(key), value)
        yield intercepted
        flows = CounterMetricFamily("sluicegate_stream_connections",
                                    "L4 connections (tcp) or flows (udp) relayed, by stream "
                                    "route", labels=["protocol", "route"])
        stream_bytes = CounterMetricFamily("sluicegate_stream_bytes",
                                           "L4 bytes relayed (ingress: from clients; egress: "
                                           "to clients)", labels=["protocol", "route", "type"])
        for (protocol, route), (count, received, sent) in sorted(snap.get("stream",
                                                                          {}).items()):
            flows.add_metric([protocol, route], count)
            stream_bytes.add_metric([protocol, route, "ingress"], received)
            stream_bytes.add_metric([protocol, route, "egress"], sent)
        yield flows
        yield stream_bytes
        healthy = GaugeMetricFamily(
            "sluicegate_upstream_node_healthy",
            "1 when the upstream's health checks find the node healthy (in every worker), "
            "else 0", labels=["upstream", "node"])
        for key, value in sorted(snap.get("upstream_health", {}).items()):
            healthy.add_metric(list(key), value)
        yield healthy
        all_unhealthy = CounterMetricFamily(
            "sluicegate_upstream_all_unhealthy",
            "Requests proxied to an upstream while every node was unhealthy (APISIX "
            "proxies anyway)", labels=["upstream"])
        for upstream, value in sorted(snap.get("upstream_all_unhealthy", {}).items()):
            all_unhealthy.add_metric([upstream], value)
        yield all_unhealthy
        store_errors = CounterMetricFamily(
            "sluicegate_limit_store_errors",
            "Requests whose rate-limit store (Redis) could not answer, by plugin and what "
            "happened to them (allowed: allow_degradation; rejected: 503)",
            labels=["plugin", "outcome"])
        for key, value in sorted(snap.get("limit_store_errors", {}).items()):
            store_errors.add_metric(list(key), value)
        yield store_errors
        yield from _http_logger_families(snap.get("http_logger", {}))
        # Kernel counters (XDP filter, flow metrics) read by the process owning them.
        from sluicegate.observe.kernel_metrics import kernel_families

        yield from kernel_families(snap.get("kernel"))
        yield from _ai_families(snap.get("ai", {}))
        for name, value in sorted(snap["gauges"].items()):
            gauge = GaugeMetricFamily(f"sluicegate_{name}", GAUGE_HELP.get(name, name))
            gauge.add_metric([], value)
            yield gauge


def _add_histograms(family: HistogramMetricFamily, histograms: dict[Any, Any]) -> None:
    for key, (buckets, _count, total) in sorted(histograms.items()):
        cumulative, running = [], 0
        for bound, bucket_count in zip((*LATENCY_BUCKETS, float("inf")), buckets,
                                       strict=True):
            running += bucket_count
            cumulative.append((_bound_label(bound), running))
        family.add_metric(list(key), cumulative, total)


AI_LABELS = ["route", "consumer", "provider", "model"]


def _ai_families(ai: dict[str, Any]) -> Iterator[Any]:
    requests = CounterMetricFamily("sluicegate_ai_requests",
                                   "AI requests (ai-proxy) by route, consumer, provider, model "
                                   "and the status answered", labels=[*AI_LABELS, "code"])
    for key, value in sorted(ai.get("requests", {}).items()):
        requests.add_metric(list(key), value)
    yield requests
    errors = CounterMetricFamily(
        "sluicegate_ai_errors",
        "Failed AI requests by type: a provider status (429, 500...), timeout, connect, "
        "stream (error event or cut stream), bad_response, bad_request, client_closed",
        labels=[*AI_LABELS, "type"])
    for key, value in sorted(ai.get("errors", {}).items()):
        errors.add_metric(list(key), value)
    yield errors
    tokens = CounterMetricFamily(
        "sluicegate_ai_tokens",
        "Tokens by type (prompt, completion); source=provider: the provider's usage figures, "
        "source=estimate: counted by the gateway (a stream that reported no usage)",
        labels=["type", "source", *AI_LABELS])
    for key, value in sorted(ai.get("tokens", {}).items()):
        tokens.add_metric(list(key), value)
    yield tokens
    latency = HistogramMetricFamily("sluicegate_ai_latency_seconds",
                                    "AI request latency, until the whole answer was sent",
                                    labels=AI_LABELS)
    _add_histograms(latency, ai.get("latency", {}))
    yield latency
    ttft = HistogramMetricFamily("sluicegate_ai_time_to_first_token_seconds",
                                 "Streams: time from the request's arrival to the first "
                                 "token sent to the client", labels=AI_LABELS)
    _add_histograms(ttft, ai.get("ttft", {}))
    yield ttft
    spend = CounterMetricFamily(
        "sluicegate_ai_spend_usd",
        "USD spent on AI requests, from the token figures and ai-budget's price table",
        labels=AI_LABELS)
    for key, value in sorted(ai.get("spend", {}).items()):
        spend.add_metric(list(key), value)
    yield spend
    fallbacks = CounterMetricFamily(
        "sluicegate_ai_fallbacks",
        "ai-proxy-multi tries that failed and moved on to another instance, by the failed "
        "instance's provider and model and the reason (429 or another status, 5xx, "
        "timeout, connect_error)", labels=["route", "provider", "model", "reason"])
    for key, value in sorted(ai.get("fallbacks", {}).items()):
        fallbacks.add_metric(list(key), value)
    yield fallbacks


def _http_logger_families(counts: dict[tuple[str, str], int]) -> Iterator[Any]:
    families: dict[str, CounterMetricFamily] = {}
    for kind, (family_name, help_text, _) in HTTP_LOGGER_KINDS.items():
        if family_name not in families:
            extra = list(HTTP_LOGGER_KINDS[kind][2])
            families[family_name] = CounterMetricFamily(family_name, help_text,
                                                        labels=["name", *extra])
    for (name, kind), value in sorted(counts.items()):
        known = HTTP_LOGGER_KINDS.get(kind)
        if known is not None:
            families[known[0]].add_metric([name, *known[2].values()], value)
    yield from families.values()


def _bound_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
