"""The XDP filter (`bpf/obj/xdp_filter.bpf.o`, source `src/xdp_filter.bpf.c`): deny lists and
per-source rate limits enforced before the kernel's network stack (docs/ebpf.md).

`XdpFilter` loads the object, fills its maps from `kernel.xdp` (config/kernel.py), pins
programs and maps under the bpffs folder and attaches `sg_xdp_filter` to each interface
with a BPF link held by this process: when the process dies (even kill -9) the filter goes
with it, and the next start unpins what is left (bpf/kernel.py).

`read_xdp` turns the counters into rows for /metrics and `sluicegate bpf status`; it works
on the loaded object's maps or on the pins (another process).
"""

from __future__ import annotations

import errno
import ipaddress
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sluicegate.bpf import libbpf, object_path
from sluicegate.config.kernel import RateLimit, XdpSettings

OBJECT = "xdp_filter"
PROGRAM = "sg_xdp_filter"
MAPS = ("sg_xdp_config", "sg_xdp_ifaces", "sg_xdp_deny4", "sg_xdp_deny6", "sg_xdp_exempt4",
        "sg_xdp_exempt6", "sg_xdp_sources", "sg_xdp_stats", "sg_xdp_rules")
PINS = (PROGRAM, *MAPS)
# Mirrors of bpf/src/xdp_filter.h (change both together).
MAX_IFACES = 64
MAX_RULES = 8192
REASONS = ("passed", "denied", "rate_limited", "syn_limited")
COUNT = struct.Struct("<QQ")          # struct sg_xdp_count
BUCKET = struct.Struct("<QQQ")        # struct sg_xdp_bucket
SOURCE_KEY = 16                       # struct sg_xdp_source
NS_PER_SECOND = 1_000_000_000
MODE_FLAGS = {"native": libbpf.XDP_FLAGS_DRV_MODE, "generic": libbpf.XDP_FLAGS_SKB_MODE}
# Errors meaning "this driver has no native XDP hook": auto mode falls back to generic.
NO_NATIVE = {errno.EOPNOTSUPP, errno.EINVAL, 524}  # 524: the kernel's ENOTSUPP
V4_MAPPED = bytes(10) + b"\xff\xff"

MapSource = Callable[[str], libbpf.Map]


def limit_value(limit: RateLimit | None) -> tuple[int, int]:
    """(interval ns, tolerance ns) of a limit for the GCRA in the program; (0, 0): off."""
    if limit is None:
        return 0, 0
    interval = max(1, round(NS_PER_SECOND / limit.rate))
    return interval, interval * limit.bucket


def config_value(settings: XdpSettings) -> bytes:
    """The `struct sg_xdp_config` value."""
    return struct.pack("<QQQQ", *limit_value(settings.rate_limit),
                       *limit_value(settings.syn_rate_limit))


def lpm_key(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bytes:
    return struct.pack("<I", network.prefixlen) + network.network_address.packed


def source_text(key: bytes) -> str:
    """The address of a `struct sg_xdp_source` key (IPv4 is stored v4-mapped)."""
    if key[:12] == V4_MAPPED:
        return str(ipaddress.IPv4Address(key[12:16]))
    return str(ipaddress.IPv6Address(key[:16]))


class XdpFilter:
    """`sg_xdp_filter` on `interfaces` [(ifindex, name)], configured by `settings`."""

    def __init__(self, settings: XdpSettings, folder: Path) -> None:
        self.settings = settings
        self.folder = folder
        self.obj: libbpf.BpfObject | None = None
        self.links: list[libbpf.Link] = []
        self.modes: dict[str, str] = {}  # interface -> "native" | "generic"
        self.interfaces: dict[int, str] = {}

    def install(self, interfaces: list[tuple[int, str]]) -> None:
        """Load, fill, pin, attach; raises BpfError (the caller removes what was done)."""
        self.obj = obj = libbpf.BpfObject(object_path(OBJECT))
        zero = struct.pack("<I", 0)
        obj.map("sg_xdp_config").update(zero, config_value(self.settings))
        tries = {4: obj.map("sg_xdp_deny4"), 6: obj.map("sg_xdp_deny6")}
        for index, network in enumerate(self.settings.deny_networks()):
            # The value is the rule's index: its drop counter in sg_xdp_rules.
            tries[network.version].update(lpm_key(network), struct.pack("<I", index))
        exempt = {4: obj.map("sg_xdp_exempt4"), 6: obj.map("sg_xdp_exempt6")}
        for network in self.settings.exempt_networks():
            exempt[network.version].update(lpm_key(network), b"\x01")
        ifaces = obj.map("sg_xdp_ifaces")
        for slot, (ifindex, _) in enumerate(interfaces):
            ifaces.update(struct.pack("<I", ifindex), struct.pack("<I", slot))
        for name in PINS:
            fd = obj.program(name).fd if name == PROGRAM else obj.map(name).fd
            libbpf.pin(fd, self.folder / name, name)
        program = obj.program(PROGRAM)
        for ifindex, name in interfaces:
            link, mode = self._attach(program, ifindex, name)
            self.links.append(link)
            self.modes[name] = mode
            self.interfaces[ifindex] = name

    def _attach(self, program: libbpf.Program, ifindex: int, name: str
                ) -> tuple[libbpf.Link, str]:
        mode = self.settings.mode
        if mode != "auto":
            return program.attach_xdp(ifindex, MODE_FLAGS[mode], name), mode
        try:
            return program.attach_xdp(ifindex, MODE_FLAGS["native"], name), "native"
        except libbpf.BpfError as error:
            if error.errno not in NO_NATIVE:
                raise
        return program.attach_xdp(ifindex, MODE_FLAGS["generic"], name), "generic"

    def close(self) -> None:
        """Detach (the links are ours alone) and unload what no pin holds."""
        for link in reversed(self.links):
            link.close()
        self.links.clear()
        if self.obj is not None:
            self.obj.close()
            self.obj = None

    def read(self) -> dict[str, Any]:
        assert self.obj is not None
        return read_xdp(self.obj.map, self.interfaces, sources=0)


def read_xdp(maps: MapSource, names: dict[int, str], sources: int = 0) -> dict[str, Any]:
    """Counters as rows: `xdp` (per interface and reason: packets, bytes), `xdp_rules` (per
    deny rule with drops), and with `sources` > 0, `xdp_sources`: the sources with the most
    rate-limit drops (bounded: the LRU holds at most 65536)."""
    ifaces = maps("sg_xdp_ifaces")
    stats = maps("sg_xdp_stats")
    rows = []
    for key in ifaces.keys(4):
        ifindex = struct.unpack("<I", key)[0]
        value = ifaces.lookup(key, 4)
        if value is None:
            continue
        slot = struct.unpack("<I", value)[0]
        name = names.get(ifindex) or _ifname(ifindex)
        for reason_index, reason in enumerate(REASONS):
            index = struct.pack("<I", slot * len(REASONS) + reason_index)
            packets = size = 0
            for raw in stats.lookup_percpu(index, COUNT.size):
                count, length = COUNT.unpack(raw)
                packets += count
                size += length
            rows.append({"interface": name, "reason": reason, "packets": packets,
                         "bytes": size})
    rules = []
    counters = maps("sg_xdp_rules")
    for trie, width in ((maps("sg_xdp_deny4"), 4), (maps("sg_xdp_deny6"), 16)):
        for key in trie.keys(4 + width):
            value = trie.lookup(key, 4)
            if value is None:
                continue
            index = struct.unpack("<I", value)[0]
            prefixlen = struct.unpack("<I", key[:4])[0]
            address = ipaddress.ip_address(key[4:4 + width])
            drops = sum(struct.unpack("<Q", raw)[0] for raw in
                        counters.lookup_percpu(struct.pack("<I", index), 8))
            rules.append({"rule": f"{address}/{prefixlen}", "index": index,
                          "packets": drops})
    rules.sort(key=lambda row: row["index"])
    shown: dict[str, Any] = {"xdp": rows, "xdp_rules": rules}
    if sources > 0:
        buckets = maps("sg_xdp_sources")
        dropped = []
        for key in buckets.keys(SOURCE_KEY):
            value = buckets.lookup(key, BUCKET.size)
            if value is not None and BUCKET.unpack(value)[2]:
                dropped.append({"source": source_text(key),
                                "dropped": BUCKET.unpack(value)[2]})
        dropped.sort(key=lambda row: -row["dropped"])
        shown["xdp_sources"] = dropped[:sources]
    return shown


def _ifname(ifindex: int) -> str:
    import socket

    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return str(ifindex)
