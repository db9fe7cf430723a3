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

import sys

from sluicegate.benchrig import core

PART = "copy"
SETTINGS = {"RPS_GW": "1", "LOADS": "bulk", "CASES": "explicit haproxy",
            "L4_COPIES": "splice sockmap"}
METHOD = [*core.METHOD,
          "RPS on the gateway ns's veths (to-client, to-server) sends their receive work to "
          "the gateway's core (interception.sh RPS_GW=1): every case's kernel work in the "
          "gateway ns runs there, as on a gateway host of its own"]


def main(argv: list[str] | None = None) -> int:
    return core.run_part(PART, __doc__, argv, SETTINGS, METHOD)


if __name__ == "__main__":
    sys.exit(main())
