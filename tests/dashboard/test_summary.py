"""The counters section of the summary: /metrics families grouped by what they count, so
the page puts kernel, AI and interception counters under their own headings (the kernel
ones need an XDP-capable rig, tests/bpf; here their exposition code is fed rows)."""

from __future__ import annotations

from sluicegate.dashboard.summary import exported_families


def test_counters_are_grouped_by_what_they_count():
    snapshot = {
        "requests": {("200", "r1", "", "", "n"): 3}, "latency": {}, "bandwidth": {},
        "upstream_status": {}, "gauges": {"workers": 1},
        "intercepted": {("ebpf", "10.0.0.1:80"): 2},
        "stream": {("tcp", "s1"): [1, 10, 20]},
        "kernel": {"xdp": [{"interface": "eth0", "reason": "denied", "packets": 7,
                            "bytes": 420}]},
    }
    groups = exported_families(snapshot)
    names = {group: {family["name"] for family in families}
             for group, families in groups.items()}
    assert "sluicegate_kernel_xdp_dropped_packets" in names["kernel"]
    assert "sluicegate_intercepted_requests" in names["interception"]
    assert "sluicegate_stream_connections" in names["stream"]
    assert "sluicegate_ai_tokens" in names["ai"]
    assert "sluicegate_workers" in names["gateway"]
    # Charted elsewhere on the page, not repeated as tables.
    assert all("sluicegate_http_requests" not in group for group in names.values())
    dropped = next(f for f in groups["kernel"]
                   if f["name"] == "sluicegate_kernel_xdp_dropped_packets")
    assert dropped["samples"] == [{"name": "sluicegate_kernel_xdp_dropped_packets_total",
                                   "labels": {"interface": "eth0", "reason": "denied"},
                                   "value": 7.0}]
