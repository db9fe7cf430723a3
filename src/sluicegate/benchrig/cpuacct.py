"""CPU accounting of one measured window from /proc (stdlib only: the rig's shell script calls
it around every window, so it must start fast). The same accounting as bench/summarize.py.

snap() reads per-CPU counters of /proc/stat and utime+stime (and reaped children's) of every
process with its parent and process group; cpu_window() turns two snapshots into busy/steal %
per CPU, the CPU seconds of the proxy's process group, and "foreign" CPU: what processes that
are neither descendants of the bench script nor kernel threads used, in % of one CPU.
"""

from __future__ import annotations

import os
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def snap() -> dict:
    cpus = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                cpus[parts[0]] = [int(x) for x in parts[1:9]]
    procs = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        rest = stat[stat.rindex(")") + 2:].split()
        # rest: 0 state, 1 ppid, 2 pgrp, 11 utime, 12 stime, 13 cutime, 14 cstime
        procs[pid] = {"comm": comm, "ppid": rest[1], "pgid": rest[2],
                      "u": int(rest[11]), "s": int(rest[12]),
                      "t": int(rest[11]) + int(rest[12]), "ct": int(rest[13]) + int(rest[14])}
    return {"cpus": cpus, "procs": procs}


def _descendants(procs: dict, root: str) -> set[str]:
    children: dict[str, list[str]] = {}
    for pid, p in procs.items():
        children.setdefault(p["ppid"], []).append(pid)
    seen, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            stack.extend(children.get(pid, []))
    return seen


def _used(before: dict, after: dict, pids: set[str]) -> dict[str, int]:
    """Ticks used inside the window by `pids`, including children they reaped in it."""
    used = {}
    for pid in pids:
        a, b = after["procs"].get(pid), before["procs"].get(pid)
        if a is None:
            continue
        used[pid] = (a["t"] + a["ct"]) - (b["t"] + b["ct"] if b else 0)
    # A child reaped in the window adds its whole life to the reaper's cutime/cstime:
    # take back what it had used before the window.
    for pid in pids:
        b = before["procs"].get(pid)
        if b is not None and pid not in after["procs"]:
            reaper = b["ppid"]
            for _ in range(16):
                if reaper in used or reaper not in before["procs"]:
                    break
                reaper = before["procs"][reaper]["ppid"]
            key = reaper if reaper in used else "?"
            used[key] = used.get(key, 0) - (b["t"] + b["ct"])
    return used


def cpu_window(before: dict, after: dict, root: str, load_cpu: str, proxy_cpu: str,
               proxy_pgid: str) -> dict:
    out: dict = {"cpus": {}}
    spans, busy_ticks = [], 0
    for name, a in after["cpus"].items():
        b = before["cpus"].get(name)
        if not b:
            continue
        # user nice system idle iowait irq softirq steal
        d = [x - y for x, y in zip(a, b, strict=True)]
        total = sum(d)
        if total <= 0:
            continue
        spans.append(total)
        busy_ticks += d[0] + d[1] + d[2]
        busy = 100.0 * (total - d[3] - d[4] - d[7]) / total
        out["cpus"][name] = {"busy": round(busy, 1), "steal": round(100.0 * d[7] / total, 1),
                             "softirq": round(100.0 * d[6] / total, 1)}
    per_cpu = sum(spans) / len(spans) if spans else 1
    out["window_s"] = per_cpu / HZ
    out["load_busy"] = out["cpus"].get(f"cpu{load_cpu}", {}).get("busy")
    out["proxy_busy"] = out["cpus"].get(f"cpu{proxy_cpu}", {}).get("busy")
    out["steal_max"] = max((c["steal"] for c in out["cpus"].values()), default=0.0)

    procs = {**before["procs"], **after["procs"]}
    kernel = {pid for pid, p in procs.items() if pid == "2" or p["ppid"] == "2"}
    mine = _descendants(before["procs"], root) | _descendants(after["procs"], root)
    others = set(procs) - mine - kernel
    mine_t = sum(_used(before, after, mine).values())
    kernel_t = sum(_used(before, after, kernel).values())
    other_use = _used(before, after, others)
    # Foreign CPU, the larger of two estimates: the other processes' own counters, and the
    # /proc/stat process time nobody of ours explains (sees short-lived processes too).
    direct = sum(other_use.values())
    unexplained = busy_ticks - mine_t - kernel_t
    out["foreign_pct"] = round(max(0.0, 100.0 * max(direct, unexplained) / per_cpu), 1)
    top = sorted(((u, pid) for pid, u in other_use.items() if u > 0), reverse=True)[:3]
    out["foreign_top"] = [f"{procs.get(pid, {}).get('comm', '?')}:{pid} "
                          f"{100.0 * u / per_cpu:.1f}%" for u, pid in top]
    out["mine_pct"] = round(100.0 * mine_t / per_cpu, 1)
    out["kernel_threads_pct"] = round(100.0 * kernel_t / per_cpu, 1)

    if proxy_pgid not in ("", "0"):
        group = {pid for pid, p in procs.items() if p["pgid"] == proxy_pgid}
        out["proxy_cpu_s"] = sum(_used(before, after, group).values()) / HZ
        for key in ("u", "s"):   # user / system split of the group's own (not reaped) time
            out[f"proxy_{'user' if key == 'u' else 'sys'}_s"] = sum(
                after["procs"][p][key] - before["procs"].get(p, {}).get(key, 0)
                for p in group if p in after["procs"]) / HZ
        out["proxy_procs"] = sorted(f"{procs[p]['comm']}:{p}" for p in group)
    else:
        out["proxy_cpu_s"] = None
    return out


def quiet(root: str, max_pct: float, timeout: float) -> int:
    """Wait (up to `timeout` s) for a 1-second window in which foreign CPU ≤ `max_pct`."""
    start = time.monotonic()
    while True:
        before = snap()
        time.sleep(1.0)
        foreign = cpu_window(before, snap(), root, "0", "0", "0")["foreign_pct"]
        waited = time.monotonic() - start
        if foreign <= max_pct:
            if waited > 1.5:
                print(f"    quiet after {waited:.0f} s (other procs {foreign:.0f}% CPU)",
                      file=sys.stderr)
            return 0
        if waited >= timeout:
            print(f"    not quiet after {waited:.0f} s (other procs {foreign:.0f}% CPU); "
                  "measuring anyway", file=sys.stderr)
            return 1
