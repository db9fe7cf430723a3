"""Kernel flow metrics (`bpf/obj/flow_stats.bpf.o`, source `src/flow_stats.bpf.c`; see
docs/ebpf.md): tcx ingress/egress programs counting packets, bytes and new TCP connections
per interface, direction and port, and per remote prefix, plus a tp_btf tracepoint
program counting this network namespace's TCP retransmits per port.

Cardinality is bounded in the kernel (map sizes in flow_stats.h) and again at export: the
interface totals are exact; ports are the first SG_FLOW_MAX_PORTS (interface, direction,
protocol, port) keys seen, later ones summed as port 0 ("other"); remote prefixes (/24 and
/64 by default) live in an LRU of 4096, of which /metrics lists the `top_remotes` busiest.

`FlowStats` holds its links in this process (they go when it dies); `read_flows` turns the
maps (loaded or pinned) into rows for /metrics and `sluicegate bpf status`.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sluicegate.bpf import libbpf, object_path
from sluicegate.config.kernel import FlowMetricsSettings

OBJECT = "flow_stats"
TC_INGRESS, TC_EGRESS, RETRANSMIT = "sg_flow_in", "sg_flow_out", "sg_flow_retx"
PROGRAMS = (TC_INGRESS, TC_EGRESS, RETRANSMIT)
MAPS = ("sg_flow_config", "sg_flow_ifaces", "sg_flow_totals", "sg_flow_ports",
        "sg_flow_remotes", "sg_flow_retrans")
PINS = (*PROGRAMS, *MAPS)
# Mirrors of bpf/src/flow_stats.h (change both together).
DIRECTIONS = ("ingress", "egress")
PROTOCOLS = {6: "tcp", 17: "udp"}
COUNT = struct.Struct("<QQQ")       # struct sg_flow_count
PORT_KEY = struct.Struct("<IHBB")   # struct sg_flow_port
REMOTE = struct.Struct("<QQQQ")     # struct sg_flow_remote_count: packets[2], bytes[2]
REMOTE_KEY = 16
SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>, Linux 5.14; Python's socket module lacks it
ARPHRD_ETHER = 1
ETHERNET_HEADER = 14
V4_MAPPED = bytes(10) + b"\xff\xff"

MapSource = Callable[[str], libbpf.Map]


def netns_cookie() -> int:
    """This network namespace's cookie (what the retransmit program compares)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return struct.unpack("<Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


def _mask(bits: int, width: int) -> bytes:
    return (((1 << bits) - 1) << (width * 8 - bits)).to_bytes(width, "big")


def config_value(settings: FlowMetricsSettings, cookie: int) -> bytes:
    """The `struct sg_flow_config` value."""
    return (struct.pack("<Q", cookie) + _mask(settings.remote_prefix_v4, 4)
            + _mask(settings.remote_prefix_v6, 16) + bytes(4))


def _zeros(size: int) -> bytes:
    """A per-CPU map value of `size` bytes for every possible CPU (8-byte slots)."""
    cpus = libbpf.library().libbpf_num_possible_cpus()
    return bytes((size + 7) // 8 * 8 * max(cpus, 1))


class FlowStats:
    """The flow programs on `interfaces` [(ifindex, name, ARPHRD type)]."""

    def __init__(self, settings: FlowMetricsSettings, folder: Path) -> None:
        self.settings = settings
        self.folder = folder
        self.obj: libbpf.BpfObject | None = None
        self.links: list[libbpf.Link] = []
        self.interfaces: dict[int, str] = {}

    def install(self, interfaces: list[tuple[int, str, int]]) -> None:
        """Load, fill, pin, attach; raises BpfError (the caller removes what was done)."""
        self.obj = obj = libbpf.BpfObject(object_path(OBJECT))
        obj.map("sg_flow_config").update(struct.pack("<I", 0),
                                         config_value(self.settings, netns_cookie()))
        ifaces, ports = obj.map("sg_flow_ifaces"), obj.map("sg_flow_ports")
        for slot, (ifindex, _, kind) in enumerate(interfaces):
            l2_len = ETHERNET_HEADER if kind == ARPHRD_ETHER else 0
            ifaces.update(struct.pack("<I", ifindex), struct.pack("<II", slot, l2_len))
            # The "other" entries the programs add to when the port map is full.
            for protocol in PROTOCOLS:
                for direction in range(len(DIRECTIONS)):
                    ports.update(PORT_KEY.pack(ifindex, 0, protocol, direction),
                                 _zeros(COUNT.size))
        obj.map("sg_flow_retrans").update(struct.pack("<I", 0), _zeros(8))
        for name in PINS:
            fd = obj.program(name).fd if name in PROGRAMS else obj.map(name).fd
            libbpf.pin(fd, self.folder / name, name)
        incoming, outgoing = obj.program(TC_INGRESS), obj.program(TC_EGRESS)
        for ifindex, name, _ in interfaces:
            self.links.append(incoming.attach_tcx_ingress(ifindex, name))
            self.links.append(outgoing.attach_tcx_egress(ifindex, name))
            self.interfaces[ifindex] = name
        if self.settings.retransmits:
            self.links.append(obj.program(RETRANSMIT).attach_trace())

    def close(self) -> None:
        for link in reversed(self.links):
            link.close()
        self.links.clear()
        if self.obj is not None:
            self.obj.close()
            self.obj = None

    def read(self) -> dict[str, Any]:
        assert self.obj is not None
        return read_flows(self.obj.map, self.interfaces, self.settings.top_remotes)


def _sum(values: list[bytes], layout: struct.Struct) -> list[int]:
    totals = [0] * len(layout.unpack(bytes(layout.size)))
    for raw in values:
        for index, number in enumerate(layout.unpack(raw)):
            totals[index] += number
    return totals


def remote_text(key: bytes, prefix_bits: tuple[int, int]) -> str:
    """A `struct sg_flow_remote` key as a prefix: `10.1.2.0/24`, `2001:db8::/64`."""
    v4_bits, v6_bits = prefix_bits
    if key[:12] == V4_MAPPED:
        return str(ipaddress.ip_network((key[12:16], v4_bits), strict=False))
    return str(ipaddress.ip_network((key[:16], v6_bits), strict=False))


def read_flows(maps: MapSource, names: dict[int, str], top_remotes: int) -> dict[str, Any]:
    """Counters as rows: `flow` (per interface and direction: packets, bytes, syns),
    `ports` (per interface, direction, protocol and port; port "other" for what did not
    fit), `remotes` (the `top_remotes` busiest prefixes by bytes, per direction) and
    `retransmits` (per port)."""
    ifaces = maps("sg_flow_ifaces")
    totals = maps("sg_flow_totals")
    slots: dict[int, str] = {}
    flow = []
    for key in ifaces.keys(4):
        ifindex = struct.unpack("<I", key)[0]
        value = ifaces.lookup(key, 8)
        if value is None:
            continue
        slot = struct.unpack("<II", value)[0]
        name = slots[ifindex] = names.get(ifindex) or _ifname(ifindex)
        for direction_index, direction in enumerate(DIRECTIONS):
            packets, size, syns = _sum(totals.lookup_percpu(
                struct.pack("<I", slot * 2 + direction_index), COUNT.size), COUNT)
            flow.append({"interface": name, "direction": direction, "packets": packets,
                         "bytes": size, "syns": syns})
    ports = []
    port_map = maps("sg_flow_ports")
    for key in port_map.keys(PORT_KEY.size):
        ifindex, port, protocol, direction_index = PORT_KEY.unpack(key)
        packets, size, syns = _sum(port_map.lookup_percpu(key, COUNT.size), COUNT)
        if not packets:
            continue  # an "other" entry nothing was added to
        ports.append({"interface": slots.get(ifindex) or _ifname(ifindex),
                      "direction": DIRECTIONS[direction_index & 1],
                      "protocol": PROTOCOLS.get(protocol, str(protocol)),
                      "port": str(port) if port else "other", "packets": packets,
                      "bytes": size, "syns": syns})
    ports.sort(key=lambda row: (row["interface"], row["direction"], row["protocol"],
                                row["port"]))
    remotes = []
    if top_remotes > 0:
        remote_map = maps("sg_flow_remotes")
        config = maps("sg_flow_config").lookup(struct.pack("<I", 0), 32) or bytes(32)
        # The prefix lengths, from the masks the program applies.
        prefix_bits = (int.from_bytes(config[8:12], "big").bit_count(),
                       int.from_bytes(config[12:28], "big").bit_count())
        seen = []
        for key in remote_map.keys(REMOTE_KEY):
            counts = _sum(remote_map.lookup_percpu(key, REMOTE.size), REMOTE)
            seen.append((counts[2] + counts[3], remote_text(key, prefix_bits), counts))
        seen.sort(key=lambda item: (-item[0], item[1]))
        for _, prefix, (in_packets, out_packets, in_bytes, out_bytes) in seen[:top_remotes]:
            remotes.append({"prefix": prefix, "direction": "ingress", "packets": in_packets,
                            "bytes": in_bytes})
            remotes.append({"prefix": prefix, "direction": "egress", "packets": out_packets,
                            "bytes": out_bytes})
    retransmits = []
    retrans_map = maps("sg_flow_retrans")
    for key in retrans_map.keys(4):
        port = struct.unpack("<I", key)[0]
        count = sum(struct.unpack("<Q", raw)[0] for raw in retrans_map.lookup_percpu(key, 8))
        if count:
            retransmits.append({"port": str(port) if port else "other", "count": count})
    return {"flow": flow, "ports": ports, "remotes": remotes, "retransmits": retransmits}


def _ifname(ifindex: int) -> str:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return str(ifindex)
