"""The rule-scaling part of `sluicegate bench interception`: what a new connection costs in
each interception mode with 10, 1,000 and 100,000 intercepted prefixes; writes
DIR/scaling.json.

    python -m sluicegate.benchrig.scaling --out DIR [--duration S] [--runs N]

Rig: client ns ──veth── gateway ns (router, ip_forward) ──veth── server ns, IPv4
(100.112.1.2 / 100.112.1.1 | 100.112.2.1 / 100.112.2.2: shared address space, in the middle
of the prefixes). nginx (1 worker, a 100-byte
`return 200`) listens on :80 in the server ns; sluicegate in the gateway ns intercepts
port 80 (tproxy plugin, `handle: http`, original destination) for N destination prefixes:
the server's /24 and N-1 distinct, non-adjacent /24s spread evenly over 1.0.0.0 -
223.255.255.255 (minus 100.112.0.0/16 and 127.0.0.0/8), so the matching prefix sits inside
the sorted set, not first. Load: wrk -t1 -c50 with `Connection: close` (a new connection per
request) against the server's address. setup_s: gateway start until it logs that
interception is installed (config load and validation, listeners, nft transaction or map
fills). Progress goes to stderr; raw measurements to DIR/scaling-raw.json, logs and
configs to DIR/scaling-work/.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sluicegate.benchrig import cpuacct

PART = "scaling"
MODES = ("tproxy", "ebpf")
PREFIX_COUNTS = (10, 1000, 100_000)
NS_PREFIX = "sgb-"
CLIENT, GATEWAY_CLIENT, GATEWAY_SERVER, SERVER = ("100.112.1.2", "100.112.1.1", "100.112.2.1",
                                                  "100.112.2.2")
# Where the spread prefixes go: unicast space minus the rig's /16 and loopback.
SPREAD = (("1.0.0.0", "100.112.0.0"), ("100.113.0.0", "127.0.0.0"), ("128.0.0.0", "224.0.0.0"))
HTTP_PORT = 80
LOAD_CPU, BACKEND_CPU, GATEWAY_CPU = "0", "0", "1"
CONNS = 50
WARMUP = 2
WRK_TIMEOUT = 10
# As interception.sh: before each warm-up, wait up to --quiet-wait s for a second in which
# other processes (not ours, not kernel threads) use at most NOISE_MAX % of a CPU; a window
# they disturb more is measured again, up to NOISE_RETRIES times, the least disturbed kept.
NOISE_MAX = 10.0
NOISE_RETRIES = 2
QUIET_WAIT = 30
# Config load with 100k prefixes takes ~2 s here; anything near this is a regression.
STARTUP_TIMEOUT = 120.0
STOP_TIMEOUT = 5.0
INSTALLED = "interception installed ({mode})"
BODY = '{"ok":true,"service":"bench-backend","pad":"' + "x" * 53 + '"}'  # + "\n": 100 bytes
NEEDS = ("ip", "nft", "nginx", "wrk", "curl", "taskset", "ss", "mount", "umount")
METHOD = [
    "netns rig: client ns - gateway ns (router, ip_forward) - server ns over veths, IPv4",
    "nginx (1 worker, 100-byte return 200) and wrk pinned to CPU 0, the gateway alone on "
    "CPU 1 (taskset)",
    "gateway: sluicegate, workers: 1, tproxy plugin on 0.0.0.0:80, handle: http, original "
    "destination; a fresh gateway per case and run",
    "prefixes: the server's /24 plus N-1 distinct non-adjacent /24s spread evenly over "
    "unicast IPv4 (not the rig's /16, not 127/8); the matching prefix is not first in the "
    "sorted set (its index is in meta.matching_prefix_index)",
    "load: wrk -t1 -c50 -H 'Connection: close' (a new TCP connection per request), "
    "warm-up discarded before each measured window",
    "gateway CPU: utime+stime (+ reaped children) of the gateway's process group from /proc "
    "around the window (benchrig.cpuacct), divided by the requests wrk completed in it",
    "setup_s: from starting the gateway until it logs 'interception installed' (config "
    "load, validation, listeners, nft transaction or BPF map fills)",
    "runs interleaved (odd runs in case order, even runs reversed); medians over runs",
    "before each warm-up, a wait (up to --quiet-wait s) for a second in which other "
    f"processes use at most {NOISE_MAX:g}% of a CPU; a window they disturb more is measured "
    f"again (up to {NOISE_RETRIES} times), the least disturbed kept (foreign_pct, attempts "
    "in scaling-raw.json)",
]


def log(message: str) -> None:
    print(f"[scaling {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- prefixes ---------------------------------------------------------------------------


def prefixes(count: int, server: str = SERVER) -> list[str]:
    """The server's /24 and count-1 distinct /24s spread evenly over SPREAD, none touching
    another (so nothing merges), sorted by address."""
    matching = ipaddress.IPv4Network(f"{server}/24", strict=False)
    spans = [(int(ipaddress.IPv4Address(lo)) >> 8, int(ipaddress.IPv4Address(hi)) >> 8)
             for lo, hi in SPREAD]
    total = sum(hi - lo for lo, hi in spans)
    others = count - 1
    stride = total // max(others, 1)
    if others and stride < 2:
        raise ValueError(f"{count} prefixes do not fit as distinct non-adjacent /24s")
    chosen = []
    for k in range(others):
        offset = k * stride
        for lo, hi in spans:
            if offset < hi - lo:
                chosen.append(ipaddress.IPv4Network(((lo + offset) << 8, 24)))
                break
            offset -= hi - lo
    # SPREAD leaves out the rig's /16, so no spread /24 touches the server's.
    return [str(n) for n in sorted({*chosen, matching}, key=lambda n: int(n.network_address))]


def matching_index(networks: list[str], server: str = SERVER) -> int:
    address = ipaddress.IPv4Address(server)
    return next(i for i, n in enumerate(networks) if address in ipaddress.IPv4Network(n))


# -- processes and the rig ---------------------------------------------------------------


def run(argv: list[str], check: bool = True, timeout: float = 30.0,
        **options: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            check=False, **options)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: "
                           f"{result.stderr.strip()}")
    return result


def group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(entry)
            if stat is not None and int(stat[2]) == pgid and stat[0] != "Z":
                return True
    return False


def _stat(pid: str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: 0 state, 1 ppid, 2 pgrp,
    11 utime, 12 stime, 13 cutime, 14 cstime."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


@dataclass
class Rig:
    """The three namespaces, the processes started in them and the bpffs of this run;
    `close()` removes all of it (also what an earlier killed run of another pid left)."""

    work: Path
    tag: str = field(default_factory=lambda: f"{NS_PREFIX}{os.getpid()}")
    namespaces: list[str] = field(default_factory=list)
    groups: dict[str, int] = field(default_factory=dict)
    bpffs_mount: Path | None = None

    @property
    def client(self) -> str:
        return f"{self.tag}-client"

    @property
    def gateway(self) -> str:
        return f"{self.tag}-gateway"

    @property
    def server(self) -> str:
        return f"{self.tag}-server"

    @property
    def bpffs(self) -> Path:
        return self.work / "bpffs" / "sluicegate"

    def nsx(self, ns: str, argv: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", ns, *argv], **options)

    def build(self) -> None:
        for ns in (self.client, self.gateway, self.server):
            run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
            self.nsx(ns, ["ip", "link", "set", "lo", "up"])
        # veths created inside the namespaces: no name ever appears in the root namespace
        run(["ip", "link", "add", "name", "eth0", "netns", self.client, "type", "veth",
             "peer", "name", "to-client", "netns", self.gateway])
        run(["ip", "link", "add", "name", "eth0", "netns", self.server, "type", "veth",
             "peer", "name", "to-server", "netns", self.gateway])
        for ns, ifname, address in ((self.client, "eth0", CLIENT),
                                    (self.gateway, "to-client", GATEWAY_CLIENT),
                                    (self.gateway, "to-server", GATEWAY_SERVER),
                                    (self.server, "eth0", SERVER)):
            self.nsx(ns, ["ip", "addr", "add", f"{address}/24", "dev", ifname])
            self.nsx(ns, ["ip", "link", "set", ifname, "up"])
        self.nsx(self.client, ["ip", "route", "add", "default", "via", GATEWAY_CLIENT])
        self.nsx(self.server, ["ip", "route", "add", "default", "via", GATEWAY_SERVER])
        self.sysctl(self.gateway, "net/ipv4/ip_forward", "1")
        # As interception.sh: ~10k new connections/s from one client address would run out
        # of the even ports connect() prefers within seconds (TIME_WAIT lasts 60 s).
        self.sysctl(self.client, "net/ipv4/ip_local_port_range", "1024 65535")
        self.sysctl(self.client, "net/ipv4/tcp_tw_reuse", "1")
        # eBPF pins: a bpffs of this run, outside /sys (`ip netns exec` remounts /sys).
        mount = self.work / "bpffs"
        mount.mkdir(parents=True, exist_ok=True)
        run(["mount", "-t", "bpf", "bpf", str(mount)])
        self.bpffs_mount = mount

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self.nsx(ns, ["sh", "-c", f"echo '{value}' > /proc/sys/{key}"])

    def start(self, name: str, cpu: str, ns: str, argv: list[str], log_path: Path) -> int:
        """A process in its own session (so its group can be stopped and measured), pinned
        to `cpu`, in `ns`; returns its pid (= its process group)."""
        with log_path.open("ab") as out:
            process = subprocess.Popen(["taskset", "-c", cpu, "ip", "netns", "exec", ns,
                                        *argv], stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.groups[name] = process.pid
        return process.pid

    def stop(self, name: str) -> None:
        pgid = self.groups.pop(name, None)
        if pgid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_alive(pgid):
            log(f"{name} did not stop within {STOP_TIMEOUT:g} s; SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pgid, 0)

    def close(self) -> None:
        for name in list(self.groups):
            self.stop(name)
        for ns in reversed(self.namespaces):
            kill_ns_processes(ns)
            run(["ip", "netns", "del", ns], check=False)
        self.namespaces.clear()
        if self.bpffs_mount is not None:
            run(["umount", "-l", str(self.bpffs_mount)], check=False)
            self.bpffs_mount = None

    def leftovers(self) -> list[str]:
        listed = run(["ip", "netns", "list"], check=False).stdout.split()
        return [name for name in listed if name.startswith(f"{self.tag}-")]


def kill_ns_processes(ns: str) -> None:
    pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signum)
        if not pids:
            return
        time.sleep(0.5)
        pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()


def sweep_stale() -> None:
    """Namespaces `sgb-<pid>-*` of bench runs whose process is gone (killed with SIGKILL)."""
    for name in run(["ip", "netns", "list"], check=False).stdout.split():
        found = re.match(rf"^{NS_PREFIX}(\d+)-", name)
        if found and not Path(f"/proc/{found.group(1)}").exists():
            log(f"deleting stale namespace {name} (its bench run is gone)")
            kill_ns_processes(name)
            run(["ip", "netns", "del", name], check=False)


# -- configs ----------------------------------------------------------------------------


def nginx_config(work: Path) -> Path:
    state = work / "nginx"
    (state / "tmp").mkdir(parents=True, exist_ok=True)
    path = state / "nginx.conf"
    path.write_text(f"""
worker_processes 1;
daemon off;
master_process on;
pid {state}/nginx.pid;
error_log stderr warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; multi_accept off; }}
http {{
    access_log off;
    default_type application/json;
    server_tokens off;
    client_body_temp_path {state}/tmp/client_body;
    proxy_temp_path {state}/tmp/proxy;
    fastcgi_temp_path {state}/tmp/fastcgi;
    uwsgi_temp_path {state}/tmp/uwsgi;
    scgi_temp_path {state}/tmp/scgi;
    server {{
        listen {HTTP_PORT} backlog=4096;
        location / {{ return 200 '{BODY}\\n'; }}
        # who connected: the gateway's address when intercepted, else the client's
        location = /whoami {{ default_type text/plain; return 200 "$remote_addr"; }}
    }}
}}
""")
    return path


def gateway_config(work: Path, mode: str, networks: list[str]) -> Path:
    config = {
        "gateway": {"listen": ["127.0.0.1:9080"], "metrics_listen": "127.0.0.1:9091",
                    "workers": 1, "drain_timeout": 1},
        "plugins": [{"name": "tproxy", "config": {
            "listen": f"0.0.0.0:{HTTP_PORT}", "tproxy": True, "mode": mode,
            "handle": "http", "destinations": networks}}]}
    path = work / f"gateway_{mode}_{len(networks)}.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML; writes 100k lines fast
    return path


# -- one case -------------------------------------------------------------------------


def start_gateway(rig: Rig, name: str, config: Path, mode: str, log_path: Path) -> float:
    """Start the gateway, wait until interception is installed; returns setup seconds."""
    log_path.write_text("")
    started = time.monotonic()
    rig.start(name, GATEWAY_CPU, rig.gateway,
              ["env", f"SLUICEGATE_BPFFS={rig.bpffs}", sys.executable, "-m", "sluicegate",
               "run", "-c", str(config)], log_path)
    installed = INSTALLED.format(mode=mode).encode()
    while True:
        with log_path.open("rb") as f:
            if installed in f.read():
                return time.monotonic() - started
        if not group_alive(rig.groups[name]):
            raise RuntimeError(f"the gateway exited during startup (log: {log_path})")
        if time.monotonic() - started > STARTUP_TIMEOUT:
            raise RuntimeError(f"interception not installed within {STARTUP_TIMEOUT:g} s "
                               f"(log: {log_path})")
        time.sleep(0.05)


def check_intercepted(rig: Rig) -> None:
    """One request through the rig: the server must see the gateway, not the client."""
    seen = ""
    for _ in range(3):
        result = rig.nsx(rig.client, ["curl", "-sS", "--max-time", "3",
                                      f"http://{SERVER}/whoami"], check=False)
        seen = result.stdout.strip()
        if seen == GATEWAY_SERVER:
            return
        time.sleep(0.5)
    raise RuntimeError(f"not intercepted: the server saw {seen or 'nothing'} "
                       f"(expected the gateway, {GATEWAY_SERVER})")


def wrk(rig: Rig, seconds: int) -> str:
    argv = ["taskset", "-c", LOAD_CPU, "ip", "netns", "exec", rig.client, "wrk", "-t1",
            f"-c{CONNS}", f"-d{seconds}s", f"--timeout={WRK_TIMEOUT}s", "--latency",
            "-H", "Connection: close", f"http://{SERVER}/"]
    result = run(argv, check=False, timeout=seconds + 30)
    if result.returncode != 0:
        raise RuntimeError(f"wrk exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if found is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(found.group(1)) * _UNITS_MS[found.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    requests = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (requests and rate and p50 and p99):
        raise ValueError(f"unexpected wrk output: {output[:400]}")
    errors = re.search(r"Socket errors: (.*)", output)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {"requests": int(requests.group(1)), "conn_per_s": float(rate.group(1)),
            "p50_ms": _ms(p50.group(1)), "p99_ms": _ms(p99.group(1)),
            "socket_errors": errors.group(1).strip() if errors else "",
            "non_2xx": int(non2xx.group(1)) if non2xx else 0}


def measure_case(rig: Rig, work: Path, mode: str, networks: list[str], run_no: int,
                 duration: int, warmup: int, quiet_wait: float) -> dict[str, Any]:
    name = f"gw_r{run_no}_{mode}_{len(networks)}"
    config = gateway_config(work, mode, networks)
    setup_s = start_gateway(rig, name, config, mode, work / f"{name}.log")
    try:
        check_intercepted(rig)
        root, pgid = str(os.getpid()), str(rig.groups[name])
        if quiet_wait > 0:
            cpuacct.quiet(root, NOISE_MAX, quiet_wait)
        if warmup:
            wrk(rig, warmup)
        attempts = []
        for attempt in range(1 + NOISE_RETRIES):
            before = cpuacct.snap()
            output = wrk(rig, duration)
            window = cpuacct.cpu_window(before, cpuacct.snap(), root, LOAD_CPU, GATEWAY_CPU,
                                        pgid)
            (work / f"{name}.try{attempt}.wrk.txt").write_text(output)
            attempts.append((window["foreign_pct"], attempt, parse_wrk(output), window))
            if window["foreign_pct"] <= NOISE_MAX:
                break
            log(f"  other processes used {window['foreign_pct']:.0f}% of a CPU "
                f"({', '.join(window['foreign_top'])}); measuring again")
        foreign, attempt, result, window = min(attempts, key=lambda a: a[:2])
        cpu_s = window["proxy_cpu_s"]
        result.update({
            "mode": mode, "prefixes": len(networks), "run": run_no,
            "setup_s": round(setup_s, 3), "attempts": len(attempts), "kept": attempt,
            "foreign_pct": foreign, "gateway_cpu_s": cpu_s,
            "gateway_cpu_us_per_conn": cpu_s * 1e6 / result["requests"]
            if cpu_s is not None and result["requests"] else None,
            "cpu_window": window})
        return result
    finally:
        rig.stop(name)
        # TIME_WAIT sockets of intercepted 4-tuples (local address = the server's) would make
        # the router drop the next case's reused tuples for 60 s (interception.sh).
        rig.nsx(rig.gateway, ["ss", "-K", "-Htan", "state", "time-wait"], check=False)
        leftover = rig.nsx(rig.gateway, ["nft", "list", "tables"], check=False).stdout
        if "sluicegate" in leftover or (rig.bpffs.exists() and any(rig.bpffs.iterdir())):
            log(f"{name} left its interception installed; removing it (intercept down)")
            rig.nsx(rig.gateway, ["env", f"SLUICEGATE_BPFFS={rig.bpffs}", sys.executable,
                                  "-m", "sluicegate", "intercept", "down"], check=False)


# -- the part ---------------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def aggregate(results: list[dict[str, Any]], modes: list[str], counts: list[int]
              ) -> list[dict[str, Any]]:
    rows = []
    for mode in modes:
        for count in counts:
            mine = [r for r in results if r["mode"] == mode and r["prefixes"] == count]
            if not mine:
                continue
            rows.append({"mode": mode, "prefixes": count,
                         "conn_per_s": median([r["conn_per_s"] for r in mine]),
                         "p50_ms": median([r["p50_ms"] for r in mine]),
                         "p99_ms": median([r["p99_ms"] for r in mine]),
                         "gateway_cpu_us_per_conn": median(
                             [r["gateway_cpu_us_per_conn"] for r in mine]),
                         "setup_s": median([r["setup_s"] for r in mine])})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'mode':<7} {'prefixes':>8} {'conn/s':>9} {'vs 10':>7} {'p50 ms':>7} "
             f"{'p99 ms':>7} {'CPU us/conn':>11} {'setup s':>8}"]
    base = {r["mode"]: r["conn_per_s"] for r in rows if r["prefixes"] == min(
        x["prefixes"] for x in rows if x["mode"] == r["mode"])}
    for r in rows:
        change = (f"{100.0 * (r['conn_per_s'] / base[r['mode']] - 1):+.1f}%"
                  if base.get(r["mode"]) else "-")
        cpu = r["gateway_cpu_us_per_conn"]
        lines.append(f"{r['mode']:<7} {r['prefixes']:>8} {r['conn_per_s']:>9.0f} "
                     f"{change:>7} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
                     f"{'-' if cpu is None else f'{cpu:.1f}':>11} {r['setup_s']:>8.2f}")
    return "\n".join(lines)


def commit() -> str:
    here = Path(__file__).resolve().parent
    root = run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], check=False
               ).stdout.strip()
    if not root:
        return "unknown"
    rev = run(["git", "-C", root, "rev-parse", "--short", "HEAD"], check=False
              ).stdout.strip() or "unknown"
    dirty = run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no",
                 "--", "src"], check=False).stdout.splitlines()
    return f"{rev} (+{len(dirty)} uncommitted changes under src/)" if dirty else rev


def meta(args: argparse.Namespace, counts: list[int]) -> dict[str, Any]:
    def version(argv: list[str]) -> str:
        result = run(argv, check=False)
        return (result.stdout + result.stderr).strip().splitlines()[0] \
            if (result.stdout + result.stderr).strip() else "unknown"

    return {
        "commit": commit(), "kernel": platform.release(),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration": args.duration, "runs": args.runs, "warmup": args.warmup,
        "quiet_wait": args.quiet_wait,
        "conns": CONNS, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
        "modes": args.modes, "prefix_counts": counts,
        "matching_prefix_index": {str(n): matching_index(prefixes(n)) for n in counts},
        "rig": f"{CLIENT} -> {GATEWAY_CLIENT} | {GATEWAY_SERVER} -> {SERVER}",
        "tools": {"nginx": version(["nginx", "-v"]), "wrk": version(["wrk", "-v"]),
                  "nft": version(["nft", "--version"])},
        "method": METHOD,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sluicegate.benchrig.scaling",
        description="Connection rate, latency and gateway CPU per connection against the "
        "number of intercepted prefixes, in TPROXY and eBPF mode. Example: "
        "python -m sluicegate.benchrig.scaling --out /tmp/sg-scaling --duration 3 --runs 1")
    parser.add_argument("--out", required=True, type=Path, help="writes OUT/scaling.json")
    parser.add_argument("--duration", type=int, default=10, help="measured s per case")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs (medians)")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="discarded s per case")
    parser.add_argument("--quiet-wait", type=float, default=QUIET_WAIT,
                        help="s to wait for idle CPUs before each window (0: no wait)")
    parser.add_argument("--modes", default=",".join(MODES), help="tproxy,ebpf")
    parser.add_argument("--prefixes", default=",".join(str(n) for n in PREFIX_COUNTS),
                        help="prefix counts, comma-separated")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes: a comma-separated list of {', '.join(MODES)}")
    try:
        args.counts = [int(n) for n in args.prefixes.split(",") if n]
    except ValueError:
        parser.error("--prefixes: comma-separated whole numbers")
    if not args.counts or any(n < 1 for n in args.counts):
        parser.error("--prefixes: counts of at least 1")
    if args.duration < 1 or args.runs < 1 or args.warmup < 0:
        parser.error("--duration and --runs: at least 1; --warmup: at least 0")
    return args


def preflight() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables, bpffs)"
    missing = [tool for tool in NEEDS if shutil.which(tool) is None]
    if missing:
        return (f"missing tools: {', '.join(missing)} (apt-get install -y nginx-light wrk "
                "nftables curl)")
    if (os.cpu_count() or 1) < 2:
        return "needs 2 CPUs (load on CPU 0, the gateway alone on CPU 1)"
    return None


def cases(modes: list[str], counts: list[int], run_no: int) -> list[tuple[str, int]]:
    order = [(mode, count) for mode in modes for count in counts]
    return order if run_no % 2 else order[::-1]


@contextlib.contextmanager
def terminated_as_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so the rig is always removed."""
    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = preflight()
    if problem:
        log(f"ERROR: {problem}")
        return 2
    out: Path = args.out
    work = out / "scaling-work"
    work.mkdir(parents=True, exist_ok=True)
    info = meta(args, args.counts)
    networks = {n: prefixes(n) for n in args.counts}
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    rig = Rig(work)
    with terminated_as_exit():
        try:
            sweep_stale()
            rig.build()
            rig.start("nginx", BACKEND_CPU, rig.server,
                      ["nginx", "-p", str(work / "nginx"), "-c", str(nginx_config(work)),
                       "-e", "stderr"], work / "nginx.log")
            for run_no in range(1, args.runs + 1):
                for mode, count in cases(args.modes, args.counts, run_no):
                    log(f"run {run_no}/{args.runs}: {mode}, {count} prefixes")
                    try:
                        result = measure_case(rig, work, mode, networks[count], run_no,
                                              args.duration, args.warmup,
                                              args.quiet_wait)
                    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as error:
                        failures.append(f"run {run_no} {mode} {count}: {error}")
                        log(f"  FAILED: {error}")
                        continue
                    results.append(result)
                    log(f"  {result['conn_per_s']:.0f} conn/s, p99 {result['p99_ms']:.2f} ms,"
                        f" setup {result['setup_s']:.2f} s")
        except KeyboardInterrupt:
            log("interrupted")
            failures.append("interrupted")
        finally:
            rig.close()
            left = rig.leftovers()
            log(f"LEFT BEHIND: {left}" if left else f"rig removed (namespaces {rig.tag}-*)")
    info["failures"] = failures
    info["loadavg_end"] = os.getloadavg()
    rows = aggregate(results, args.modes, args.counts)
    (out / "scaling-raw.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "scaling.json").write_text(json.dumps({"part": PART, "meta": info, "rows": rows},
                                                 indent=1) + "\n")
    if rows:
        print(table(rows))
    log(f"wrote {out / 'scaling.json'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
