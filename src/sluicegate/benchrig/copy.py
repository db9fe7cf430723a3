"""The copy part of `sluicegate bench interception`: the L4 copy paths (splice, sockmap)
of the explicit proxy against haproxy in TCP mode, in the core rig with the gateway
namespace's receive work on the gateway's core; writes DIR/copy.json.

    python -m sluicegate.benchrig.copy --out DIR [--duration S] [--runs N]

Why a part of its own: a veth delivers a packet on the CPU that sent it, so in the core rig
the gateway namespace's whole receive path runs on the load generator's core. A user-space
proxy loses nothing by that (its receive stack work is done for it, on the other core), but
the sockmap path runs entirely there: in softirq and in the psock work queue, next to the
iperf3 client and server. Here RPS on the gateway's two veths (interception.sh RPS_GW=1)
hands that work to the gateway's core, for haproxy and sluicegate alike, as a NIC's
interrupts would on a gateway host of its own. Same method and files as `core` otherwise
(the rig's raw results in DIR/copy-<timestamp>/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from sluicegate.benchrig import core

PART = "copy"
SETTINGS = {"RPS_GW": "1", "LOADS": "bulk", "CASES": "explicit haproxy",
            "L4_COPIES": "splice sockmap"}
METHOD = [*core.METHOD,
          "RPS on the gateway ns's veths (to-client, to-server) sends their receive work to "
          "the gateway's core (interception.sh RPS_GW=1): every case's kernel work in the "
          "gateway ns runs there, as on a gateway host of its own"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sluicegate.benchrig.copy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    parser.add_argument("--duration", type=int, default=10, metavar="S",
                        help="measured seconds per case and run (default 10)")
    parser.add_argument("--runs", type=int, default=3, metavar="N",
                        help="interleaved runs; medians are reported (default 3)")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.runs < 1:
        print("error: --duration and --runs must be at least 1", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("error: the copy part needs root (network namespaces, BPF)", file=sys.stderr)
        return 3
    args.out.mkdir(parents=True, exist_ok=True)
    result = args.out / f"{PART}.json"
    result.unlink(missing_ok=True)   # never leave an earlier run's numbers as this run's
    run_dir = args.out / f"{PART}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    started = time.monotonic()
    os.environ.update(SETTINGS)
    rc = core.run_rig(run_dir, args.duration, args.runs)
    if rc != 0:
        print(f"error: the copy rig failed (exit {rc}); see {run_dir}/logs", file=sys.stderr)
        return rc
    document = core.document(run_dir, args.duration, args.runs, started)
    document["part"] = PART
    document["meta"]["method"] = METHOD
    result.write_text(json.dumps(document, indent=1) + "\n")
    print(f"[copy] wrote {result}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
