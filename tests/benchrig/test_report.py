"""The report of `sluicegate bench interception`, from small result files: the printed table,
the PNG plots, and docs/tproxy-vs-ebpf.md with its targets judged from the numbers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sluicegate.benchrig.report import ReportError, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def core_rows(ebpf_close: float = 17_835, splice_cpu: float = 0.30) -> list[dict[str, Any]]:
    def http(load: str, case: str, value: float, p50: float, p99: float, us: float) -> dict:
        return {"load": load, "case": case, "copy": None, "unit": "req/s", "measured": True,
                "value": value, "runs": [value], "p50_ms": p50, "p99_ms": p99,
                "gw_cpu_per_unit": us, "gw_cpu_pct": 99.0}

    def bulk(case: str, copy: str | None, gbps: float, s_per_gb: float) -> dict:
        return {"load": "bulk", "case": case, "copy": copy, "unit": "Gbit/s", "measured": True,
                "value": gbps, "runs": [gbps], "p50_ms": None, "p99_ms": None,
                "gw_cpu_per_unit": s_per_gb, "gw_cpu_pct": 60.0}

    return [
        http("keepalive", "explicit", 44_733, 1.10, 1.76, 22.2),
        http("keepalive", "tproxy", 44_703, 1.10, 1.72, 22.2),
        http("keepalive", "ebpf", 45_415, 1.08, 1.68, 21.9),
        http("close", "explicit", 18_714, 1.43, 25.3, 47.6),
        http("close", "tproxy", 17_159, 1.51, 28.5, 50.7),
        http("close", "ebpf", ebpf_close, 1.44, 30.4, 47.8),
        bulk("explicit", "splice", 15.07, splice_cpu),
        bulk("explicit", "sockmap", 3.43, 0.14),
        bulk("tproxy", "splice", 14.20, 0.31),
        bulk("ebpf", "splice", 14.53, 0.31),
        bulk("haproxy", None, 7.61, 0.62),
        {"load": "bulk", "case": "tproxy", "copy": "sockmap", "unit": "Gbit/s",
         "measured": False, "skipped": "the gateway did not start"},
    ]


def scaling_rows(tproxy_100k: float = 16_900) -> list[dict[str, Any]]:
    rows = []
    for mode, rates in (("tproxy", (17_000, 16_950, tproxy_100k)),
                        ("ebpf", (17_800, 17_790, 17_750))):
        for prefixes, rate in zip((10, 1000, 100_000), rates, strict=True):
            rows.append({"mode": mode, "prefixes": prefixes, "conn_per_s": rate,
                         "p50_ms": 1.5, "p99_ms": 20.0, "gateway_cpu_us_per_conn": 48.0,
                         "setup_s": 0.01 * prefixes / 1000})
    return rows


def flood_rows(xdp_pps: float = 5_000_000) -> list[dict[str, Any]]:
    return [
        {"path": "xdp", "offered_pps": 5_100_000, "dropped_pps": xdp_pps,
         "reached_userspace": 0, "cpu_pct": 40.0, "note": "generic XDP on veth"},
        {"path": "nftables", "offered_pps": 2_000_000, "dropped_pps": 1_500_000,
         "reached_userspace": 0, "cpu_pct": 90.0, "note": ""},
        {"path": "userspace", "offered_pps": 1_000_000, "dropped_pps": 100_000,
         "reached_userspace": 100_000, "cpu_pct": None, "note": "recv + close"},
    ]


def write_part(out: Path, part: str, rows: list[dict[str, Any]]) -> None:
    meta = {"commit": "abc1234", "kernel": "6.18.44", "date": "2026-11-27 07:00 UTC",
            "duration": 2, "runs": 1, "method": [f"{part}: fixture"]}
    (out / f"{part}.json").write_text(json.dumps({"part": part, "meta": meta, "rows": rows}))


@pytest.fixture
def results(tmp_path: Path) -> Path:
    out = tmp_path / "results"
    out.mkdir()
    write_part(out, "core", core_rows())
    write_part(out, "scaling", scaling_rows())
    write_part(out, "flood", flood_rows())
    return out


def verdicts(doc: str) -> dict[str, str]:
    """target name → verdict, from the targets table of the document."""
    found = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[3].startswith("**"):
            found[cells[0]] = cells[3].strip("*")
    return found


def test_report_prints_the_modes_side_by_side_with_measured_numbers(results: Path,
                                                                      tmp_path: Path) -> None:
    table = write_report(results, tmp_path / "docs" / "tproxy-vs-ebpf.md")
    lines = table.splitlines()
    assert lines[0] == "|  | explicit proxy | TPROXY (nftables) | eBPF sk_lookup |"
    assert "| HTTP keep-alive req/s | 44,733 | 44,703 | 45,415 |" in lines
    assert "| connection rate (new connection per request), req/s | 18,714 | 17,159 | 17,835 |" \
        in lines
    assert "| keep-alive p50 / p99 ms | 1.10 / 1.76 | 1.10 / 1.72 | 1.08 / 1.68 |" in lines
    assert "| TCP bulk Gbit/s, splice (gateway CPU s/GB) | 15.07 (0.30) | 14.20 (0.31) " \
        "| 14.53 (0.31) |" in lines
    assert "| connections/s with 100,000 intercepted prefixes | n/a | 16,900 | 17,750 |" in lines
    assert ("| dropping a flood in the kernel, packets/s | user space: 100,000 "
            "| nftables: 1,500,000 | XDP: 5,000,000 |") in lines
    # a row the run skipped is not measured, not zero
    assert "| TCP bulk Gbit/s, sockmap (gateway CPU s/GB) | 3.43 (0.14) | not measured " \
        "| not measured |" in lines


def test_report_judges_each_target_from_the_numbers(results: Path, tmp_path: Path) -> None:
    doc_path = tmp_path / "docs" / "tproxy-vs-ebpf.md"
    write_report(results, doc_path)
    doc = doc_path.read_text()
    assert verdicts(doc) == {
        "eBPF vs TPROXY connection rate": "met",            # 17,835 / 17,159 = 1.04x
        "rule scaling 10 → 100,000 prefixes": "met",        # -0.6 % and -0.3 %
        "kernel copy (sockmap, splice) vs haproxy-tcp": "not met",  # 1.98x throughput, 0.48x CPU
        "XDP drop vs user-space rejection": "met",          # 50x
    }
    assert "1.04x (17,835 vs 17,159 connections/s)" in doc
    assert ("veth default, splice: 1.98x haproxy-tcp throughput at 0.48x its proxy CPU per "
            "GB") in doc
    assert ("TPROXY (nftables) -0.6 % (gateway CPU per connection +0.0 %); "
            "eBPF sk_lookup -0.3 % (gateway CPU per connection +0.0 %)") in doc
    assert "50.00x (5,000,000 vs 100,000 packets/s); a lower bound: XDP dropped about all it " \
        "was offered" in doc

    # other numbers, other verdicts
    write_part(results, "core", core_rows(ebpf_close=16_000, splice_cpu=0.10))
    write_part(results, "scaling", scaling_rows(tproxy_100k=15_000))
    write_part(results, "flood", flood_rows(xdp_pps=1_500_000))
    write_report(results, doc_path)
    assert verdicts(doc_path.read_text()) == {
        "eBPF vs TPROXY connection rate": "not met",
        "rule scaling 10 → 100,000 prefixes": "not met",    # TPROXY -11.8 %
        "kernel copy (sockmap, splice) vs haproxy-tcp": "met",  # 1.98x at 0.16x
        "XDP drop vs user-space rejection": "not met",      # 15x
    }


def test_report_writes_non_empty_pngs_and_embeds_them_in_the_doc(results: Path,
                                                                tmp_path: Path) -> None:
    doc_path = tmp_path / "docs" / "tproxy-vs-ebpf.md"
    write_report(results, doc_path)
    names = ["rates", "latency", "bulk", "scaling", "flood"]
    doc = doc_path.read_text()
    for name in names:
        for png in (results / f"tproxy-vs-ebpf-{name}.png",
                    tmp_path / "docs" / "img" / f"tproxy-vs-ebpf-{name}.png"):
            data = png.read_bytes()
            assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, png
        assert f"](img/tproxy-vs-ebpf-{name}.png)" in doc


def test_a_missing_part_is_reported_as_not_measured(tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    write_part(out, "core", core_rows())
    doc_path = tmp_path / "docs" / "tproxy-vs-ebpf.md"
    table = write_report(out, doc_path)
    doc = doc_path.read_text()
    assert "| connections/s with 1,000 intercepted prefixes | n/a | not measured " \
        "| not measured |" in table
    assert verdicts(doc) == {
        "eBPF vs TPROXY connection rate": "met",
        "rule scaling 10 → 100,000 prefixes": "not measured",
        "kernel copy (sockmap, splice) vs haproxy-tcp": "not met",
        "XDP drop vs user-space rejection": "not measured",
    }
    assert "- **scaling**: not measured (no scaling.json)." in doc
    assert "Noisy" not in doc
    assert "- **flood**: not measured (no flood.json)." in doc
    assert not (out / "tproxy-vs-ebpf-scaling.png").exists()
    assert not (out / "tproxy-vs-ebpf-flood.png").exists()
    assert (out / "tproxy-vs-ebpf-rates.png").stat().st_size > 0


def test_no_results_at_all_give_a_report_of_nothing_measured(tmp_path: Path) -> None:
    doc_path = tmp_path / "tproxy-vs-ebpf.md"
    table = write_report(tmp_path, doc_path)
    doc = doc_path.read_text()
    assert set(verdicts(doc).values()) == {"not measured"}
    # every measured cell says so: no number is filled in from anywhere
    measured_rows = [line for line in table.splitlines()
                     if re.match(r"\| (HTTP|connection|keep-alive|new|gateway|TCP|connections|rule "
                                 r"setup|dropping)", line)]
    assert len(measured_rows) == 13
    for line in measured_rows:
        cells = {c.strip().split(": ")[-1] for c in line.strip("|").split("|")[1:]}
        assert cells <= {"not measured", "n/a"}, line
    assert not list(tmp_path.glob("*.png"))


def test_no_plots_writes_the_doc_without_images(results: Path, tmp_path: Path) -> None:
    doc_path = tmp_path / "docs" / "tproxy-vs-ebpf.md"
    write_report(results, doc_path, plots=False)
    assert "![" not in doc_path.read_text()
    assert not list(results.glob("*.png"))


def test_a_broken_result_file_is_named_with_its_field(results: Path, tmp_path: Path) -> None:
    (results / "flood.json").write_text(json.dumps({"part": "flood", "rows": {"xdp": 1}}))
    with pytest.raises(ReportError, match=r"flood\.json: rows: expected a list"):
        write_report(results, tmp_path / "doc.md")
    (results / "flood.json").write_text(json.dumps({"part": "core", "rows": []}))
    with pytest.raises(ReportError, match=r"flood\.json: part: expected 'flood'"):
        write_report(results, tmp_path / "doc.md")


def test_report_module_prints_the_table_and_writes_the_doc(results: Path,
                                                          tmp_path: Path) -> None:
    doc_path = tmp_path / "out.md"
    done = subprocess.run([sys.executable, "-m", "sluicegate.benchrig.report", "--out",
                           str(results), "--doc", str(doc_path), "--no-plots"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "| eBPF vs TPROXY connection rate | eBPF ≥ 1.00x TPROXY |" in done.stdout
    assert doc_path.read_text().startswith("# TPROXY vs eBPF: measured")


def test_a_noisy_core_run_is_flagged_in_the_doc(tmp_path: Path) -> None:
    rows = core_rows()
    rows[0]["foreign_max_pct"] = 105.8
    write_part(tmp_path, "core", rows)
    doc_path = tmp_path / "doc.md"
    write_report(tmp_path, doc_path, plots=False)
    assert ("**Noisy**: other processes used up to 106 % of a CPU during measured windows"
            in doc_path.read_text())


def test_copy_part_is_judged_too_and_names_its_rig(results: Path, tmp_path: Path) -> None:
    # The copy part: the same bulk rows measured with the gateway's receive work on its core.
    def bulk(case: str, copy: str | None, gbps: float, s_per_gb: float, core: float) -> dict:
        return {"load": "bulk", "case": case, "copy": copy, "unit": "Gbit/s", "measured": True,
                "value": gbps, "runs": [gbps], "gw_cpu_per_unit": s_per_gb,
                "gw_cpu_pct": 20.0, "gw_core_per_unit": core}

    write_part(results, "copy", [bulk("explicit", "sockmap", 7.27, 0.23, 0.75),
                                 bulk("explicit", "splice", 13.8, 0.34, 0.43),
                                 bulk("haproxy", None, 5.82, 1.32, 1.27)])
    doc_path = tmp_path / "docs" / "tproxy-vs-ebpf.md"
    write_report(results, doc_path)
    doc = doc_path.read_text()
    # 7.27 / 5.82 = 1.25x at 0.23 / 1.32 = 0.17x: met in that rig, whatever the core rig says.
    assert verdicts(doc)["kernel copy (sockmap, splice) vs haproxy-tcp"] == "met"
    assert ("gateway-core receive (RPS), sockmap: 1.25x haproxy-tcp throughput at 0.17x its "
            "proxy CPU per GB (0.59x counting all of the gateway core)") in doc
    assert "## TCP bulk with the gateway's receive work on its own core (copy part)" in doc
    assert "| explicit proxy | sockmap | 7.27 | 0.23 | 20 | 0.75 | 1.25x | 0.17x | 0.59x |" in doc
