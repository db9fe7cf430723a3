"""The `flood` part of `sluicegate bench interception`: how many packets per second each
layer drops when one denied source floods a UDP port the gateway serves.

    rig:   sgb-<pid>-source ──veth── sgb-<pid>-gateway
           10.211.1.2 (eth0)         10.211.1.1 (to-source)
           generator on CPU 0        sluicegate on CPU 1: a UDP stream_proxy listener on :9999

Paths (the same flood each time; a fresh gateway per path and run):
  xdp        the gateway's `kernel.xdp.deny` list on to-source (native XDP unless --xdp-mode);
             dropped = the rule's own drop counter (the pinned `sg_xdp_rules` map)
  nftables   no `kernel:` block; `ip saddr … counter drop` in a `netdev` ingress chain on
             to-source (the earliest nftables hook); dropped = the rule counter
  userspace  no kernel filter: the datagrams reach the listener, whose only stream route has
             `remote_addr` set to a prefix the flood source is not in, so each datagram is
             read, matched against the route table and discarded (stream routes have no deny
             list and `ip-restriction` is an HTTP plugin; this is the stream proxy's own
             rejection by source). dropped = Udp InDatagrams of the gateway netns (datagrams
             user space read); Udp RcvbufErrors = what the kernel dropped because the
             listener read too slowly (in the note)

The generator, pinned to CPU 0 and bounded by --duration and --max-packets, is by default
the kernel itself (`live_frames.py`): BPF_PROG_TEST_RUN in XDP live-frames mode redirects
a prebuilt frame out of the source veth, so each frame reaches the gateway veth's ring as
an xdp_frame with no sending stack and no skb (~10 Mpps from one core here, 9x what
AF_PACKET offered). Where that mode is missing (Linux < 5.18, or `--rx sender`: the
gateway veth then has no NAPI to take such frames), `flood_gen.c` (compiled with gcc into
--out) sends prebuilt frames with AF_PACKET + PACKET_QDISC_BYPASS, or sendmmsg on a UDP
socket, whichever a start-up probe measures faster. The rig is flood_rig.py, the
generators flood_generator.py.

Where the receive side runs (--rx): a veth hands a frame over on the CPU that sent it, so
by default the kernel's drop work (XDP in the veth's NAPI, nftables and the stack in the
backlog softirq) would run on the generator's CPU. `--rx gateway` (the default) turns on GRO
and threaded NAPI on the gateway veth and pins the NAPI kthread to CPU 1, so every path's
receive work runs on the gateway's CPU; `--rx sender` keeps the kernel default. When that
kthread falls behind, the veth's 256-slot ring fills and the source veth counts tx_dropped
(added to offered, not to dropped: those never reached the path).

`cpu_pct` is the gateway side as a whole: sluicegate's process group + the NAPI kthread +
softirq time on every CPU, in % of one CPU (the note splits it). `dropped_pps_per_cpu` =
dropped_pps / (cpu_pct / 100) compares the paths also when the generator, not the path, is
the limit. Like bench/interception.sh, each window
waits for a quiet second first and is measured again (up to --noise-retries times) when other
processes used more than --noise-max % of a CPU; the least disturbed attempt is kept.

Run: `python -m sluicegate.benchrig.flood --out DIR [--duration S] [--runs N]` as root;
writes DIR/flood.json, prints a table; leaves no namespace, process or bpffs mount behind.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sluicegate.benchrig.flood_generator import (
    LIVE_FRAMES,
    MAX_PACKETS,
    MAX_SOURCES,
    PAYLOAD,
    Generator,
    choose_generator,
)
from sluicegate.benchrig.flood_rig import (
    ALLOWED_PREFIX,
    DENY_PREFIX,
    GATEWAY_IP,
    GW_CPU,
    GW_IF,
    LOAD_CPU,
    NS_PREFIX,
    PORT,
    SOURCE_IP,
    SRC_IF,
    Rig,
    log,
    nft_drop,
    nft_dropped,
    nft_remove,
    nsx,
    pin_napi_threads,
    run,
    sweep_stale,
)

PART = "flood"
PATHS = ("xdp", "nftables", "userspace")
# A flood window longer than a minute measures nothing a shorter one does not.
MAX_DURATION = 60.0
REPO = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------ counters
def xdp_dropped(bpffs: Path) -> int:
    """Drops counted by the deny rules of the pinned XDP filter (read from this process:
    the pins are files, the maps need no namespace)."""
    from sluicegate.bpf import xdp
    from sluicegate.bpf.kernel import pinned_maps

    with pinned_maps(bpffs) as maps:
        rules = xdp.read_xdp(maps, {}, sources=0)["xdp_rules"]
    return sum(int(rule["packets"]) for rule in rules)


def xdp_mode(rig: Rig) -> str:
    link = json.loads(nsx(rig.gateway, ["ip", "-j", "-d", "link", "show", "dev",
                                        GW_IF]).stdout)[0]
    attached = link.get("xdp") or {}
    return {1: "native", 2: "generic"}.get(attached.get("mode"), "none")


def udp_snmp(rig: Rig) -> dict[str, int]:
    """Udp counters of the gateway netns (/proc/net/snmp is per network namespace)."""
    lines = [line.split() for line in nsx(rig.gateway, ["cat", "/proc/net/snmp"]).stdout
             .splitlines() if line.startswith("Udp:")]
    return {name: int(value) for name, value in zip(lines[0][1:], lines[1][1:], strict=True)}


def cpu_snapshot(pgid: int | None, napi: list[int]) -> dict[str, Any]:
    """Per-CPU softirq and busy ticks, the CPU ticks of the gateway's process group and of
    the veth's NAPI kthreads, and this process's own CPU with its reaped children's (the
    generator): what is left of the busy time is "foreign", the other users of the
    machine, short-lived processes included."""
    cpus = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                # user nice system idle iowait irq softirq steal
                values = [int(x) for x in parts[1:9]]
                cpus[parts[0]] = {"softirq": values[6],
                                  "busy": sum(values) - values[3] - values[4] - values[7],
                                  "total": sum(values)}
    group = threads = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        ticks = int(rest[11]) + int(rest[12])
        if pgid is not None and int(rest[2]) == pgid:
            group += ticks
        elif int(pid) in napi:
            threads += ticks
    own = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
              for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return {"cpus": cpus, "group": group, "napi": threads, "own": own,
            "time": time.monotonic()}


def foreign_pct(before: dict[str, Any], after: dict[str, Any],
                napi: list[int] | None = None) -> float:
    """Busy time of all CPUs that neither the gateway side (its process group, NAPI
    kthreads, softirq) nor this bench (itself, the generator) used, in % of one CPU."""
    hz = os.sysconf("SC_CLK_TCK")
    seconds = max(1e-3, after["time"] - before["time"])
    busy = sum(after["cpus"][cpu]["busy"] - before["cpus"][cpu]["busy"]
               for cpu in after["cpus"]) / hz
    softirq = sum(after["cpus"][cpu]["softirq"] - before["cpus"][cpu]["softirq"]
                  for cpu in after["cpus"]) / hz
    ours = ((after["group"] - before["group"]) + (after["napi"] - before["napi"])) / hz
    ours += softirq + after["own"] - before["own"]
    return max(0.0, 100 * (busy - ours) / seconds)


def wait_quiet(pgid: int | None, noise_max: float, timeout: float) -> bool:
    """Wait (up to `timeout` s) for a second in which other processes used at most
    `noise_max` % of a CPU; False if none came."""
    deadline = time.monotonic() + timeout
    while True:
        before = cpu_snapshot(pgid, [])
        time.sleep(1.0)
        if foreign_pct(before, cpu_snapshot(pgid, [])) <= noise_max:
            return True
        if time.monotonic() >= deadline:
            return False


def cpu_window(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    hz = os.sysconf("SC_CLK_TCK")
    seconds = after["time"] - before["time"]
    shown = {"gateway_process_pct": 100 * (after["group"] - before["group"]) / hz / seconds,
             "napi_pct": 100 * (after["napi"] - before["napi"]) / hz / seconds}
    softirq = 0.0
    for cpu, values in after["cpus"].items():
        was = before["cpus"][cpu]
        total = max(1, values["total"] - was["total"])
        shown[f"{cpu}_busy_pct"] = 100 * (values["busy"] - was["busy"]) / total
        shown[f"{cpu}_softirq_pct"] = 100 * (values["softirq"] - was["softirq"]) / total
        softirq += (values["softirq"] - was["softirq"]) / hz / seconds * 100
    shown["softirq_pct"] = softirq
    shown["gateway_side_pct"] = shown["gateway_process_pct"] + shown["napi_pct"] + softirq
    shown["foreign_pct"] = foreign_pct(before, after)
    return shown


# ------------------------------------------------------------------ the gateway
class Gateway:
    """`sluicegate run` in the gateway ns on GW_CPU, in its own process group."""

    def __init__(self, rig: Rig, out: Path, bpffs: Path, name: str, config: dict) -> None:
        self.rig = rig
        self.name = name
        self.conf = out / "conf" / f"{name}.yaml"
        self.conf.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        self.log_path = out / "logs" / f"{name}.log"
        self.bpffs = bpffs
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_for_xdp: bool) -> None:
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                ["taskset", "-c", GW_CPU, "ip", "netns", "exec", self.rig.gateway, "env",
                 f"SLUICEGATE_BPFFS={self.bpffs}", sys.executable, "-m", "sluicegate", "run",
                 "-c", str(self.conf)],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            listening = nsx(self.rig.gateway, ["ss", "-Hlun", f"sport = :{PORT}"]).stdout.strip()
            if listening and (not wait_for_xdp or "XDP filter attached" in text):
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway {self.name} exited {self.process.returncode}: "
                                   f"{text.strip()[-500:]}")
            time.sleep(0.1)
        raise RuntimeError(f"gateway {self.name} not ready within 30 s ({self.log_path})")

    @property
    def pgid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self) -> list[str]:
        """SIGTERM to the group, SIGKILL after 5 s; notes on anything unusual."""
        notes: list[str] = []
        process, self.process = self.process, None
        if process is None:
            return notes
        if process.poll() is not None:
            notes.append(f"gateway exited during the window ({process.returncode})")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            notes.append("gateway did not stop within 5 s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
        if "Traceback" in self.log_path.read_text(errors="replace"):
            notes.append(f"gateway logged a traceback ({self.log_path.name})")
        return notes


def gateway_config(path: str, xdp_mode_wanted: str) -> dict[str, Any]:
    """The same UDP listener and route for every path; xdp adds the `kernel:` block."""
    config: dict[str, Any] = {
        "gateway": {"listen": ["127.0.0.1:9080"], "metrics_listen": "127.0.0.1:9091",
                    "workers": 1, "drain_timeout": 1,
                    "stream_proxy": {"udp": [f"{GATEWAY_IP}:{PORT}"]}},
        # The only route takes sources the flood is not from; the flood's datagrams match
        # nothing and are discarded by the stream proxy (its unrouted count).
        "stream_routes": [{"id": "allowed-only", "server_port": PORT,
                           "remote_addr": ALLOWED_PREFIX,
                           "upstream": {"nodes": {"127.0.0.1:9": 1}, "scheme": "udp"}}],
    }
    if path == "xdp":
        config["kernel"] = {"xdp": {"interfaces": [GW_IF], "mode": xdp_mode_wanted,
                                    "deny": [DENY_PREFIX]}}
    return config


# ------------------------------------------------------------------ one measurement
class Bench:
    def __init__(self, args: argparse.Namespace, out: Path, rig: Rig, bpffs: Path,
                 generator: Generator) -> None:
        self.args = args
        self.out = out
        self.rig = rig
        self.bpffs = bpffs
        self.generator = generator

    def dropped(self, path: str, snmp: dict[str, int]) -> int:
        if path == "xdp":
            return xdp_dropped(self.bpffs)
        if path == "nftables":
            return nft_dropped(self.rig)
        return snmp["InDatagrams"]

    def window(self, path: str, gateway: Gateway) -> dict[str, Any]:
        """One measured flood with counters and CPU snapshots around it."""
        snmp0, links0 = udp_snmp(self.rig), self.rig.link_stats()
        dropped0 = self.dropped(path, snmp0)
        napi = pin_napi_threads() if self.args.rx == "gateway" else []
        cpu0 = cpu_snapshot(gateway.pgid, napi)
        flood = self.generator.flood(self.args.max_packets, self.args.duration)
        cpu1 = cpu_snapshot(gateway.pgid, napi)
        time.sleep(0.5)  # what the socket queued is read (and counted) by now
        snmp1, links1 = udp_snmp(self.rig), self.rig.link_stats()
        return {"flood": flood, "cpu": cpu_window(cpu0, cpu1),
                "dropped": self.dropped(path, snmp1) - dropped0,
                "links": {k: links1[k] - links0[k] for k in links0},
                "read": snmp1["InDatagrams"] - snmp0["InDatagrams"],
                "rcvbuf": snmp1["RcvbufErrors"] - snmp0["RcvbufErrors"]}

    def measure(self, path: str, run_index: int) -> dict[str, Any]:
        args = self.args
        gateway = Gateway(self.rig, self.out, self.bpffs, f"gw_r{run_index}_{path}",
                          gateway_config(path, args.xdp_mode))
        notes: list[str] = []
        attempts: list[dict[str, Any]] = []
        try:
            if path == "nftables":
                nft_drop(self.rig)
            gateway.start(wait_for_xdp=path == "xdp")
            what = {"xdp": f"{xdp_mode(self.rig)} XDP on the gateway veth, deny-rule counter",
                    "nftables": "netdev ingress hook (the earliest nftables has), rule counter",
                    "userspace": "no UDP deny list in user space: the stream route table "
                                 "discards the source (route remote_addr mismatch)"}[path]
            warm = self.generator.flood(args.max_packets, args.warmup)
            log(f"run {run_index} {path}: warm-up {warm['sent']} packets")
            time.sleep(0.5)  # let the listener drain the warm-up's backlog
            while True:
                quiet = wait_quiet(gateway.pgid, args.noise_max, args.quiet_wait)
                log(f"run {run_index} {path}: measuring {args.duration:g} s (attempt "
                    f"{len(attempts) + 1}{'' if quiet else ', machine not quiet'})")
                attempts.append(self.window(path, gateway))
                foreign = attempts[-1]["cpu"]["foreign_pct"]
                if foreign <= args.noise_max or len(attempts) > args.noise_retries:
                    break
                log(f"    other processes used {foreign:.0f}% of a CPU; measuring again")
        finally:
            problems = gateway.stop()
            if path == "nftables":
                nft_remove(self.rig)
        kept = min(attempts, key=lambda attempt: attempt["cpu"]["foreign_pct"])
        flood, cpu, delta = kept["flood"], kept["cpu"], kept["links"]
        read, rcvbuf, dropped = kept["read"], kept["rcvbuf"], kept["dropped"]
        seconds = flood["seconds"]
        notes.append(what)
        notes.append(f"generator {flood['mode']}: {flood['sent']} packets in {seconds:.2f} s"
                     f" ({flood['errors']} failed calls)")
        notes.append(f"gateway veth rx {delta['gw_rx_packets'] / seconds:,.0f}/s "
                     f"(rx_dropped {delta['gw_rx_dropped']}), source veth tx_dropped "
                     f"{delta['src_tx_dropped']}")
        notes.append(f"Udp InDatagrams +{read}, RcvbufErrors +{rcvbuf} "
                     f"({rcvbuf / seconds:,.0f}/s dropped by the kernel: listener too slow)")
        notes.append(f"CPU: sluicegate {cpu['gateway_process_pct']:.0f}%, NAPI kthread "
                     f"{cpu['napi_pct']:.0f}%, softirq "
                     f"{cpu['softirq_pct']:.0f}% (cpu0 busy {cpu.get('cpu0_busy_pct', 0):.0f}%"
                     f" si {cpu.get('cpu0_softirq_pct', 0):.0f}%, cpu1 busy "
                     f"{cpu.get('cpu1_busy_pct', 0):.0f}% si "
                     f"{cpu.get('cpu1_softirq_pct', 0):.0f}%); other processes "
                     f"{cpu['foreign_pct']:.0f}% of a CPU (attempt "
                     f"{attempts.index(kept) + 1} of {len(attempts)} kept)")
        # The row's note: what the path is and what to know when reading its numbers.
        short = [what]
        if rcvbuf:
            short.append(f"the kernel dropped {rcvbuf / seconds:,.0f}/s more the listener "
                         "could not read (RcvbufErrors)")
        if delta["src_tx_dropped"]:
            short.append(f"veth ring overflow {delta['src_tx_dropped'] / seconds:,.0f}/s "
                         "(the receive side fell behind)")
        short.append(f"CPU sluicegate {cpu['gateway_process_pct']:.0f}% + NAPI "
                     f"{cpu['napi_pct']:.0f}% + softirq {cpu['softirq_pct']:.0f}%")
        if dropped <= 0:
            short.append(f"the {path} path counted no drops")
        if cpu["foreign_pct"] > args.noise_max:
            short.append(f"machine busy: other processes used {cpu['foreign_pct']:.0f}% of "
                         "a CPU")
        short += problems
        notes += problems
        # Offered: what the generator sent plus what the veth refused (its ring to the
        # receiving NAPI was full: the receive side fell behind). Live frames count the
        # refused ones in "sent" already (the program redirected them).
        offered = flood["sent"] + (0 if flood["mode"] == LIVE_FRAMES
                                   else delta["src_tx_dropped"])
        row = {"path": path, "offered_pps": offered / seconds,
               "dropped_pps": dropped / seconds, "reached_userspace": read,
               "cpu_pct": round(cpu["gateway_side_pct"], 1),
               "process_cpu_pct": round(cpu["gateway_process_pct"], 1),
               "dropped_pps_per_cpu": (dropped / seconds / (cpu["gateway_side_pct"] / 100)
                                       if cpu["gateway_side_pct"] > 0 else None),
               "note": "; ".join(short), "notes": notes, "run": run_index,
               "detail": {**kept, "attempts": len(attempts)}}
        log(f"run {run_index} {path}: offered {row['offered_pps'] / 1e6:.3f} Mpps, dropped "
            f"{row['dropped_pps'] / 1e6:.3f} Mpps, reached user space {read}, "
            f"CPU {row['cpu_pct']}%, other processes {cpu['foreign_pct']:.0f}%")
        return row


def median_rows(per_run: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for path in PATHS:
        mine = [row for row in per_run if row["path"] == path]
        if not mine:
            continue
        middle = sorted(mine, key=lambda row: row["dropped_pps"])[(len(mine) - 1) // 2]
        cpus = [row["cpu_pct"] for row in mine if row["cpu_pct"] is not None]
        per_cpu = [r["dropped_pps_per_cpu"] for r in mine if r["dropped_pps_per_cpu"]]
        rows.append({
            "path": path,
            "offered_pps": round(statistics.median(r["offered_pps"] for r in mine), 1),
            "dropped_pps": round(statistics.median(r["dropped_pps"] for r in mine), 1),
            "reached_userspace": int(statistics.median(r["reached_userspace"] for r in mine)),
            "cpu_pct": round(statistics.median(cpus), 1) if cpus else None,
            "process_cpu_pct": round(statistics.median(
                r.get("process_cpu_pct") or 0.0 for r in mine), 1),
            "dropped_pps_per_cpu": round(statistics.median(per_cpu), 1) if per_cpu else None,
            "note": middle["note"] + (f" (run {middle['run']}, the median of {len(mine)})"
                                      if len(mine) > 1 else ""),
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| path | offered Mpps | dropped Mpps | reached user space | gateway-side CPU % "
             "| dropped Mpps per CPU |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        per_cpu = row["dropped_pps_per_cpu"]
        lines.append(f"| {row['path']} | {row['offered_pps'] / 1e6:.3f} | "
                     f"{row['dropped_pps'] / 1e6:.3f} | {row['reached_userspace']} | "
                     f"{row['cpu_pct']} | "
                     f"{'-' if per_cpu is None else f'{per_cpu / 1e6:.2f}'} |")
    lines.append("")
    for key, what in (("dropped_pps", "drop rate"), ("dropped_pps_per_cpu", "drops per CPU")):
        by_path = {row["path"]: row for row in rows}
        user = by_path.get("userspace", {}).get(key)
        for path in ("xdp", "nftables"):
            mine = by_path.get(path, {})
            if mine.get(key) and user:
                bound = (" (a lower bound: it dropped about all it was offered)"
                         if key == "dropped_pps"
                         and mine["dropped_pps"] >= 0.95 * mine["offered_pps"] else "")
                lines.append(f"{path} / userspace {what}: {mine[key] / user:.1f}x{bound}")
    return "\n".join(lines)


def git_state() -> str:
    head = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False)
    if head.returncode != 0:
        return "unknown"
    dirty = run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no",
                 "--", "src"], check=False).stdout.splitlines()
    return head.stdout.strip() + (f" (+{len(dirty)} uncommitted changes under src/)"
                                  if dirty else "")


# ------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sluicegate.benchrig.flood",
        description="XDP vs nftables vs user-space drop rate under a UDP flood from a denied "
                    "source, in a two-namespace rig. Example: python -m "
                    "sluicegate.benchrig.flood --out /tmp/sg-flood --duration 3 --runs 1")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--duration", type=float, default=5.0,
                        help=f"measured seconds per flood window (at most {MAX_DURATION:g}; "
                             "default 5)")
    parser.add_argument("--runs", type=int, default=3, help="runs; the table shows medians")
    parser.add_argument("--warmup", type=float, default=1.0, help="discarded flood seconds")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help="comma-separated subset of xdp,nftables,userspace")
    parser.add_argument("--noise-max", type=float, default=10.0,
                        help="other processes' CPU (%% of one CPU) that makes a window be "
                             "measured again (default 10)")
    parser.add_argument("--noise-retries", type=int, default=2,
                        help="extra attempts per window when the machine was busy")
    parser.add_argument("--quiet-wait", type=float, default=10.0,
                        help="before each window, wait up to this many s for a quiet second")
    parser.add_argument("--generator", choices=("auto", LIVE_FRAMES, "packet", "udp"),
                        default="auto")
    parser.add_argument("--sources", type=int, default=1,
                        help=f"spoofed flood sources (packet generator only, 1-{MAX_SOURCES})")
    parser.add_argument("--rx", choices=("gateway", "sender"), default="gateway",
                        help="where the gateway veth's receive side runs: gateway = GRO + "
                             "threaded NAPI pinned to the gateway CPU (default); sender = the "
                             "kernel's default for a veth, the sending CPU")
    parser.add_argument("--xdp-mode", choices=("native", "generic", "auto"), default="native")
    parser.add_argument("--max-packets", type=int, default=MAX_PACKETS,
                        help="packet cap per flood window")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration: seconds, more than 0 and at most {MAX_DURATION:g}")
    if not 0 <= args.warmup <= 5:
        parser.error("--warmup: 0-5 seconds")
    if args.runs < 1:
        parser.error("--runs: at least 1")
    if not 1 <= args.sources <= MAX_SOURCES:
        parser.error(f"--sources: 1-{MAX_SOURCES}")
    if args.sources > 1 and args.generator == "udp":
        parser.error("--sources: more than 1 needs the packet generator")
    if args.generator == LIVE_FRAMES and args.rx != "gateway":
        parser.error(f"--generator {LIVE_FRAMES} needs --rx gateway (GRO gives the gateway "
                     "veth the NAPI such frames need)")
    if not 1 <= args.max_packets <= 1_000_000_000:
        parser.error("--max-packets: 1-1000000000")
    paths = [p for p in args.paths.split(",") if p]
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        parser.error(f"--paths: unknown {', '.join(bad) or '(none)'}; use {','.join(PATHS)}")
    args.path_list = paths
    if args.warmup == 0:
        args.warmup = 0.001
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("flood: needs root (network namespaces, XDP, nftables)", file=sys.stderr)
        return 2
    for tool in ("ip", "nft", "taskset", "ss", *(("ethtool",) if args.rx == "gateway" else ())):
        if shutil.which(tool) is None:
            print(f"flood: missing tool {tool} (apt-get install -y iproute2 nftables "
                  "util-linux ethtool)", file=sys.stderr)
            return 2
    if os.cpu_count() is None or os.cpu_count() < 2:  # type: ignore[operator]
        print("flood: needs 2 CPUs (generator on CPU 0, gateway on CPU 1)", file=sys.stderr)
        return 2
    out: Path = args.out
    for folder in ("conf", "logs", "state"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    # Ctrl-C and SIGTERM unwind through the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    rig = Rig()
    bpffs_mount = out / "state" / "bpffs"
    mounted = False
    started = datetime.datetime.now(datetime.UTC)
    try:
        sweep_stale()
        if "xdp" in args.path_list:
            # `ip netns exec` remounts /sys: the pins live on a bpffs outside it.
            bpffs_mount.mkdir(parents=True, exist_ok=True)
            run(["mount", "-t", "bpf", "bpf", str(bpffs_mount)])
            mounted = True
        rig.up(args.rx)
        log(f"rig up: {rig.source} ({SOURCE_IP}) -- {rig.gateway} ({GATEWAY_IP})")
        mode, probes, binary = choose_generator(out, rig, args.generator, args.sources,
                                                args.rx)
        generator = Generator(binary, rig, mode, args.sources)
        bench = Bench(args, out, rig, bpffs_mount / "sluicegate", generator)
        per_run = []
        for run_index in range(1, args.runs + 1):
            order = list(args.path_list)
            if run_index % 2 == 0:
                order.reverse()  # no path always goes first
            for path in order:
                per_run.append(bench.measure(path, run_index))
        rows = median_rows(per_run)
        meta = {
            "commit": git_state(), "kernel": platform.release(),
            "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "date_end": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "duration": args.duration, "runs": args.runs, "warmup": args.warmup,
            "rx": args.rx, "xdp_mode": args.xdp_mode, "noise_max": args.noise_max,
            "noise_retries": args.noise_retries, "quiet_wait": args.quiet_wait,
            "cpus": os.cpu_count(), "load_cpu": LOAD_CPU, "gateway_cpu": GW_CPU,
            "generator": {"mode": mode, "probe_pps": probes, "payload_bytes": PAYLOAD,
                          "sources": args.sources, "max_packets": args.max_packets,
                          "source": ("src/sluicegate/benchrig/live_frames.py"
                                     if mode == LIVE_FRAMES
                                     else "src/sluicegate/benchrig/flood_gen.c")},
            "rig": f"{rig.source} {SOURCE_IP} ({SRC_IF}) -- veth -- {rig.gateway} "
                   f"{GATEWAY_IP} ({GW_IF}); UDP to {GATEWAY_IP}:{PORT}; deny {DENY_PREFIX}",
            "method": [
                f"the generator ({mode}) pinned to CPU 0 in the source ns; sluicegate pinned "
                "to CPU 1 in the gateway ns; a fresh gateway per path and run; warm-up flood "
                "discarded; runs interleaved (even runs reversed); medians over runs",
                "offered_pps: packets the generator sent (live frames: redirected) + those "
                "its veth refused (tx_dropped: the receiving side's ring was full; live frames "
                "count them in sent already) / the generator's elapsed time",
                "dropped_pps: xdp = the deny rule's counter (pinned sg_xdp_rules), nftables = "
                "the netdev ingress rule's counter, userspace = Udp InDatagrams of the gateway "
                "ns (each datagram read is discarded: no stream route matches its source), "
                "all over the generator's elapsed time",
                "reached_userspace: Udp InDatagrams delta over the window (+0.5 s drain)",
                "rx " + args.rx + (": the gateway veth has GRO on and threaded NAPI, its "
                "kthread pinned to the gateway CPU, so XDP, nftables and the receive stack "
                "run on CPU 1" if args.rx == "gateway" else ": the kernel's default for a "
                "veth: the receive side runs in softirq on the sending CPU (CPU 0)"),
                "cpu_pct: sluicegate's process group + the veth's NAPI kthread + softirq time "
                "of all CPUs, in % of one CPU: everything the gateway side spent",
                "dropped_pps_per_cpu: dropped_pps / (cpu_pct / 100): drop capacity per CPU, "
                "comparable also when the generator, not the drop path, is the limit",
                ("live frames reach the gateway veth as xdp_frames: native XDP drops them "
                 "before any skb exists, as on a NIC; for nftables and the stack the veth "
                 "builds the skb from the frame, as a NIC driver would"
                 if mode == LIVE_FRAMES else
                 "veth caveat: XDP here gets skbs the sender already built (generic XDP, and "
                 "the veth driver for native XDP, re-copy any skb with under 256 bytes of "
                 "headroom, as these have), so it saves only the stack after it; on a NIC, "
                 "native XDP drops before any skb exists: expect XDP's lead over nftables to "
                 "be larger there"),
                "user space has no deny list for UDP stream routes (ip-restriction is HTTP "
                "only): the nearest real user-space rejection is the stream route table "
                "refusing the source (route remote_addr " + ALLOWED_PREFIX + ")",
            ],
            "python": sys.version.split()[0],
        }
        result = {"part": PART, "meta": meta, "rows": rows, "runs": per_run}
        (out / f"{PART}.json").write_text(json.dumps(result, indent=2) + "\n")
        shown = table(rows)
        (out / f"{PART}.md").write_text(shown + "\n")
        print(shown)
        log(f"done: {out / (PART + '.json')}")
        return 0
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as error:
        log(f"ERROR: {error}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        rig.down()
        if mounted:
            run(["umount", "-l", str(bpffs_mount)], check=False)
        left = [n for n in run(["ip", "netns", "list"], check=False).stdout.split()
                if n.startswith(f"{NS_PREFIX}{os.getpid()}-")]
        log(f"LEFT BEHIND: {left}" if left else f"rig removed ({NS_PREFIX}{os.getpid()}-*)")


if __name__ == "__main__":
    sys.exit(main())
