"""Live traffic for the dashboard: rates and latency quantiles from snapshot deltas.

The metrics snapshot (observe/metrics.py) holds counters since each worker started. The
dashboard samples it at most once a `SAMPLE_INTERVAL` (when a page asks, so an unwatched
gateway does no work), and each pair of samples becomes one point per route: requests/s,
the share of 5xx, p50 and p99 of the request latency. Points live in one ring in the
server, so every open page draws the same series. No I/O here: `server.py` feeds it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sluicegate.observe.metrics import LATENCY_BUCKETS

# A page polls every second; sampling faster would only add noise to the rates.
SAMPLE_INTERVAL = 1.0
# Polls further apart than this (nobody was watching) start a new line instead of drawing
# one long average across the pause.
MAX_GAP = 5.0
# Five minutes of points at one a second.
RING_POINTS = 300
# The table's current rates: over this many seconds (one interval alone is jumpy).
RATE_WINDOW = 5.0
# Top consumers: by requests over this window.
CONSUMER_WINDOW = 60.0
# Series sent for this many routes (the busiest in view) plus the total: a page with a
# thousand routes must not receive a thousand lines a second.
TOP_ROUTES = 8
TOP_CONSUMERS = 10
NO_ROUTE = ""  # the label of requests that matched no route (404 from the router)


@dataclass(slots=True)
class Totals:
    """Counters of one sample, summed per route (and per consumer) over the other labels."""

    requests: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # 5xx answers
    codes: dict[str, dict[str, int]] = field(default_factory=dict)  # route -> "2xx" -> n
    latency: dict[str, list[int]] = field(default_factory=dict)  # route -> bucket counts
    consumers: dict[str, int] = field(default_factory=dict)


def totals_of(snapshot: dict[str, Any]) -> Totals:
    totals = Totals()
    for (code, route, _service, consumer, _node), count in snapshot.get("requests",
                                                                        {}).items():
        totals.requests[route] = totals.requests.get(route, 0) + count
        if code.startswith("5"):
            totals.errors[route] = totals.errors.get(route, 0) + count
        by_class = totals.codes.setdefault(route, {})
        code_class = f"{code[:1]}xx"
        by_class[code_class] = by_class.get(code_class, 0) + count
        totals.consumers[consumer] = totals.consumers.get(consumer, 0) + count
    for (kind, route, _service, _consumer, _node), (buckets, _count, _total) in \
            snapshot.get("latency", {}).items():
        if kind != "request":
            continue
        known = totals.latency.get(route)
        if known is None:
            totals.latency[route] = list(buckets)
        else:
            for index, value in enumerate(buckets):
                known[index] += value
    return totals


def increase(new: int, old: int) -> int:
    """A counter's increase between two samples. A smaller value means the counter started
    again (a worker was restarted): its whole value is new (Prometheus' rate() rule)."""
    return new - old if new >= old else new


def quantile(q: float, buckets: list[int]) -> float | None:
    """Prometheus' histogram_quantile over per-bucket counts (not cumulative): linear
    within the bucket holding the rank; in the +Inf bucket, the highest finite bound.
    None without observations."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    running = 0
    for index, count in enumerate(buckets):
        if count <= 0:
            continue
        if running + count >= rank:
            if index >= len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            lower = LATENCY_BUCKETS[index - 1] if index > 0 else 0.0
            upper = LATENCY_BUCKETS[index]
            return lower + (upper - lower) * max(rank - running, 0) / count
        running += count
    return LATENCY_BUCKETS[-1]


def _bucket_increase(new: list[int], old: list[int] | None) -> list[int]:
    if old is None or len(old) != len(new) or sum(new) < sum(old):
        return list(new)
    return [increase(a, b) for a, b in zip(new, old, strict=True)]


def route_point(requests: int, errors: int, buckets: list[int], seconds: float
                ) -> list[float | None]:
    """[requests/s, 5xx share, p50 s, p99 s]; the last three are None without requests."""
    if requests <= 0:
        return [0.0, None, None, None]
    return [requests / seconds, errors / requests, quantile(0.5, buckets),
            quantile(0.99, buckets)]


@dataclass(slots=True)
class Point:
    wall: float  # time.time() of the sample (the page's x axis)
    gap: bool  # first point after a pause: no line into it
    routes: dict[str, list[float | None]]  # only routes with requests in the interval
    total: list[float | None]
    consumers: dict[str, int]  # request increase per consumer in the interval


class TrafficHistory:
    """The ring of points and the latest samples, shared by every page."""

    def __init__(self, points: int = RING_POINTS) -> None:
        self.points: deque[Point] = deque(maxlen=points)
        # (monotonic time, totals) of the last samples, enough for RATE_WINDOW.
        self.recent: deque[tuple[float, Totals]] = deque(
            maxlen=math.ceil(RATE_WINDOW / SAMPLE_INTERVAL) + 2)
        self.latest: Totals | None = None
        self.latest_snapshot: dict[str, Any] = {}
        self.sampled_at = -math.inf  # monotonic

    def due(self, now: float) -> bool:
        # A little early is fine: pages polling every second must not skip every other.
        return now - self.sampled_at >= SAMPLE_INTERVAL * 0.8

    def add(self, snapshot: dict[str, Any], now: float, wall: float) -> None:
        """One sample: `now` is time.monotonic(), `wall` time.time()."""
        totals = totals_of(snapshot)
        previous, elapsed = self.latest, now - self.sampled_at
        self.latest, self.latest_snapshot, self.sampled_at = totals, snapshot, now
        self.recent.append((now, totals))
        if previous is None:
            return
        if elapsed > MAX_GAP:
            # A pause: keep only this sample as the base of the next point.
            self.recent.clear()
            self.recent.append((now, totals))
            self.points.append(Point(wall, True, {}, [None, None, None, None], {}))
            return
        self.points.append(self._point(totals, previous, elapsed, wall))

    @staticmethod
    def _point(totals: Totals, previous: Totals, seconds: float, wall: float) -> Point:
        routes: dict[str, list[float | None]] = {}
        all_requests = all_errors = 0
        all_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        for route, count in totals.requests.items():
            requests = increase(count, previous.requests.get(route, 0))
            if requests <= 0:
                continue
            errors = increase(totals.errors.get(route, 0), previous.errors.get(route, 0))
            buckets = _bucket_increase(totals.latency.get(route, []),
                                       previous.latency.get(route))
            routes[route] = route_point(requests, errors, buckets, seconds)
            all_requests += requests
            all_errors += errors
            for index, value in enumerate(buckets):
                all_buckets[index] += value
        consumers = {}
        for consumer, count in totals.consumers.items():
            grown = increase(count, previous.consumers.get(consumer, 0))
            if grown > 0:
                consumers[consumer] = grown
        return Point(wall, False, routes,
                     route_point(all_requests, all_errors, all_buckets, seconds), consumers)

    # -- what the page gets ---------------------------------------------------------------

    def view(self, points: int, now: float) -> dict[str, Any]:
        """The JSON of GET .../dashboard/stats: the last `points` points for the busiest
        routes and the total, a row per route, the top consumers."""
        shown = list(self.points)[-points:] if points > 0 else []
        busiest: dict[str, float] = {}
        for point in shown:
            for route, values in point.routes.items():
                busiest[route] = busiest.get(route, 0.0) + (values[0] or 0.0)
        top = sorted(busiest, key=lambda route: (-busiest[route], route))[:TOP_ROUTES]
        series: dict[str, Any] = {
            "t": [point.wall for point in shown],
            "all": _columns([point.total for point in shown]),
            "routes": {route: _columns([point.routes.get(route, _idle(point))
                                        for point in shown]) for route in top},
        }
        return {
            "interval": SAMPLE_INTERVAL,
            "sampled_age": None if self.latest is None else max(now - self.sampled_at, 0.0),
            "series": series,
            "routes": self._route_rows(),
            "consumers": self._top_consumers(now),
        }

    def _route_rows(self) -> list[dict[str, Any]]:
        latest = self.latest
        if latest is None:
            return []
        # Rates over RATE_WINDOW: from the oldest recent sample still inside it.
        now, _ = self.recent[-1]
        base_at, base = next(((at, totals) for at, totals in self.recent
                              if now - at <= RATE_WINDOW + SAMPLE_INTERVAL / 2), (now, latest))
        seconds = now - base_at
        rows = []
        for route in sorted(latest.requests):
            requests = latest.requests[route]
            errors = latest.errors.get(route, 0)
            current: list[float | None] = [0.0, None, None, None]
            if seconds > 0:
                grown = increase(requests, base.requests.get(route, 0))
                current = route_point(
                    grown, increase(errors, base.errors.get(route, 0)),
                    _bucket_increase(latest.latency.get(route, []), base.latency.get(route)),
                    seconds)
            rows.append({"route": route, "requests": requests, "errors": errors,
                         "codes": dict(sorted(latest.codes.get(route, {}).items())),
                         "rps": current[0], "error_rate": current[1], "p50": current[2],
                         "p99": current[3],
                         # Since start: the quantiles over every request counted.
                         "p99_overall": quantile(0.99, latest.latency.get(route, []))})
        return rows

    def _top_consumers(self, now: float) -> list[dict[str, Any]]:
        latest = self.latest
        if latest is None:
            return []
        window: dict[str, int] = {}
        seconds = 0.0
        newest = self.points[-1].wall if self.points else 0.0
        for point in reversed(self.points):
            if point.gap or newest - point.wall >= CONSUMER_WINDOW:
                break
            seconds = newest - point.wall + SAMPLE_INTERVAL
            for consumer, count in point.consumers.items():
                window[consumer] = window.get(consumer, 0) + count
        ranked = sorted(latest.consumers, key=lambda c: (-window.get(c, 0),
                                                         -latest.consumers[c], c))
        return [{"consumer": consumer, "requests": latest.consumers[consumer],
                 "recent": window.get(consumer, 0),
                 "rps": window.get(consumer, 0) / seconds if seconds else 0.0}
                for consumer in ranked[:TOP_CONSUMERS]]


def _idle(point: Point) -> list[float | None]:
    # A route without requests in an interval: 0 req/s (a gap only after a pause).
    return [None, None, None, None] if point.gap else [0.0, None, None, None]


def _columns(rows: list[list[float | None]]) -> dict[str, list[float | None]]:
    return {"rps": [row[0] for row in rows], "error_rate": [row[1] for row in rows],
            "p50": [row[2] for row in rows], "p99": [row[3] for row in rows]}
