"""`kernel.flow_metrics` end to end: sluicegate, in the gateway namespace of a client —
gateway — server rig (tests/net), proxies curl's requests to nginx in the server namespace
while its tc and tracepoint programs count; /metrics shows `sluicegate_kernel_*` series and
`sluicegate bpf status` the same counters."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest

from bpf.kernel_rig import (
    FLOWS_READY,
    PROMETHEUS,
    SERVING,
    answered,
    bpf_status,
    curl,
    is_root,
    kernel_bpffs_fixture,  # noqa: F401  (the `kernel_bpffs` fixture)
    metrics,
    pinned_names,
    sample,
    start_gateway,
    url,
    wait_for,
)
from net.bpffs import bpffs_fixture  # noqa: F401  (the `bpffs` fixture)
from net.conftest import rig_fixture  # noqa: F401  (the `rig` fixture)
from net.rig import Rig

pytestmark = pytest.mark.skipif(not is_root(), reason="tc and tracepoint programs need root")
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
GATEWAY_PORT = 9080


def proxy(rig: Rig, **flow_metrics: Any) -> dict[str, Any]:
    """The gateway proxies everything on :9080 to nginx in the server namespace, with flow
    metrics on both of its interfaces."""
    return {
        "routes": [{"id": "all", "uri": "/*",
                    "upstream": {"nodes": {f"{rig.server_v4}:80": 1}}}],
        "plugins": [PROMETHEUS],
        "kernel": {"flow_metrics": {
            "interfaces": [rig.gateway_client_if, rig.gateway_server_if], **flow_metrics}}}


@pytest.mark.parametrize("workers", [1, 2])
def test_kernel_metrics_count_packets_bytes_and_connections_after_curl_traffic(
        rig, kernel_bpffs, workers):
    rig.start_nginx(80)
    extra = ("--workers", str(workers)) if workers > 1 else ()
    start_gateway(rig, proxy(rig), f"gateway{workers}", *extra, ready=(FLOWS_READY, SERVING))
    requests = 5
    for _ in range(requests):
        status, body = answered(curl(rig, url(rig.gateway_client_v4, GATEWAY_PORT)))
        assert (status, body) == (200, f"server={rig.server_v4} remote={rig.gateway_server_v4}")
    text = metrics(rig)
    client_side = {"interface": rig.gateway_client_if}
    # One new connection per curl, opened by the client (ingress) on the gateway's port.
    assert sample(text, "sluicegate_kernel_tcp_connections_total", direction="ingress",
                  **client_side) == requests
    assert sample(text, "sluicegate_kernel_tcp_connections_total", direction="egress",
                  **client_side) == 0
    assert sample(text, "sluicegate_kernel_port_tcp_connections_total", direction="ingress",
                  port=str(GATEWAY_PORT), **client_side) == requests
    # SYN, request, ACKs and FIN at least, each way.
    assert sample(text, "sluicegate_kernel_packets_total", direction="ingress",
                  **client_side) >= 3 * requests
    assert sample(text, "sluicegate_kernel_bytes_total", direction="egress",
                  **client_side) >= requests * len(body)
    assert sample(text, "sluicegate_kernel_port_bytes_total", direction="ingress",
                  protocol="tcp", port=str(GATEWAY_PORT), **client_side) > 0
    # The gateway opened at least one upstream connection to nginx's port 80.
    assert sample(text, "sluicegate_kernel_port_tcp_connections_total", direction="egress",
                  port="80", interface=rig.gateway_server_if) >= 1
    # The client's /24 is among the busiest remote prefixes.
    client_prefix = rig.client_v4.rsplit(".", 1)[0] + ".0/24"
    assert sample(text, "sluicegate_kernel_remote_packets_total", prefix=client_prefix,
                  direction="ingress") >= 3 * requests
    assert "# TYPE sluicegate_kernel_tcp_retransmits" in text  # the family, no samples yet
    if os.path.exists(PROMTOOL):
        linted = subprocess.run([PROMTOOL, "check", "metrics"], input=text,
                                capture_output=True, text=True, timeout=30)
        assert linted.returncode == 0, linted.stdout + linted.stderr
    # `sluicegate bpf status` lists the programs and the same counters.
    status = bpf_status(rig)
    assert {"sg_flow_in", "sg_flow_out", "sg_flow_retx", "sg_flow_ports"} <= \
        pinned_names(status)
    types = sorted(link["type"] for link in status["links"])
    assert types.count("tcx") == 4, types  # ingress and egress on two interfaces
    assert any(kind in ("raw_tracepoint", "tracing") for kind in types), types
    flows = {(row["interface"], row["direction"]): row for row in status["kernel"]["flow"]}
    assert flows[(rig.gateway_client_if, "ingress")]["syns"] == requests


NFT_DROP_HTTP = """
table inet sgtest {
    chain input {
        type filter hook input priority 0;
        tcp dport 80 drop
    }
}
"""


def test_kernel_metrics_count_retransmits_when_the_server_drops_packets(rig, kernel_bpffs):
    rig.start_nginx(80)
    start_gateway(rig, proxy(rig), ready=(FLOWS_READY, SERVING))
    # The server drops what the gateway sends it: the gateway's upstream SYN is retransmitted.
    rig.server.run(["nft", "-f", "-"], input=NFT_DROP_HTTP)
    client = rig.start_in(rig.client, ["curl", "-s", "-m", "20", "-o", "-", "-w",
                                       "\n%{http_code}", url(rig.gateway_client_v4,
                                                             GATEWAY_PORT)])

    def retransmits() -> float | None:
        return sample(metrics(rig), "sluicegate_kernel_tcp_retransmits_total", port="80")

    assert wait_for(retransmits, "a retransmit to port 80 is counted") >= 1
    rig.server.run(["nft", "delete", "table", "inet", "sgtest"])
    # The next retransmission gets through and the request completes.
    output, _ = client.communicate(timeout=30)
    assert output.rpartition("\n")[2] == "200", output
    # Only the gateway's namespace is counted: the client's connection to :9080 lost
    # nothing, and other namespaces' sockets are filtered out by the program.
    shown = {row["port"]: row["count"] for row in bpf_status(rig)["kernel"]["retransmits"]}
    assert shown.get("80", 0) >= 1 and str(GATEWAY_PORT) not in shown


def test_top_remotes_zero_leaves_remote_series_out(rig, kernel_bpffs):
    rig.start_nginx(80)
    start_gateway(rig, proxy(rig, top_remotes=0, retransmits=False),
                  ready=(FLOWS_READY, SERVING))
    assert answered(curl(rig, url(rig.gateway_client_v4, GATEWAY_PORT)))[0] == 200
    text = metrics(rig)
    assert sample(text, "sluicegate_kernel_remote_packets_total") is None
    assert sample(text, "sluicegate_kernel_tcp_connections_total", direction="ingress",
                  interface=rig.gateway_client_if) == 1
    # Without retransmit counting, no tracepoint link.
    types = [link["type"] for link in bpf_status(rig)["links"]]
    assert sorted(types) == ["tcx"] * 4, types
