"""The flood bench's rig: two namespaces joined by one veth, and the helpers that run
commands in them, sweep a dead run's leftovers, pin the gateway veth's NAPI kthreads and
install the nftables netdev drop rule (a path of the bench, and the sink the generator
probe floods into).

    sgb-<pid>-source ──veth── sgb-<pid>-gateway
    10.211.1.2 (eth0)         10.211.1.1 (to-source)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NS_PREFIX = "sgb-"
SOURCE_IP = "10.211.1.2"          # the flood's (denied) source; --sources spreads from here
GATEWAY_IP = "10.211.1.1"
DENY_PREFIX = "10.211.1.0/25"     # covers every flood source (up to .127)
ALLOWED_PREFIX = "10.211.1.128/25"  # the userspace path's route: the flood is not in it
PORT = 9999
GW_IF = "to-source"
SRC_IF = "eth0"
NFT_TABLE = "sgbench_flood"
LOAD_CPU = "0"
GW_CPU = "1"


def log(message: str) -> None:
    print(f"[flood {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(argv: list[str], check: bool = True, timeout: float = 30.0,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()}")
    return result


def nsx(ns: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run(["ip", "netns", "exec", ns, *argv], **kwargs)


# ------------------------------------------------------------------ the rig
def sweep_stale() -> None:
    """Delete `sgb-<pid>-*` namespaces whose creating process is gone (a SIGKILLed run),
    stopping what still runs in them first."""
    listed = run(["ip", "netns", "list"], check=False).stdout.split("\n")
    for line in listed:
        name = line.split(" ", 1)[0]
        found = re.match(rf"^{NS_PREFIX}(\d+)-", name)
        if not found or Path(f"/proc/{found.group(1)}").exists():
            continue
        log(f"deleting stale namespace {name} (its bench run, pid {found.group(1)}, is gone)")
        kill_ns_processes(name)
        run(["ip", "netns", "del", name], check=False)


def kill_ns_processes(ns: str) -> None:
    pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), sig)
        if not pids:
            return
        time.sleep(0.5)
        pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()


class Rig:
    """Two namespaces joined by one veth, created inside them (nothing in the root ns)."""

    def __init__(self) -> None:
        tag = f"{NS_PREFIX}{os.getpid()}"
        self.source = f"{tag}-source"
        self.gateway = f"{tag}-gateway"
        self.made: list[str] = []

    def up(self, rx: str) -> None:
        for ns in (self.source, self.gateway):
            run(["ip", "netns", "add", ns])
            self.made.append(ns)
            nsx(ns, ["ip", "link", "set", "lo", "up"])
        run(["ip", "link", "add", "name", SRC_IF, "netns", self.source, "type", "veth",
             "peer", "name", GW_IF, "netns", self.gateway])
        nsx(self.source, ["ip", "addr", "add", f"{SOURCE_IP}/24", "dev", SRC_IF])
        nsx(self.gateway, ["ip", "addr", "add", f"{GATEWAY_IP}/24", "dev", GW_IF])
        nsx(self.source, ["ip", "link", "set", SRC_IF, "up"])
        nsx(self.gateway, ["ip", "link", "set", GW_IF, "up"])
        if rx == "gateway":
            # GRO gives the veth a NAPI instance for every packet (not only with XDP), and
            # threaded NAPI runs its poll in a kthread we can pin to the gateway's CPU: the
            # receive side (XDP, nftables, the stack) then runs on CPU 1, not on the sender's.
            nsx(self.gateway, ["ethtool", "-K", GW_IF, "gro", "on"])
            # veth_xmit bypasses the peer's NAPI for skbs from a TSO-capable sender unless
            # UDP GRO forwarding is on (which would merge the flood into fewer packets).
            nsx(self.source, ["ethtool", "-K", SRC_IF, "tso", "off"])
            nsx(self.gateway, ["sh", "-c", f"echo 1 > /sys/class/net/{GW_IF}/threaded"])
            if not pin_napi_threads():
                raise RuntimeError(f"no threaded NAPI kthread for {GW_IF} appeared")

    def gateway_mac(self) -> str:
        return nsx(self.gateway, ["cat", f"/sys/class/net/{GW_IF}/address"]).stdout.strip()

    def link_stats(self) -> dict[str, int]:
        """rx of the gateway's veth, tx of the source's (the offered side)."""
        shown: dict[str, int] = {}
        for ns, ifname, side in ((self.gateway, GW_IF, "gw"), (self.source, SRC_IF, "src")):
            link = json.loads(nsx(ns, ["ip", "-j", "-s", "link", "show", "dev", ifname]).stdout)
            stats = link[0]["stats64"]
            for direction in ("rx", "tx"):
                for key in ("packets", "dropped"):
                    shown[f"{side}_{direction}_{key}"] = int(stats[direction][key])
        return shown

    def down(self) -> None:
        for ns in self.made:
            kill_ns_processes(ns)
            run(["ip", "netns", "del", ns], check=False)
        self.made.clear()


# Threaded NAPI kthreads are named napi/<ifname>-<napi id>; comm keeps 15 bytes.
NAPI_COMM = f"napi/{GW_IF}-"[:15]


def napi_threads() -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip().startswith(NAPI_COMM):
                    found.append(int(pid))
    return found


def pin_napi_threads() -> list[int]:
    """Pin the gateway veth's NAPI kthreads to GW_CPU (again before each window: attaching
    or detaching XDP may create new NAPI instances)."""
    pids = napi_threads()
    for pid in pids:
        run(["taskset", "-pc", GW_CPU, str(pid)], check=False)
    return pids



# ------------------------------------------------------------------ counters
def nft_drop(rig: Rig) -> None:
    script = (f"table netdev {NFT_TABLE} {{\n"
              f"  chain ingress {{ type filter hook ingress device {GW_IF} priority -500; "
              f"policy accept;\n"
              f"    ip saddr {DENY_PREFIX} counter drop\n  }}\n}}\n")
    nsx(rig.gateway, ["nft", "-f", "-"], input=script)


def nft_remove(rig: Rig) -> None:
    nsx(rig.gateway, ["nft", "delete", "table", "netdev", NFT_TABLE], check=False)


def nft_dropped(rig: Rig) -> int:
    shown = json.loads(nsx(rig.gateway, ["nft", "-j", "list", "table", "netdev",
                                         NFT_TABLE]).stdout)
    total = 0
    for item in shown["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                total += int(expr["counter"]["packets"])
    return total
