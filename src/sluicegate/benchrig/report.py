"""The report of `sluicegate bench interception`: reads DIR/{core,copy,scaling,flood}.json,
prints one table, writes PNG plots into DIR and the Markdown document
(docs/tproxy-vs-ebpf.md) with the plots copied next to it (docs/img/).

A part whose JSON is missing is "not measured" everywhere it would appear; no number is ever
filled in from anywhere else. Targets are judged from the numbers in the files.

    python -m sluicegate.benchrig.report --out DIR [--doc PATH] [--no-plots]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluicegate.benchrig import PARTS

NOT_MEASURED = "not measured"
MODES = ("explicit", "tproxy", "ebpf")
MODE_LABELS = {"explicit": "explicit proxy", "tproxy": "TPROXY (nftables)",
               "ebpf": "eBPF sk_lookup", "haproxy": "haproxy (mode tcp)", "direct": "direct"}
COPIES = ("splice", "sockmap", "userspace")
FLOOD_PATHS = ("xdp", "nftables", "userspace")
FLOOD_LABELS = {"xdp": "XDP drop", "nftables": "nftables drop",
                "userspace": "user-space rejection"}
PREFIX_COUNTS = (10, 1000, 100000)

# Issue 4's targets.
EBPF_RATE_MIN = 1.0       # eBPF connection rate ≥ 1.0x TPROXY's
SCALING_CHANGE_MAX = 0.05  # 10 → 100k prefixes changes the connection rate by ≤ 5 %
SPLICE_RATE_MIN = 1.0     # splice ≥ 1.0x haproxy-tcp Gbit/s ...
SPLICE_CPU_MAX = 0.2      # ... at ≤ 0.2x its proxy CPU per GB
XDP_RATIO_MIN = 20.0      # XDP drops ≥ 20x the packets/s of user-space rejection

PLOTS = {"rates": "keep-alive req/s and connection rate per mode",
         "latency": "p50 / p99 latency per mode",
         "bulk": "bulk Gbit/s and proxy CPU per copy path, haproxy in TCP mode",
         "scaling": "connection rate against intercepted prefixes",
         "flood": "packets/s per drop path under a flood"}
IMG_PREFIX = "tproxy-vs-ebpf-"
NOISE_MAX_PCT = 10.0   # the rig's NOISE_MAX: more foreign CPU than this in a window is noise


class ReportError(Exception):
    """A result file that can't be used; the message names the file and field."""


# ------------------------------------------------------------------ reading
def load_parts(out: Path) -> dict[str, dict | None]:
    """DIR/<part>.json of each part, None where missing."""
    parts: dict[str, dict | None] = {}
    for part in PARTS:
        path = out / f"{part}.json"
        if not path.exists():
            parts[part] = None
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ReportError(f"{path}: not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("part") != part:
            raise ReportError(f"{path}: part: expected {part!r}")
        if not isinstance(data.get("rows"), list):
            raise ReportError(f"{path}: rows: expected a list")
        if not isinstance(data.get("meta", {}), dict):
            raise ReportError(f"{path}: meta: expected an object")
        for i, row in enumerate(data["rows"]):
            if not isinstance(row, dict):
                raise ReportError(f"{path}: rows[{i}]: expected an object")
        parts[part] = data
    return parts


def _num(row: dict | None, key: str) -> float | None:
    if row is None:
        return None
    v = row.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def core_row(parts: dict, load: str, case: str, copy: str | None = None,
             part: str = "core") -> dict | None:
    """A row of the core rig's results (or of the copy part's, the same rig with RPS)."""
    core = parts.get(part)
    if core is None:
        return None
    for row in core["rows"]:
        if (row.get("load") == load and row.get("case") == case
                and (row.get("copy") or None) == copy and row.get("measured", True)):
            return row
    return None


def scaling_row(parts: dict, mode: str, prefixes: int) -> dict | None:
    scaling = parts.get("scaling")
    if scaling is None:
        return None
    return next((r for r in scaling["rows"]
                 if r.get("mode") == mode and r.get("prefixes") == prefixes), None)


def scaling_counts(parts: dict) -> list[int]:
    scaling = parts.get("scaling")
    if scaling is None:
        return list(PREFIX_COUNTS)
    found = sorted({r["prefixes"] for r in scaling["rows"] if isinstance(r.get("prefixes"), int)})
    return found or list(PREFIX_COUNTS)


def flood_row(parts: dict, path: str) -> dict | None:
    flood = parts.get("flood")
    if flood is None:
        return None
    return next((r for r in flood["rows"] if r.get("path") == path), None)


# ------------------------------------------------------------------ formatting
def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(v: float | None, digits: int = 0, suffix: str = "") -> str:
    if v is None:
        return NOT_MEASURED
    return f"{v:,.{digits}f}{suffix}"


def fx(v: float | None) -> str:
    return NOT_MEASURED if v is None else f"{v:.2f}x"


# ------------------------------------------------------------------ targets
@dataclass
class Target:
    name: str
    wanted: str
    measured: str
    verdict: str   # "met", "not met" or NOT_MEASURED


def _verdict(ok: bool | None) -> str:
    return NOT_MEASURED if ok is None else ("met" if ok else "not met")


def target_connection_rate(parts: dict) -> Target:
    ebpf, tproxy = core_row(parts, "close", "ebpf"), core_row(parts, "close", "tproxy")
    r = _ratio(_num(ebpf, "value"), _num(tproxy, "value"))
    measured = NOT_MEASURED if r is None else (
        f"{fx(r)} ({fmt(_num(ebpf, 'value'))} vs {fmt(_num(tproxy, 'value'))} connections/s)")
    return Target("eBPF vs TPROXY connection rate", "eBPF ≥ 1.00x TPROXY", measured,
                  _verdict(None if r is None else r >= EBPF_RATE_MIN))


def scaling_change(parts: dict, mode: str, key: str = "conn_per_s") -> float | None:
    """Relative change of `key` from the fewest to the most prefixes."""
    counts = scaling_counts(parts)
    low = _num(scaling_row(parts, mode, counts[0]), key)
    high = _num(scaling_row(parts, mode, counts[-1]), key)
    if len(counts) < 2 or low is None or high is None or not low:
        return None
    return high / low - 1


def _scaling_text(parts: dict, mode: str) -> str:
    change = scaling_change(parts, mode)
    if change is None:
        return f"{MODE_LABELS[mode]} {NOT_MEASURED}"
    cpu = scaling_change(parts, mode, "gateway_cpu_us_per_conn")
    return (f"{MODE_LABELS[mode]} {change * 100:+.1f} %"
            + ("" if cpu is None else f" (gateway CPU per connection {cpu * 100:+.1f} %)"))


def target_scaling(parts: dict) -> Target:
    # Judged on the connection rate: the per-packet rule work runs in softirq, mostly outside
    # the gateway process, so its CPU per connection alone would miss it (shown for reference).
    counts = scaling_counts(parts)
    changes = {m: scaling_change(parts, m) for m in ("tproxy", "ebpf")}
    measured = "; ".join(_scaling_text(parts, m) for m in changes)
    known = [abs(c) for c in changes.values() if c is not None]
    ok = None if len(known) < len(changes) else max(known) <= SCALING_CHANGE_MAX
    return Target(f"rule scaling {counts[0]:,} → {counts[-1]:,} prefixes",
                  "connection rate changes ≤ 5 % in each mode", measured, _verdict(ok))


COPY_RIGS = (("core", "veth default"), ("copy", "gateway-core receive (RPS)"))


def target_splice(parts: dict) -> Target:
    # Both kernel copy paths of the explicit L4 proxy against haproxy in TCP mode, in each
    # rig measured: the core rig, and the copy part's (the gateway ns's receive work on the
    # gateway's core). "Proxy CPU" is the proxy's processes' utime+stime; the sockmap
    # path's softirq and work-queue time is not in it (the gateway-core column has it).
    texts: list[str] = []
    verdicts: list[bool] = []
    for part, label in COPY_RIGS:
        if parts.get(part) is None:
            continue
        haproxy = core_row(parts, "bulk", "haproxy", part=part)
        for copy in ("sockmap", "splice"):
            row = core_row(parts, "bulk", "explicit", copy, part=part)
            thr = _ratio(_num(row, "value"), _num(haproxy, "value"))
            cpu = _ratio(_num(row, "gw_cpu_per_unit"), _num(haproxy, "gw_cpu_per_unit"))
            if thr is None or cpu is None:
                texts.append(f"{label}, {copy} {NOT_MEASURED}")
                continue
            core_cpu = _ratio(_num(row, "gw_core_per_unit"),
                              _num(haproxy, "gw_core_per_unit"))
            texts.append(f"{label}, {copy}: {fx(thr)} haproxy-tcp throughput at {fx(cpu)} "
                         "its proxy CPU per GB"
                         + ("" if core_cpu is None else f" ({fx(core_cpu)} counting all of "
                            "the gateway core)"))
            verdicts.append(thr >= SPLICE_RATE_MIN and cpu <= SPLICE_CPU_MAX)
    measured = "; ".join(texts) or NOT_MEASURED
    return Target("kernel copy (sockmap, splice) vs haproxy-tcp",
                  "≥ 1.00x throughput at ≤ 0.20x proxy CPU", measured,
                  _verdict(any(verdicts) if verdicts else None))


def target_xdp(parts: dict) -> Target:
    xdp = _num(flood_row(parts, "xdp"), "dropped_pps")
    user = _num(flood_row(parts, "userspace"), "dropped_pps")
    r = _ratio(xdp, user)
    measured = NOT_MEASURED if r is None else (
        f"{fx(r)} ({fmt(xdp)} vs {fmt(user)} packets/s)")
    offered = _num(flood_row(parts, "xdp"), "offered_pps")
    if r is not None and offered and xdp is not None and xdp >= 0.95 * offered:
        # XDP kept up with the whole flood: the generator, not XDP, set the rate.
        measured += "; a lower bound: XDP dropped about all it was offered"
    per_cpu = _ratio(_num(flood_row(parts, "xdp"), "dropped_pps_per_cpu"),
                     _num(flood_row(parts, "userspace"), "dropped_pps_per_cpu"))
    if per_cpu is not None:
        # What each path drops per CPU second it spends: not bounded by the generator.
        measured += f"; per CPU used: {fx(per_cpu)}"
    process_pct = _num(flood_row(parts, "userspace"), "process_cpu_pct")
    if r is not None and user and process_pct and process_pct < 90:
        # The NAPI kthread building the flood's skbs shares the gateway's core: had the
        # gateway process had the whole core, it would have rejected at most this many.
        full_core = user / (process_pct / 100)
        measured += (f"; against user space given a whole core ({fmt(full_core)}/s, "
                     f"from {fmt(user)}/s at {process_pct:.0f} % of one): "
                     f"{fx(_ratio(xdp, full_core))}")
    return Target("XDP drop vs user-space rejection", "XDP ≥ 20x the packets/s", measured,
                  _verdict(None if r is None else r >= XDP_RATIO_MIN))


def targets(parts: dict) -> list[Target]:
    return [target_connection_rate(parts), target_scaling(parts), target_splice(parts),
            target_xdp(parts)]


# ------------------------------------------------------------------ tables
def _md(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def comparison_rows(parts: dict) -> list[list[str]]:
    """The seed's TPROXY-vs-eBPF comparison, explicit proxy alongside, with measured rows."""
    rows: list[list[str]] = [
        ["how traffic reaches the gateway", "the client addresses the gateway",
         "nftables `tproxy` rule per packet + fwmark policy routing",
         "tc program marks, sk_lookup assigns the listener per SYN; no nftables rule"],
        ["when the gateway process dies", "connections refused",
         "rules stay: captured connections refused until restart / `intercept down`",
         "fail-open (default): links die with the process, traffic flows to its destination"],
    ]

    def per_mode(label: str, get: Callable[[str], str]) -> None:
        rows.append([label] + [get(m) for m in MODES])

    per_mode("HTTP keep-alive req/s",
             lambda m: fmt(_num(core_row(parts, "keepalive", m), "value")))
    per_mode("connection rate (new connection per request), req/s",
             lambda m: fmt(_num(core_row(parts, "close", m), "value")))
    for load, what in (("keepalive", "keep-alive"), ("close", "new connection")):
        per_mode(f"{what} p50 / p99 ms", lambda m, load=load: _p50_p99(
            core_row(parts, load, m)))
    per_mode("gateway CPU µs per new connection",
             lambda m: fmt(_num(core_row(parts, "close", m), "gw_cpu_per_unit"), 1))
    for copy in COPIES:
        per_mode(f"TCP bulk Gbit/s, {copy} (gateway CPU s/GB)",
                 lambda m, copy=copy: _bulk(core_row(parts, "bulk", m, copy)))
    for n in scaling_counts(parts):
        rows.append([f"connections/s with {n:,} intercepted prefixes", "n/a"]
                    + [fmt(_num(scaling_row(parts, m, n), "conn_per_s"))
                       for m in ("tproxy", "ebpf")])
    rows.append([f"rule setup time with {scaling_counts(parts)[-1]:,} prefixes, s", "n/a"]
                + [fmt(_num(scaling_row(parts, m, scaling_counts(parts)[-1]), "setup_s"), 2)
                   for m in ("tproxy", "ebpf")])
    rows.append(["dropping a flood in the kernel, packets/s",
                 "user space: " + fmt(_num(flood_row(parts, "userspace"), "dropped_pps")),
                 "nftables: " + fmt(_num(flood_row(parts, "nftables"), "dropped_pps")),
                 "XDP: " + fmt(_num(flood_row(parts, "xdp"), "dropped_pps"))])
    return rows


def _p50_p99(row: dict | None) -> str:
    p50, p99 = _num(row, "p50_ms"), _num(row, "p99_ms")
    return NOT_MEASURED if p50 is None or p99 is None else f"{p50:.2f} / {p99:.2f}"


def _bulk(row: dict | None) -> str:
    gbps = _num(row, "value")
    if gbps is None:
        return NOT_MEASURED
    cpu = _num(row, "gw_cpu_per_unit")
    return f"{gbps:.2f}" + ("" if cpu is None else f" ({cpu:.2f})")


def comparison_table(parts: dict) -> list[str]:
    return _md(["", MODE_LABELS["explicit"], MODE_LABELS["tproxy"], MODE_LABELS["ebpf"]],
               comparison_rows(parts), ["---", "---", "---", "---"])


def targets_table(parts: dict) -> list[str]:
    return _md(["target", "wanted", "measured", "verdict"],
               [[t.name, t.wanted, t.measured, f"**{t.verdict}**"] for t in targets(parts)],
               ["---", "---", "---", "---"])


def bulk_table(parts: dict, part: str = "core") -> list[str]:
    haproxy = core_row(parts, "bulk", "haproxy", part=part)
    rows = []
    cases = [("haproxy", None)] + [(m, c) for m in MODES for c in COPIES]
    for case, copy in cases:
        row = core_row(parts, "bulk", case, copy, part=part)
        if row is None and case != "haproxy" and parts.get(part) is not None:
            continue   # a case or copy path the run did not select
        v, cpu = _num(row, "value"), _num(row, "gw_cpu_per_unit")
        core_cpu = _num(row, "gw_core_per_unit")
        rows.append([MODE_LABELS[case], copy or "-", fmt(v, 2), fmt(cpu, 2),
                     fmt(_num(row, "gw_cpu_pct"), 0), fmt(core_cpu, 2),
                     fx(_ratio(v, _num(haproxy, "value"))),
                     fx(_ratio(cpu, _num(haproxy, "gw_cpu_per_unit"))),
                     fx(_ratio(core_cpu, _num(haproxy, "gw_core_per_unit")))])
    return _md(["proxy", "copy path", "Gbit/s", "proxy CPU s/GB", "proxy CPU % of a core",
                "gateway core s/GB", "Gbit/s vs haproxy", "proxy CPU per GB vs haproxy",
                "gateway core per GB vs haproxy"], rows,
               ["---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"])


def scaling_table(parts: dict) -> list[str]:
    rows = []
    for mode in ("tproxy", "ebpf"):
        for n in scaling_counts(parts):
            r = scaling_row(parts, mode, n)
            rows.append([MODE_LABELS[mode], f"{n:,}", fmt(_num(r, "conn_per_s")),
                         fmt(_num(r, "p50_ms"), 2), fmt(_num(r, "p99_ms"), 2),
                         fmt(_num(r, "gateway_cpu_us_per_conn"), 1), fmt(_num(r, "setup_s"), 2)])
    return _md(["mode", "prefixes", "connections/s", "p50 ms", "p99 ms",
                "gateway µs per connection", "setup s"], rows,
               ["---", "---:", "---:", "---:", "---:", "---:", "---:"])


def flood_table(parts: dict) -> list[str]:
    rows = []
    for path in FLOOD_PATHS:
        r = flood_row(parts, path)
        reached = r.get("reached_userspace") if r else None
        rows.append([FLOOD_LABELS[path], fmt(_num(r, "offered_pps")),
                     fmt(_num(r, "dropped_pps")),
                     NOT_MEASURED if reached is None else f"{reached:,}",
                     fmt(_num(r, "cpu_pct"), 0), fmt(_num(r, "dropped_pps_per_cpu")),
                     (r or {}).get("note") or ""])
    return _md(["path", "offered packets/s", "dropped packets/s", "reached user space",
                "CPU %", "dropped per CPU-second", "note"], rows,
               ["---", "---:", "---:", "---:", "---:", "---:", "---"])


def text_table(parts: dict) -> str:
    """What the command prints: the comparison and the targets."""
    return "\n".join([*comparison_table(parts), "", *targets_table(parts)])


# ------------------------------------------------------------------ plots
def write_plots(parts: dict, out: Path) -> dict[str, Path]:
    """PNG per plot whose data exists: name → path. matplotlib's Agg backend: no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, Path] = {}

    def save(name: str, fig: Any) -> None:
        path = out / f"{IMG_PREFIX}{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written[name] = path

    modes = [m for m in MODES if core_row(parts, "close", m) or core_row(parts, "keepalive", m)]
    if modes:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, load, title in ((axes[0], "keepalive", "HTTP keep-alive req/s"),
                                (axes[1], "close", "connection rate (new conn/s)")):
            values = [_num(core_row(parts, load, m), "value") or 0 for m in modes]
            ax.bar([MODE_LABELS[m] for m in modes], values, color=["#888", "#d62", "#27a"][
                :len(modes)])
            ax.set_title(title)
            ax.tick_params(axis="x", labelsize=8)
        save("rates", fig)

        fig, ax = plt.subplots(figsize=(8, 4))
        labels, p50s, p99s = [], [], []
        for load, what in (("keepalive", "keep-alive"), ("close", "new conn")):
            for m in modes:
                labels.append(f"{MODE_LABELS[m]}\n{what}")
                p50s.append(_num(core_row(parts, load, m), "p50_ms") or 0)
                p99s.append(_num(core_row(parts, load, m), "p99_ms") or 0)
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], p50s, 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], p99s, 0.4, label="p99")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_ylabel("ms")
        ax.set_title("latency")
        ax.legend()
        save("latency", fig)

    bulk = [(case, copy) for case, copy in [("haproxy", None)] + [(m, c) for m in MODES
                                                                  for c in COPIES]
            if core_row(parts, "bulk", case, copy)]
    if bulk:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        labels = [MODE_LABELS[c] + (f"\n{p}" if p else "") for c, p in bulk]
        colors = ["#2a2" if c == "haproxy" else "#27a" for c, _ in bulk]
        axes[0].bar(labels, [_num(core_row(parts, "bulk", c, p), "value") or 0
                             for c, p in bulk], color=colors)
        axes[0].set_title("TCP bulk Gbit/s")
        axes[1].bar(labels, [_num(core_row(parts, "bulk", c, p), "gw_cpu_per_unit") or 0
                             for c, p in bulk], color=colors)
        axes[1].set_title("proxy CPU seconds per GB")
        for ax in axes:
            ax.tick_params(axis="x", labelsize=7, rotation=45)
        save("bulk", fig)

    if parts.get("scaling") is not None:
        fig, ax = plt.subplots(figsize=(7, 4))
        for mode in ("tproxy", "ebpf"):
            pts = [(n, v) for n in scaling_counts(parts)
                   if (v := _num(scaling_row(parts, mode, n), "conn_per_s")) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label=MODE_LABELS[mode])
        ax.set_xscale("log")
        ax.set_xlabel("intercepted prefixes")
        ax.set_ylabel("connections/s")
        ax.set_ylim(bottom=0)
        ax.set_title("rule scaling")
        ax.legend()
        save("scaling", fig)

    if parts.get("flood") is not None:
        paths = [p for p in FLOOD_PATHS if _num(flood_row(parts, p), "dropped_pps")]
        if paths:
            fig, ax = plt.subplots(figsize=(7, 4))
            xs = range(len(paths))
            ax.bar([x - 0.2 for x in xs], [_num(flood_row(parts, p), "offered_pps") or 0
                                           for p in paths], 0.4, label="offered")
            ax.bar([x + 0.2 for x in xs], [_num(flood_row(parts, p), "dropped_pps") or 0
                                           for p in paths], 0.4, label="dropped")
            ax.set_xticks(list(xs), [FLOOD_LABELS[p] for p in paths])
            ax.set_yscale("log")
            ax.set_ylabel("packets/s")
            ax.set_title("flood")
            ax.legend()
            save("flood", fig)
    return written


# ------------------------------------------------------------------ document
def _meta_lines(parts: dict) -> list[str]:
    lines = []
    for part in PARTS:
        data = parts.get(part)
        if data is None:
            lines.append(f"- **{part}**: {NOT_MEASURED} (no {part}.json).")
            continue
        m = data.get("meta", {})
        line = (f"- **{part}**: {m.get('date', '?')}, commit `{m.get('commit', '?')}`, "
                f"kernel {m.get('kernel', '?')}, {m.get('duration', '?')} s windows, "
                f"{m.get('runs', '?')} run(s).")
        noise = max((v for r in data["rows"] if (v := _num(r, "foreign_max_pct")) is not None),
                    default=None)
        if noise is not None and noise > NOISE_MAX_PCT:
            # The rig measures what other processes used during each window: say so when the
            # machine was not quiet, rather than let the numbers pass for clean ones.
            line += (f" **Noisy**: other processes used up to {noise:.0f} % of a CPU during "
                     "measured windows; compare ratios with care and re-run on a quiet machine.")
        lines.append(line)
    return lines


def _method_lines(parts: dict) -> list[str]:
    lines = []
    for part in PARTS:
        data = parts.get(part)
        method = (data or {}).get("meta", {}).get("method") if data else None
        if not method:
            continue
        notes = method if isinstance(method, list) else [str(method)]
        lines += [f"*{part}*:", ""] + [f"- {n}" for n in notes] + [""]
    return lines


def document(parts: dict, images: dict[str, str]) -> str:
    """The Markdown document; `images` maps plot names to paths relative to the document."""
    lines = [
        "# TPROXY vs eBPF: measured",
        "",
        "Written by `sluicegate bench interception` from the JSON results of its parts; a "
        f"cell says *{NOT_MEASURED}* when the part that measures it did not run. Explicit "
        "proxy, TPROXY interception (nftables) and eBPF interception (sk_lookup, "
        "`mode: ebpf`) side by side in the network-namespace rig (client — gateway — server).",
        "",
        *_meta_lines(parts),
        "",
        "## Side by side",
        "",
        *comparison_table(parts),
        "",
        "## Targets (issue 4)",
        "",
        *targets_table(parts),
        "",
        "Judged from the numbers above: the connection rate is the `Connection: close` load; "
        "rule scaling compares the connection rate at the fewest and the most prefixes; the "
        "kernel-copy target compares sluicegate's explicit L4 proxy with `copy: sockmap` and "
        "with `copy: splice` (met when either meets it) against haproxy in `mode tcp` in the "
        "same rig, in the core rig and in the copy part's (the gateway's receive work on its "
        "own core), CPU as utime+stime of each proxy's processes per GB moved; the sockmap "
        "path's softirq and work-queue time is not in that, so *counting all of the gateway "
        "core* (its busy time per GB, whatever ran there) is given next to it; the "
        "flood target compares packets/s dropped by XDP with packets/s rejected in user "
        "space, and per CPU-second each path spent.",
        "",
        "## TCP bulk: copy paths and haproxy in TCP mode",
        "",
        *bulk_table(parts),
        "",
        "## TCP bulk with the gateway's receive work on its own core (copy part)",
        "",
        "The same bulk load with RPS on the gateway namespace's veths: a veth delivers on "
        "the sending CPU, so above, the gateway's whole receive path (and all of the sockmap "
        "path's work, in softirq and the psock work queue) ran on the load generator's core. "
        "Here it runs on the gateway's core, for haproxy and sluicegate alike. *Gateway "
        "core s/GB* counts everything that core did per GB (softirq and kernel threads too), "
        "*proxy CPU* only the proxy's processes.",
        "",
        *bulk_table(parts, "copy"),
        "",
        "## Rule scaling",
        "",
        *scaling_table(parts),
        "",
        "## Flood",
        "",
        *flood_table(parts),
        "",
    ]
    if images:
        lines += ["## Plots", ""]
        for name, rel in images.items():
            lines += [f"![{PLOTS[name]}]({rel})", ""]
    lines += [
        "## Method",
        "",
        "Each part is `python -m sluicegate.benchrig.<part> --out DIR` (root): it builds its own "
        "network namespaces (`sgb-<pid>-*`) and removes them on exit, pins the load generator "
        "and servers to CPU 0 and the gateway alone to CPU 1, discards a warm-up before every "
        "measured window, and reports medians over runs.",
        "",
        *_method_lines(parts),
        "Reproduce (as root, `pip install 'sluicegate[bench]'`; apt: nginx-light wrk iperf3 "
        "nftables curl haproxy libbpf1):",
        "",
        "```sh",
        "sluicegate bench interception --duration 10 --runs 3",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_report(out: Path, doc: Path | None, plots: bool = True) -> str:
    """Read DIR's results, write PNGs (into DIR, copied to <doc dir>/img/) and the document;
    returns the printed table."""
    parts = load_parts(out)
    written = write_plots(parts, out) if plots else {}
    images: dict[str, str] = {}
    if doc is not None:
        doc.parent.mkdir(parents=True, exist_ok=True)
        if written:
            img = doc.parent / "img"
            img.mkdir(exist_ok=True)
            for name, path in written.items():
                shutil.copyfile(path, img / path.name)
                images[name] = f"img/{path.name}"
        doc.write_text(document(parts, images))
    return text_table(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sluicegate.benchrig.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    parser.add_argument("--doc", type=Path, default=Path("docs/tproxy-vs-ebpf.md"))
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.out, args.doc, plots=not args.no_plots))
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
