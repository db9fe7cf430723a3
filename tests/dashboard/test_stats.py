"""How the dashboard turns counters into the rates and quantiles it draws (no I/O: the
snapshots are what workers hand over)."""

from __future__ import annotations

from typing import Any

from sluicegate.dashboard.stats import MAX_GAP, TrafficHistory, quantile
from sluicegate.observe.metrics import LATENCY_BUCKETS


def buckets(**counts: int) -> list[int]:
    """Per-bucket counts by upper bound name, e.g. b0_002=10 for (1 ms, 2 ms]."""
    values = [0] * (len(LATENCY_BUCKETS) + 1)
    for name, count in counts.items():
        bound = float(name[1:].replace("_", "."))
        values[LATENCY_BUCKETS.index(bound)] = count
    return values


def snapshot(ok: int, failed: int, latency: list[int] | None = None,
             consumer: str = "") -> dict[str, Any]:
    hist = latency if latency is not None else buckets(b0_002=ok + failed)
    return {"requests": {("200", "r1", "", consumer, "n"): ok,
                         ("503", "r1", "", consumer, "n"): failed},
            "latency": {("request", "r1", "", consumer, "n"): (hist, sum(hist), 0.0),
                        # Slower upstream timings: mixed in, they would move the quantiles.
                        ("upstream", "r1", "", consumer, "n"): (
                            buckets(b1_0=sum(hist)), sum(hist), 0.0)}}


def test_quantiles_interpolate_within_a_bucket_as_prometheus_does():
    # 10 requests between 1 and 2 ms: the median is half way, p99 at 99 % of the bucket.
    assert quantile(0.5, buckets(b0_002=10)) == 0.0015
    assert abs(quantile(0.99, buckets(b0_002=10)) - 0.00199) < 1e-12
    # In the first bucket the lower bound is 0.
    assert quantile(0.5, buckets(b0_0005=4)) == 0.00025
    # Beyond the last finite bound: that bound (histogram_quantile's answer).
    overflow = [0] * (len(LATENCY_BUCKETS) + 1)
    overflow[-1] = 3
    assert quantile(0.5, overflow) == LATENCY_BUCKETS[-1]
    assert quantile(0.5, buckets()) is None


def test_points_are_rates_between_samples():
    history = TrafficHistory()
    history.add(snapshot(0, 0), 0.0, 1000.0)
    history.add(snapshot(15, 5), 2.0, 1002.0)
    series = history.view(10, 2.0)["series"]
    assert series["t"] == [1002.0]
    assert series["routes"]["r1"]["rps"] == [10.0]
    assert series["routes"]["r1"]["error_rate"] == [0.25]
    assert series["all"]["rps"] == [10.0]


def test_a_restarted_worker_counts_from_zero_not_negative():
    history = TrafficHistory()
    history.add(snapshot(100, 0), 0.0, 1000.0)
    history.add(snapshot(4, 0), 1.0, 1001.0)
    assert history.view(10, 1.0)["series"]["routes"]["r1"]["rps"] == [4.0]


def test_a_pause_between_polls_breaks_the_line():
    history = TrafficHistory()
    history.add(snapshot(0, 0), 0.0, 1000.0)
    history.add(snapshot(10, 0), 1.0, 1001.0)
    history.add(snapshot(500, 0), 2.0 + MAX_GAP, 1002.0 + MAX_GAP)
    history.add(snapshot(510, 0), 3.0 + MAX_GAP, 1003.0 + MAX_GAP)
    rps = history.view(10, 3.0 + MAX_GAP)["series"]["all"]["rps"]
    assert rps == [10.0, None, 10.0]


def test_only_request_latency_feeds_the_quantiles():
    history = TrafficHistory()
    history.add(snapshot(0, 0, buckets()), 0.0, 1000.0)
    history.add(snapshot(10, 0, buckets(b0_01=10)), 1.0, 1001.0)
    route = history.view(10, 1.0)["series"]["routes"]["r1"]
    assert route["p50"] == [0.0075]  # (5 ms, 10 ms]: half way; upstream rows not added in
