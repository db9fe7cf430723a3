"""core.json's rows and the rig's Markdown summary, from a run directory laid out as the rig
script writes it (wrk text, iperf3 JSON, the CPU accounting of each window)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sluicegate.benchrig.summary import rows, table

WRK = """Running 2s test @ http://10.210.2.2:80/bench
  1 threads and 50 connections
  Latency Distribution
     50%    {p50}
     75%    1.90ms
     90%    2.25ms
     99%   {p99}
  {requests} requests in 2.00s, 8.18MB read
Requests/sec:  {rps}
"""


def cpu(proxy_s: float, window_s: float = 2.0) -> dict:
    return {"cpus": {"cpu0": {"busy": 97.0, "steal": 0.0, "softirq": 40.0},
                     "cpu1": {"busy": 80.0, "steal": 0.0, "softirq": 20.0}},
            "window_s": window_s, "load_busy": 97.0, "proxy_busy": 80.0, "foreign_pct": 1.0,
            "proxy_cpu_s": proxy_s, "proxy_user_s": proxy_s / 2, "proxy_sys_s": proxy_s / 2,
            "attempts": 1, "kept": 1}


def iperf(gbps: float, seconds: float = 2.0) -> dict:
    bits = gbps * 1e9
    return {"end": {"sum_received": {"bytes": int(bits * seconds / 8),
                                     "bits_per_second": bits},
                    "sum_sent": {"retransmits": 12}}}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    (tmp_path / "runs").mkdir()
    (tmp_path / "meta.txt").write_text(
        "date: 2026-11-27T07:00:00+00:00\n"
        "settings: DURATION=2 RUNS=1 LOAD_CPU=0 GW_CPU=1 NOISE_MAX=10\n"
        "loads: close bulk\ncases: tproxy haproxy\nl4_copies: splice sockmap\n")
    runs = tmp_path / "runs"
    (runs / "r1_close_tproxy.txt").write_text(
        WRK.format(p50="1.47ms", p99="20.37ms", requests=34_000, rps="17000.00"))
    (runs / "r1_close_tproxy.cpu.json").write_text(json.dumps(cpu(proxy_s=1.7)))
    (runs / "r1_bulk_tproxy-splice.json").write_text(json.dumps(iperf(14.0)))
    (runs / "r1_bulk_tproxy-splice.cpu.json").write_text(json.dumps(cpu(proxy_s=1.05)))
    (runs / "r1_bulk_haproxy.json").write_text(json.dumps(iperf(7.0)))
    (runs / "r1_bulk_haproxy.cpu.json").write_text(json.dumps(cpu(proxy_s=1.05)))
    (tmp_path / "skipped.tsv").write_text("bulk/tproxy-sockmap\tthe gateway did not start\n")
    return tmp_path


def test_rows_hold_the_medians_per_load_case_and_copy_path(run_dir: Path) -> None:
    found = {(r["load"], r["case"], r["copy"]): r for r in rows(run_dir)}
    assert set(found) == {("close", "tproxy", None), ("bulk", "tproxy", "splice"),
                          ("bulk", "tproxy", "sockmap"), ("bulk", "haproxy", None)}
    close = found[("close", "tproxy", None)]
    assert close["value"] == 17000.0 and close["unit"] == "req/s"
    assert (close["p50_ms"], close["p99_ms"]) == (1.47, 20.37)
    assert close["gw_cpu_per_unit"] == pytest.approx(50.0)   # 1.7 s / 34,000 requests
    assert close["gw_cpu_pct"] == pytest.approx(85.0)        # 1.7 s of a 2 s window
    splice, haproxy = found[("bulk", "tproxy", "splice")], found[("bulk", "haproxy", None)]
    assert splice["value"] == pytest.approx(14.0) and splice["unit"] == "Gbit/s"
    assert splice["gw_cpu_per_unit"] == pytest.approx(0.3)   # 1.05 s / 3.5 GB
    assert haproxy["gw_cpu_per_unit"] == pytest.approx(0.6)  # 1.05 s / 1.75 GB
    assert found[("bulk", "tproxy", "sockmap")] == {
        "load": "bulk", "case": "tproxy", "copy": "sockmap", "unit": "Gbit/s",
        "measured": False, "skipped": "the gateway did not start"}


def test_table_puts_each_copy_path_against_haproxy_with_the_target(run_dir: Path) -> None:
    text = table(run_dir)
    assert ("| haproxy (mode tcp, explicit) | - | 7.00 | 0.60 | 52 | 1.00x | 1.00x "
            "| reference |") in text
    assert "| TPROXY (transparent) | splice | 14.00 | 0.30 | 52 | 2.00x | 0.50x | NOT met |" \
        in text
    assert "| TPROXY (transparent) | sockmap | - | - | - | - | - | not measured |" in text
    assert "target: a kernel copy path, splice or sockmap," in text
    # haproxy runs the bulk load only: no HTTP row for it
    assert "haproxy (mode tcp, explicit) L7" not in text
