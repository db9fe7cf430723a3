"""The core part of `sluicegate bench interception`: explicit proxy, TPROXY and eBPF side by side
(HTTP keep-alive, new connection per request, TCP bulk per L4 copy path, haproxy in TCP mode as
the bulk reference), measured by the rig script interception.sh; writes DIR/core.json.

    python -m sluicegate.benchrig.core --out DIR [--duration S] [--runs N]

The rig's raw results stay in DIR/core-<timestamp>/ (summary.md, runs/, logs/, conf/,
meta.txt). The script's other settings come from the environment as documented at its top
(CASES, LOADS, L4_COPIES, WARMUP, QUIET_WAIT, NOISE_MAX, ...). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from sluicegate.benchrig import summary

PART = "core"
METHOD = [
    "netns rig: client ns - gateway ns (router, ip_forward) - server ns over veths",
    "load generator (wrk / iperf3 client) and servers (nginx, iperf3 -s) pinned to CPU 0, the "
    "proxy (sluicegate or haproxy) alone on CPU 1 (taskset)",
    "a fresh proxy per case and run; warm-up load discarded before each measured window",
    "keepalive: wrk -t1 -c50, HTTP/1.1 keep-alive, 100-byte body; close: the same with "
    "'Connection: close' (the connection rate); bulk: iperf3, 1 stream, client to server",
    "gateway CPU: utime+stime of the proxy's process group from /proc, per request or per GB",
    "runs interleaved (odd runs in case order, even runs reversed); medians over runs",
    "haproxy: mode tcp, 1 thread, explicit L4 proxy in the gateway ns (bulk load only)",
]


def checkout() -> Path | None:
    """The git checkout of this package (an editable install), if any."""
    here = Path(__file__).resolve().parent
    found = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"],
                           capture_output=True, text=True, check=False)
    return Path(found.stdout.strip()) if found.returncode == 0 else None


def commit_of(root: Path | None) -> str:
    if root is None:
        return "unknown"
    rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                            "--untracked-files=no", "--", "src"],
                           capture_output=True, text=True, check=False).stdout.splitlines()
    rev = rev or "unknown"
    return f"{rev} (+{len(dirty)} uncommitted changes under src/)" if dirty else rev


def base_meta(duration: int, runs: int) -> dict[str, Any]:
    """What every part's meta holds: commit, kernel, date UTC, duration, runs."""
    return {"commit": commit_of(checkout()), "kernel": platform.release(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "duration": duration, "runs": runs, "cpus": os.cpu_count()}


def run_rig(run_dir: Path, duration: int, runs: int) -> int:
    """interception.sh into run_dir; its stdout (the Markdown summary) goes to our stderr so
    that the part's stdout stays free. SIGTERM is passed on: the script cleans up its rig."""
    env = dict(os.environ, PY=sys.executable, OUT=str(run_dir), DURATION=str(duration),
               RUNS=str(runs))
    root = checkout()
    if root is not None:
        env.setdefault("SG_ROOT", str(root))
    script = resources.files("sluicegate.benchrig") / "interception.sh"
    with resources.as_file(script) as path:
        child = subprocess.Popen(["bash", str(path)], env=env, stdout=sys.stderr)

        def forward(signum: int, _frame: Any) -> None:
            child.send_signal(signum)

        previous = signal.signal(signal.SIGTERM, forward)
        try:
            while True:
                try:
                    return child.wait()
                except KeyboardInterrupt:
                    # Ctrl-C reached the script too (same process group): let it clean up.
                    continue
        finally:
            signal.signal(signal.SIGTERM, previous)


def document(run_dir: Path, duration: int, runs: int, started: float) -> dict[str, Any]:
    raw = summary._meta(run_dir)
    meta = base_meta(duration, runs)
    meta.update(
        sluicegate_code=raw.get("sluicegate_code"), cpu=raw.get("cpu"),
        cases=raw.get("cases", "").split(), loads=raw.get("loads", "").split(),
        l4_copies=raw.get("l4_copies", "").split(), settings=raw.get("settings"),
        tools={k: raw.get(k) for k in ("nginx", "wrk", "iperf3", "nft", "haproxy")},
        raw_dir=str(run_dir), elapsed_s=round(time.monotonic() - started, 1), method=METHOD)
    return {"part": PART, "meta": meta, "rows": summary.rows(run_dir)}


def run_part(part: str, doc: str, argv: list[str] | None, settings: dict[str, str] | None = None,
             method: list[str] | None = None) -> int:
    """A part measured by interception.sh: `--out/--duration/--runs`, the rig run into
    DIR/<part>-<timestamp>/, DIR/<part>.json written. `settings` are the script's
    environment settings the part fixes; `method` replaces METHOD in the meta."""
    parser = argparse.ArgumentParser(prog=f"python -m sluicegate.benchrig.{part}",
                                     description=doc.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    parser.add_argument("--duration", type=int, default=10, metavar="S",
                        help="measured seconds per case, load and run (default 10)")
    parser.add_argument("--runs", type=int, default=3, metavar="N",
                        help="interleaved runs; medians are reported (default 3)")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.runs < 1:
        print("error: --duration and --runs must be at least 1", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(f"error: the {part} part needs root (network namespaces, nftables, BPF)",
              file=sys.stderr)
        return 3
    args.out.mkdir(parents=True, exist_ok=True)
    result = args.out / f"{part}.json"
    result.unlink(missing_ok=True)   # never leave an earlier run's numbers as this run's
    # A directory per run: an earlier run's files never mix into this one's medians.
    run_dir = args.out / f"{part}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    started = time.monotonic()
    os.environ.update(settings or {})
    rc = run_rig(run_dir, args.duration, args.runs)
    if rc != 0:
        print(f"error: the {part} rig failed (exit {rc}); see {run_dir}/logs",
              file=sys.stderr)
        return rc
    part_doc = document(run_dir, args.duration, args.runs, started)
    part_doc["part"] = part
    if method is not None:
        part_doc["meta"]["method"] = method
    result.write_text(json.dumps(part_doc, indent=1) + "\n")
    print(f"[{part}] wrote {result}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_part(PART, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
