#!/usr/bin/env python3
"""Helpers of bench/http_proxy.sh and bench/ai.sh (Linux /proc; the python that has sluicegate).

    summarize.py snap FILE
        /proc snapshot: per-CPU counters of /proc/stat, utime+stime (and reaped children's)
        of every process with its parent and process group.
    summarize.py cpu BEFORE AFTER ROOT_PID LOAD_CPU PROXY_CPU PROXY_PGID
        JSON accounting of the window between two snapshots: busy/steal % per CPU, CPU
        seconds of the proxy's process group (PROXY_PGID, 0 = none), and "foreign" CPU:
        what processes that are neither descendants of ROOT_PID (the bench script) nor
        kernel threads used, in % of one CPU.
    summarize.py quiet ROOT_PID MAX_PCT TIMEOUT
        Wait until a 1-second window has at most MAX_PCT foreign CPU (exit 1 on timeout).
    summarize.py keep BASE N
        Of BASE.try1..N.{txt,cpu.json}, keep the attempt with the least foreign CPU as
        BASE.txt / BASE.cpu.json; prints a one-line result.
    summarize.py table OUT
        The Markdown result table of a run directory (medians over runs, ratios, targets).
    summarize.py profile FILE.folded [TOP] [WRK_OUTPUT]
        Top self-time / inclusive frames of a py-spy raw (folded) profile, as Markdown.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

# The /proc accounting and the wrk/table helpers are shared with `sluicegate bench
# interception` (sluicegate.benchrig): run this with the python that has sluicegate.
from sluicegate.benchrig.cpuacct import cpu_window, quiet, snap
from sluicegate.benchrig.summary import (
    _fmt_ms,
    _fmt_rps,
    _load_json,
    _median,
    _meta,
    _setting,
    _us_per_req,
    keep,
    parse_wrk,
)

LABELS = {
    "direct": "direct (backend)",
    "nginx": "nginx proxy",
    "haproxy": "haproxy http",
    "aiohttp": "aiohttp proxy (uvloop)",
    "sluicegate": "sluicegate, no plugins",
    "sluicegate_auth": "sluicegate, key-auth + prometheus",
    "sluicegate_keyauth": "sluicegate + key-auth",
    "sluicegate_jwt": "sluicegate + jwt-auth",
    "sluicegate_limitcount": "sluicegate + limit-count",
    "sluicegate_limitreq": "sluicegate + limit-req",
    "sluicegate_iprestriction": "sluicegate + ip-restriction",
    "sluicegate_prometheus": "sluicegate + prometheus",
    "sluicegate_all": "sluicegate + all six plugins",
}
# Plugin-cost cases (http_proxy.sh CASES=plugins): case -> the plugins on its route.
PLUGIN_CASES = {
    "sluicegate_keyauth": "key-auth",
    "sluicegate_jwt": "jwt-auth (HS256)",
    "sluicegate_limitcount": "limit-count",
    "sluicegate_limitreq": "limit-req",
    "sluicegate_iprestriction": "ip-restriction (40 entries)",
    "sluicegate_prometheus": "prometheus",
    "sluicegate_all": "the six above",
}
# (case, reference case, minimum ratio of req/s); listed when both cases were selected
TARGETS = [
    ("sluicegate", "nginx", 0.5),
    ("sluicegate", "aiohttp", 3.0),
    ("sluicegate_auth", "nginx", 0.4),
    ("sluicegate_all", "nginx", 0.4),
]


# ------------------------------------------------------------------ /proc accounting


# ------------------------------------------------------------------ wrk output


def _split_us_per_req(w: dict, cpu: dict) -> tuple[float, float] | None:
    if not w.get("requests") or cpu.get("proxy_user_s") is None:
        return None
    return (cpu["proxy_user_s"] * 1e6 / w["requests"], cpu["proxy_sys_s"] * 1e6 / w["requests"])


def _core_us_per_req(w: dict, cpu: dict) -> float | None:
    if not w.get("requests") or cpu.get("proxy_busy") is None:
        return None
    return cpu["proxy_busy"] / 100.0 * cpu["window_s"] * 1e6 / w["requests"]


# ------------------------------------------------------------------ table


def _fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x" if v >= 0.1 else f"{v:.3f}x"


def table(out: Path) -> str:
    meta = _meta(out)
    cases = meta.get("cases", " ".join(LABELS)).split()
    skipped = {}
    if (out / "skipped.tsv").exists():
        for line in (out / "skipped.tsv").read_text().splitlines():
            case, _, reason = line.partition("\t")
            skipped.setdefault(case, reason)
    runs = sorted({int(m.group(1)) for p in (out / "runs").glob("r*_*.txt")
                   if (m := re.match(r"r(\d+)_.*\.txt$", p.name)) and ".try" not in p.name})
    rows: dict[str, dict] = {}
    detail = []
    for case in cases:
        per = []
        for run in runs:
            base = out / "runs" / f"r{run}_{case}"
            if not base.with_suffix(".txt").exists():
                continue
            w = parse_wrk(base.with_suffix(".txt"))
            cpu = _load_json(Path(f"{base}.cpu.json"))
            split = _split_us_per_req(w, cpu)
            w.update(us=_us_per_req(w, cpu), core_us=_core_us_per_req(w, cpu),
                     usr_us=split[0] if split else None, sys_us=split[1] if split else None,
                     load_busy=cpu.get("load_busy"), proxy_busy=cpu.get("proxy_busy"),
                     foreign=cpu.get("foreign_pct"), attempts=cpu.get("attempts", 1),
                     steal=cpu.get("steal_max"), run=run)
            per.append(w)
            detail.append((case, w))
        if per:
            rows[case] = {
                "rps": _median([w["rps"] for w in per]),
                "runs": [w["rps"] for w in per],
                "p50": _median([w["p50"] for w in per]),
                "p99": _median([w["p99"] for w in per]),
                "us": _median([w["us"] for w in per]),
                "core_us": _median([w["core_us"] for w in per]),
                "usr_us": _median([w["usr_us"] for w in per]),
                "sys_us": _median([w["sys_us"] for w in per]),
                "load_busy": _median([w["load_busy"] for w in per]),
                "proxy_busy": _median([w["proxy_busy"] for w in per]),
                "non2xx": sum(w["non2xx"] for w in per),
                "sock": sum(sum(w["sock_errors"].values()) for w in per),
                "sock_detail": [w["sock_errors"] for w in per if w["sock_errors"]],
                "foreign_max": max((w["foreign"] or 0) for w in per),
                "retried": sum(1 for w in per if (w["attempts"] or 1) > 1),
                "notes": sorted({n for w in per for n in w["notes"]}),
            }

    def ratio(case: str, ref: str) -> float | None:
        a, b = rows.get(case, {}).get("rps"), rows.get(ref, {}).get("rps")
        return a / b if a and b else None

    lines = [
        f"## HTTP proxy benchmark ({meta.get('date', '?')})",
        "",
        f"{meta.get('load', '')}; {len(runs)} interleaved run(s), medians shown. "
        f"Pinning: wrk + backend on CPU {_setting(meta, 'LOAD_CPU')}, proxy on CPU "
        f"{_setting(meta, 'PROXY_CPU')}. {meta.get('cpu', '')}. "
        f"sluicegate code: {meta.get('sluicegate_code', '?')}.",
        "",
        "| case | req/s | runs (req/s) | p50 ms | p99 ms | proxy µs/req (usr+sys) | core µs/req "
        "| CPU% load/proxy | vs nginx | vs nginx, CPU | vs aiohttp | non-2xx | notes |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case in cases:
        if case not in rows:
            lines.append(f"| {LABELS.get(case, case)} | - | - | - | - | - | - | - | - | - | - | - "
                         f"| skipped: {skipped.get(case, 'no result')} |")
            continue
        r = rows[case]
        notes = []
        if r["sock"]:
            notes.append(f"socket errors {r['sock_detail']}")
        if r["foreign_max"] > 2:
            notes.append(f"other procs ≤{r['foreign_max']:.0f}% CPU")
        if r["retried"]:
            notes.append(f"{r['retried']} run(s) re-measured (noise)")
        notes += r["notes"]
        if case in skipped and len(r["runs"]) < len(runs):
            notes.append(f"only {len(r['runs'])} of {len(runs)} runs: {skipped[case]}")
        us = "-" if r["us"] is None or case == "direct" else f"{r['us']:.1f}"
        if us != "-" and r["usr_us"] is not None:
            us += f" ({r['usr_us']:.1f}+{r['sys_us']:.1f})"
        core = "-" if r["core_us"] is None or case == "direct" else f"{r['core_us']:.1f}"
        busy = (f"{r['load_busy']:.0f}/{r['proxy_busy']:.0f}"
                if r["load_busy"] is not None and r["proxy_busy"] is not None else "-")
        vs_aio = _fmt_ratio(ratio(case, "aiohttp")) if case.startswith("sluicegate") else "-"
        ref_us = rows.get("nginx", {}).get("us")
        cpu_ratio = _fmt_ratio(ref_us / r["us"]) if ref_us and r["us"] and case != "direct" else "-"
        lines.append(
            f"| {LABELS.get(case, case)} | {_fmt_rps(r['rps'])} | "
            f"{' / '.join(_fmt_rps(v) for v in r['runs'])} | {_fmt_ms(r['p50'])} | "
            f"{_fmt_ms(r['p99'])} | {us} | {core} | {busy} | {_fmt_ratio(ratio(case, 'nginx'))} "
            f"| {cpu_ratio} "
            f"| {vs_aio} | {r['non2xx']:,} | {'; '.join(notes)} |")
    lines += ["", "`vs nginx` = req/s ratio of the medians; `vs nginx, CPU` = nginx's proxy µs/req "
              "÷ this row's (the throughput ratio if both were limited by their own CPU only); "
              "`non-2xx` = responses wrk counted outside 2xx/3xx, summed over the kept runs.", ""]
    if any(case in PLUGIN_CASES for case in cases):
        lines += [*_plugin_table(cases, rows, skipped, detail), ""]
    lines += ["Targets (req/s ratios of the medians):", ""]
    noise_max = float(_setting(meta, "NOISE_MAX").replace("?", "10"))
    for case, ref, minimum in TARGETS:
        if case not in cases or ref not in cases:
            continue
        got = ratio(case, ref)
        verdict = "not measured" if got is None else ("met" if got >= minimum else "NOT met")
        line = (f"- {LABELS[case]} ≥ {minimum}x {LABELS[ref]}: "
                f"{'-' if got is None else f'{got:.2f}x'} — {verdict}")
        us, ref_us = rows.get(case, {}).get("us"), rows.get(ref, {}).get("us")
        if us and ref_us:
            line += f" (by proxy CPU per request: {ref_us / us:.2f}x)"
        noisy = [LABELS[c] for c in (case, ref)
                 if rows.get(c, {}).get("foreign_max", 0) > noise_max]
        if noisy:
            line += (f"; caution: {' and '.join(noisy)} kept a window with more than "
                     f"{noise_max:.0f}% foreign CPU: its req/s may be depressed")
        lines.append(line)
    lines += ["", "Per run (kept attempt of each measurement):", "",
              "| run | case | req/s | p50 ms | p99 ms | proxy µs/req | CPU% load/proxy "
              "| other procs % | attempts | non-2xx |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case, w in sorted(detail, key=lambda cw: (cw[1]["run"], cases.index(cw[0]))):
        us = "-" if w["us"] is None else f"{w['us']:.1f}"
        lines.append(
            f"| {w['run']} | {case} | {_fmt_rps(w['rps'])} | {_fmt_ms(w['p50'])} | "
            f"{_fmt_ms(w['p99'])} | {us} | {w['load_busy']}/{w['proxy_busy']} | "
            f"{w['foreign']} | {w['attempts']} | {w['non2xx']:,} |")
    return "\n".join(lines)


def _plugin_table(cases: list[str], rows: dict, skipped: dict, detail: list) -> list[str]:
    """Per-plugin cost: each plugin case against sluicegate without plugins and nginx."""
    def rps_ratio(case: str, ref: str) -> float | None:
        a, b = rows.get(case, {}).get("rps"), rows.get(ref, {}).get("rps")
        return a / b if a and b else None

    def cpu_ratio(case: str, ref: str) -> float | None:
        a, b = rows.get(case, {}).get("us"), rows.get(ref, {}).get("us")
        return b / a if a and b else None

    # Added CPU: per run, the case's proxy µs/req minus the no-plugin run's of the same run
    # (measured minutes apart, not hours), then the median over runs.
    base_us = {w["run"]: w["us"] for c, w in detail if c == "sluicegate" and w["us"] is not None}

    def added_us(case: str) -> float | None:
        return _median([w["us"] - base_us[w["run"]] for c, w in detail
                        if c == case and w["us"] is not None and w["run"] in base_us])

    lines = ["### Plugin cost", "",
             "One sluicegate case per plugin (1 worker, the plugin on the one route, limits too "
             "high to reject), each against sluicegate without plugins and against nginx, in the "
             "same run. `+µs/req` = the case's proxy µs/req minus the no-plugin case's in the "
             "same run, median over runs: the CPU the plugin costs per request.", "",
             "| case | plugins | req/s | vs sluicegate | vs nginx | proxy µs/req | +µs/req "
             "| vs sluicegate, CPU | vs nginx, CPU | non-2xx |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    singles = []
    for case in ["nginx", "sluicegate"] + [c for c in cases if c in PLUGIN_CASES]:
        if case not in cases:
            continue
        plugins = PLUGIN_CASES.get(case, "(reference)" if case == "nginx" else "none")
        if case not in rows:
            lines.append(f"| {LABELS.get(case, case)} | {plugins} | - | - | - | - | - | - | - "
                         f"| skipped: {skipped.get(case, 'no result')} |")
            continue
        r = rows[case]
        added = added_us(case) if case in PLUGIN_CASES else None
        us = "-" if r["us"] is None else f"{r['us']:.1f}"
        if added is not None and case != "sluicegate_all":
            singles.append(added)
        lines.append(
            f"| {LABELS.get(case, case)} | {plugins} | {_fmt_rps(r['rps'])} "
            f"| {_fmt_ratio(rps_ratio(case, 'sluicegate')) if case != 'nginx' else '-'} "
            f"| {_fmt_ratio(rps_ratio(case, 'nginx'))} "
            f"| {us} "
            f"| {'-' if added is None else f'{added:+.1f}'} "
            f"| {_fmt_ratio(cpu_ratio(case, 'sluicegate')) if case != 'nginx' else '-'} "
            f"| {_fmt_ratio(cpu_ratio(case, 'nginx'))} | {r['non2xx']:,} |")
    all_added = added_us("sluicegate_all") if "sluicegate_all" in rows else None
    if all_added is not None and len(singles) == len(PLUGIN_CASES) - 1:
        lines += ["", f"The six plugins one at a time add {sum(singles):.1f} µs/req together; "
                  f"on one route they add {all_added:.1f} µs/req."]
    return lines


# ------------------------------------------------------------------ py-spy profile
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
_MARKERS = ("site-packages/", "/src/", "lib/python3.11/")


def _short_path(path: str) -> str:
    for marker in _MARKERS:
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _per_function(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py)`."""
    m = _FRAME.match(frame.strip())
    return f"{m.group('func')} ({_short_path(m.group('file'))})" if m else frame.strip()


def _per_line(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    line = f":{m.group('line')}" if m.group("line") else ""
    return f"{m.group('func')} ({_short_path(m.group('file'))}{line})"


def _source(frame: str, roots: list[str]) -> str:
    """The source line a `func (file:line)` frame points at, if the file is found."""
    m = _FRAME.match(frame)
    if not m or not m.group("line"):
        return ""
    rel = m.group("file")
    for candidate in [rel] + [os.path.join(r, rel) for r in roots]:
        try:
            with open(candidate, errors="replace") as f:
                for i, text in enumerate(f, 1):
                    if i == int(m.group("line")):
                        return text.strip().replace("|", "\\|")[:90]
        except OSError:
            continue
    return ""


def profile(path: Path, top: int = 25, wrk_path: Path | None = None) -> str:
    """Self time per source line (where the CPU went) and inclusive time per function."""
    self_line: Counter[str] = Counter()
    self_func: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        self_line[_per_line(frames[-1])] += n
        self_func[_per_function(frames[-1])] += n
        for f in {_per_function(f) for f in frames}:
            incl[f] += n
    total = total or 1
    roots = [r for r in os.environ.get("PROFILE_SRC", "").split(":") if r]
    case = path.name.removesuffix(".folded")
    rate, secs = os.environ.get("PROFILE_RATE"), os.environ.get("PROFILE_SECONDS")
    head = f"### py-spy profile: {LABELS.get(case, case)} — {total:,} non-idle samples"
    if rate and secs:
        head += f" of {int(rate) * int(secs):,} ({secs} s at {rate} Hz)"
    if wrk_path is not None and wrk_path.exists():
        head += f"; wrk meanwhile: {_fmt_rps(parse_wrk(wrk_path)['rps'])} req/s"
    lines = [head, "",
             f"Top {top} by self time, per source line. Without --native, time in C code is "
             "charged to the Python line that called it (e.g. a `transport.write` line includes "
             "the send syscall and the loopback TCP stack); `Runner.run` self time is the "
             "uvloop event loop itself (epoll, socket reads, callback dispatch).", "",
             "| # | self % | frame | source |", "|---:|---:|---|---|"]
    for i, (frame, n) in enumerate(self_line.most_common(top), 1):
        src = _source(frame, roots)
        lines.append(f"| {i} | {100.0 * n / total:.1f} | `{frame}` | "
                     f"{f'`{src}`' if src else ''} |")
    lines += ["", "Self time per function (top 10):", "", "| self % | incl % | function |",
              "|---:|---:|---|"]
    for frame, n in self_func.most_common(10):
        lines.append(f"| {100.0 * n / total:.1f} | {100.0 * incl[frame] / total:.1f} "
                     f"| `{frame}` |")
    lines += ["", "Inclusive time per function (top 15):", "", "| incl % | self % | function |",
              "|---:|---:|---|"]
    for frame, n in incl.most_common(15):
        lines.append(f"| {100.0 * n / total:.1f} | {100.0 * self_func[frame] / total:.1f} "
                     f"| `{frame}` |")
    return "\n".join(lines)


# ------------------------------------------------------------------ main
def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "snap":
        Path(argv[1]).write_text(json.dumps(snap()))
        return 0
    if len(argv) == 7 and argv[0] == "cpu":
        before = json.loads(Path(argv[1]).read_text())
        after = json.loads(Path(argv[2]).read_text())
        print(json.dumps(cpu_window(before, after, *argv[3:7]), indent=1))
        return 0
    if len(argv) == 4 and argv[0] == "quiet":
        return quiet(argv[1], float(argv[2]), float(argv[3]))
    if len(argv) == 3 and argv[0] == "keep":
        keep(argv[1], int(argv[2]))
        return 0
    if len(argv) == 2 and argv[0] == "table":
        print(table(Path(argv[1])))
        return 0
    if 2 <= len(argv) <= 4 and argv[0] == "profile":
        print(profile(Path(argv[1]), int(argv[2]) if len(argv) > 2 else 25,
                      Path(argv[3]) if len(argv) > 3 else None))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
