"""examples/grafana/sluicegate.json: a Grafana dashboard that imports as is, whose every
query parses as PromQL and names only series the gateway exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboard.views import dashboard_config, metrics_text, send
from harness import ROOT

GRAFANA = ROOT / "examples" / "grafana" / "sluicegate.json"
# Grafana's own variables, replaced by what Grafana would put there before PromQL parses.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s",
                     "$instance": ".*", "$route": ".*"}
SERIES = re.compile(r"\bsluicegate_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return found


def queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [target["expr"] for panel in panels(dashboard)
             for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["query"]["query"])
    return exprs


def exported_series(text: str) -> set[str]:
    """Every series name a scrape can hold: sample names, and the names the TYPE lines
    announce (a family with no samples yet still tells its name)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
            if kind == "histogram":
                names.update(f"{name}{suffix}" for suffix in HISTOGRAM_SUFFIXES)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def kernel_series() -> set[str]:
    """The kernel families exist only where the XDP filter and tc flow counters are
    attached (root, a real interface: tests/bpf); their names come from the exposition
    code the gateway runs, fed one row of each kind."""
    from sluicegate.observe.exposition import render

    kernel = {
        "xdp": [{"interface": "eth0", "reason": "passed", "packets": 1, "bytes": 1},
                {"interface": "eth0", "reason": "denied", "packets": 1, "bytes": 1}],
        "xdp_rules": [{"rule": "10.0.0.0/8", "packets": 1}],
        "flow": [{"interface": "eth0", "direction": "ingress", "packets": 1, "bytes": 1,
                  "syns": 1}],
        "ports": [{"interface": "eth0", "direction": "ingress", "protocol": "tcp",
                   "port": "80", "packets": 1, "bytes": 1, "syns": 1}],
        "remotes": [{"prefix": "10.0.0.0/24", "direction": "ingress", "packets": 1,
                     "bytes": 1}],
        "retransmits": [{"port": "80", "count": 1}],
    }
    snapshot = {"requests": {}, "latency": {}, "bandwidth": {}, "upstream_status": {},
                "gauges": {}, "kernel": kernel}
    return {name for name in exported_series(render(snapshot).decode())
            if name.startswith("sluicegate_kernel_")}


@pytest.fixture(scope="module")
def exported(nginx, tmp_path_factory) -> set[str]:
    """Series of running gateways with traffic and health checks: one worker and two
    (the supervisor adds its own gauges)."""
    from harness import Gateway, wait_for_port

    names: set[str] = set()
    for workers in (1, 2):
        config = dashboard_config(
            [{"id": "r1", "uri": "/", "upstream_id": "pool"}],
            upstreams=[{"id": "pool", "nodes": {nginx.address: 1},
                        "checks": {"active": {"type": "tcp"}}}])
        gateway = Gateway(tmp_path_factory.mktemp(f"grafana-{workers}"), config,
                          workers=workers)
        try:
            # With workers, the supervisor opens /metrics after its workers are serving.
            wait_for_port(gateway.metrics_port, process=gateway.process)
            send(gateway, "/", 3)
            names |= exported_series(metrics_text(gateway))
        finally:
            gateway.stop()
    return names


def test_grafana_dashboard_has_the_shape_grafana_imports():
    dashboard = json.loads(GRAFANA.read_text())
    assert dashboard["title"] == "sluicegate" and dashboard["uid"]
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = {panel["title"] for panel in panels(dashboard)}
    for wanted in ("Requests/s by route", "Request latency (heatmap)",
                   "Upstream node health", "Tokens/s by model and type",
                   "XDP verdicts (packets/s)"):
        assert wanted in titles
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    heatmap = next(p for p in panels(dashboard) if p["type"] == "heatmap")
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert "sluicegate_http_latency_seconds_bucket" in heatmap["targets"][0]["expr"]
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert variables == ["datasource", "instance", "route"]


def test_grafana_queries_name_only_series_the_gateway_exports(exported):
    known = exported | kernel_series()
    dashboard = json.loads(GRAFANA.read_text())
    missing = {name for expr in queries(dashboard) for name in SERIES.findall(expr)
               if name not in known}
    assert missing == set(), f"not exported by the gateway: {sorted(missing)}"
    # The core series are there without any special setup.
    assert {"sluicegate_http_requests_total", "sluicegate_http_latency_seconds_bucket",
            "sluicegate_upstream_node_healthy", "sluicegate_ai_tokens_total",
            "sluicegate_worker_restarts"} <= exported


def test_grafana_queries_parse_as_promql(tmp_path: Path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: install Debian's `prometheus` package "
                    "(`make test` does)")
    dashboard = json.loads(GRAFANA.read_text())
    rules = []
    for index, expr in enumerate(queries(dashboard)):
        if expr.startswith("label_values("):
            continue  # Grafana's variable query, not PromQL
        for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(variable, value)
        rules.append({"record": f"grafana:query_{index}", "expr": expr})
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "grafana", "rules": rules}]}))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                             text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
