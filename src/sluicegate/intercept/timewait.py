"""Clearing the TIME_WAIT sockets transparent connections leave behind.

After a TPROXY gateway stops, the connections it closed first stay in TIME_WAIT with the
*intercepted* destination (an address this host does not own) as their local address. On
a router, early demux attaches such a socket to a new SYN that reuses the 4-tuple, and
`ip_forward` drops packets that carry a socket: clients that reuse a source port hang for
up to 60 s instead of reaching the server directly (fail-open broken; measured, see
docs/benchmarks.md). Only IP_TRANSPARENT (or nonlocal-bind) sockets can have a local
address the host does not own, so destroying every TIME_WAIT socket whose local address
is not one of ours (SOCK_DESTROY, as `ss -K` does) removes exactly those.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess

log = logging.getLogger("sluicegate")

SS_TIMEOUT = 10.0
# Always ours, whether or not an address on lo says so.
LOOPBACK = ("127.0.0.0/8", "::1")


def foreign_timewait_filter(local_addresses: list[str]) -> str:
    """The `ss` filter matching sockets whose local address is not one of this host's."""
    terms = []
    for address in [*LOOPBACK, *local_addresses]:
        network = ipaddress.ip_network(address.split("%")[0], strict=False)
        text = str(network.network_address)
        shown = f"[{text}]" if network.version == 6 else text
        if network.prefixlen != network.max_prefixlen:
            shown += f"/{network.prefixlen}"
        terms.append(f"src {shown}")
    return "not ( " + " or ".join(dict.fromkeys(terms)) + " )"


def clear_transparent_timewait(local_addresses: list[str]) -> int:
    """Destroy TIME_WAIT TCP sockets with a foreign local address; return how many.
    Best effort: without `ss` or SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY) it logs and
    returns 0, since the sockets expire on their own."""
    ss = shutil.which("ss")
    if ss is None:
        log.warning("ss (iproute2) not found: transparent TIME_WAIT sockets are left to expire")
        return 0
    command = [ss, "-K", "-t", "-n", "-H", "state", "time-wait",
               foreign_timewait_filter(local_addresses)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=SS_TIMEOUT,
                                stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("clearing transparent TIME_WAIT sockets failed: %s", error)
        return 0
    if result.returncode != 0:
        log.warning("clearing transparent TIME_WAIT sockets failed: %s",
                    result.stderr.strip().splitlines()[:1])
        return 0
    cleared = sum(1 for line in result.stdout.splitlines() if line.strip())
    if cleared:
        log.info("cleared %d TIME_WAIT sockets of intercepted connections", cleared)
    return cleared
