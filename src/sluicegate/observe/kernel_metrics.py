"""`sluicegate_kernel_*` series: the XDP filter's verdicts and the kernel flow counters
(bpf/xdp.py, bpf/flow_stats.py), read from the maps at scrape time by the process that
owns them and put in the snapshot under "kernel" (rows of plain values, picklable).

Label cardinality is bounded: interfaces and directions are configured; ports are bounded
in the kernel (the first 1024 keys, then port="other"); remote prefixes are the
`top_remotes` busiest (a prefix leaving the top N leaves /metrics until it returns); deny
rules are listed once they dropped something, at most MAX_RULE_SERIES of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily

# Deny rules exported per rule (the busiest): a deny list can hold 8192 prefixes.
MAX_RULE_SERIES = 100


def kernel_families(kernel: dict[str, Any] | None) -> Iterator[Any]:
    """The families for a snapshot's "kernel" entry (nothing when the block is off)."""
    if not kernel:
        return
    if "xdp" in kernel:
        yield from _xdp_families(kernel)
    if "flow" in kernel:
        yield from _flow_families(kernel)


def _xdp_families(kernel: dict[str, Any]) -> Iterator[Any]:
    passed = CounterMetricFamily("sluicegate_kernel_xdp_passed_packets",
                                 "Packets the XDP filter let into the network stack",
                                 labels=["interface"])
    dropped = CounterMetricFamily(
        "sluicegate_kernel_xdp_dropped_packets",
        "Packets the XDP filter dropped, by reason (denied: source in a deny prefix; "
        "rate_limited: over the per-source packet rate; syn_limited: a new TCP connection "
        "over the per-source SYN rate)", labels=["interface", "reason"])
    dropped_bytes = CounterMetricFamily("sluicegate_kernel_xdp_dropped_bytes",
                                        "Bytes of the packets the XDP filter dropped",
                                        labels=["interface", "reason"])
    for row in kernel["xdp"]:
        if row["reason"] == "passed":
            passed.add_metric([row["interface"]], row["packets"])
        else:
            dropped.add_metric([row["interface"], row["reason"]], row["packets"])
            dropped_bytes.add_metric([row["interface"], row["reason"]], row["bytes"])
    yield passed
    yield dropped
    yield dropped_bytes
    rules = CounterMetricFamily(
        "sluicegate_kernel_xdp_rule_dropped_packets",
        f"Packets dropped per deny prefix (those that dropped any; the {MAX_RULE_SERIES} "
        "busiest)", labels=["rule"])
    busy = sorted((row for row in kernel.get("xdp_rules", []) if row["packets"]),
                  key=lambda row: -row["packets"])[:MAX_RULE_SERIES]
    for row in busy:
        rules.add_metric([row["rule"]], row["packets"])
    yield rules


def _flow_families(kernel: dict[str, Any]) -> Iterator[Any]:
    labels = ["interface", "direction"]
    packets = CounterMetricFamily("sluicegate_kernel_packets",
                                  "Packets seen by tc on the interface, by direction",
                                  labels=labels)
    size = CounterMetricFamily("sluicegate_kernel_bytes",
                               "Bytes (with the link-layer header) seen by tc, by direction",
                               labels=labels)
    connections = CounterMetricFamily(
        "sluicegate_kernel_tcp_connections",
        "TCP connections opened through the interface (SYNs without ACK; ingress: by remote "
        "hosts, egress: towards them; a retransmitted SYN counts again)", labels=labels)
    for row in kernel["flow"]:
        key = [row["interface"], row["direction"]]
        packets.add_metric(key, row["packets"])
        size.add_metric(key, row["bytes"])
        connections.add_metric(key, row["syns"])
    yield packets
    yield size
    yield connections
    port_labels = ["interface", "direction", "protocol", "port"]
    port_packets = CounterMetricFamily(
        "sluicegate_kernel_port_packets",
        "Packets by port: the lower of source and destination port, the service's port for "
        "ephemeral-port clients (port=\"other\": keys beyond the kernel's 1024)",
        labels=port_labels)
    port_bytes = CounterMetricFamily("sluicegate_kernel_port_bytes",
                                     "Bytes by port (see sluicegate_kernel_port_packets)",
                                     labels=port_labels)
    port_connections = CounterMetricFamily(
        "sluicegate_kernel_port_tcp_connections",
        "TCP connections opened, by port (see sluicegate_kernel_port_packets)",
        labels=["interface", "direction", "port"])
    for row in kernel.get("ports", []):
        key = [row["interface"], row["direction"], row["protocol"], row["port"]]
        port_packets.add_metric(key, row["packets"])
        port_bytes.add_metric(key, row["bytes"])
        if row["protocol"] == "tcp":
            port_connections.add_metric([row["interface"], row["direction"], row["port"]],
                                        row["syns"])
    yield port_packets
    yield port_bytes
    yield port_connections
    remote_packets = CounterMetricFamily(
        "sluicegate_kernel_remote_packets",
        "Packets from (ingress) and to (egress) the busiest remote prefixes (/24, /64 by "
        "default; the top N by bytes)", labels=["prefix", "direction"])
    remote_bytes = CounterMetricFamily("sluicegate_kernel_remote_bytes",
                                       "Bytes from and to the busiest remote prefixes",
                                       labels=["prefix", "direction"])
    for row in kernel.get("remotes", []):
        remote_packets.add_metric([row["prefix"], row["direction"]], row["packets"])
        remote_bytes.add_metric([row["prefix"], row["direction"]], row["bytes"])
    yield remote_packets
    yield remote_bytes
    retransmits = CounterMetricFamily(
        "sluicegate_kernel_tcp_retransmits",
        "TCP segments retransmitted by this network namespace's sockets (the gateway's "
        "among them), by port (the lower of local and remote port)", labels=["port"])
    for row in kernel.get("retransmits", []):
        retransmits.add_metric([row["port"]], row["count"])
    yield retransmits
