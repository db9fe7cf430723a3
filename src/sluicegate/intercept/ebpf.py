"""eBPF interception: sk_lookup steering, without a single firewall rule (docs/ebpf.md).

`EbpfInterceptor` owns, all in the caller's network namespace:

1. the object `bpf/obj/sk_lookup.bpf.o`, its maps filled from the spec: captured
   destination prefixes and exclusions in LPM tries (the gateway's own addresses and
   loopback are always excluded), a 65536-bit destination-port bitmap, the protocols and
   families, the capturing interfaces, and a SOCKMAP holding the gateway's transparent
   listener per protocol and family;
2. a BPF link attaching `sg_sk_lookup` to the network namespace: when the kernel looks for
   the socket of a locally delivered SYN or datagram the spec captures, it assigns that
   listener (`bpf_sk_assign`), whatever the destination address and port;
3. a tcx ingress link per capturing interface running `sg_tc_mark`, which marks captured
   packets (and, with preserve_source, the server's replies to the gateway's transparent
   upstream sockets) with the fwmark;
4. the policy routing shared with TPROXY mode (intercept/tproxy.py): `fwmark MARK lookup
   TABLE` and `local 0.0.0.0/0 dev lo table TABLE`, so marked packets, addressed to other
   hosts, are delivered locally where sk_lookup can steer them.

Fail-open (`fail_open`, the default): the links are held only by the gateway process. When
it dies, even by kill -9, the kernel detaches them: nothing is marked, the fwmark rule
matches nothing, and traffic is forwarded to its destination. With `fail_open=False` the
links are pinned too and keep capturing after a crash (the listener being gone, captured
connections are refused) until the next start or `sluicegate intercept down`, as TPROXY's
rules do.

Programs and maps are pinned under one bpffs folder (default /sys/fs/bpf/sluicegate,
`SLUICEGATE_BPFFS` overrides it), so `sluicegate bpf status` and bpftool can inspect them,
and `remove()` finds what an earlier (crashed) process left: it detaches links of the
pinned programs wherever they are held, unpins everything, and deletes the tagged policy
routing.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sluicegate.bpf import object_path
from sluicegate.intercept.spec import LOOPBACK, InterceptSpec, Network, check_loop
from sluicegate.intercept.timewait import clear_transparent_timewait
from sluicegate.intercept.tproxy import (
    InterceptError,
    add_policy_routing,
    local_addresses,
    off_loop,
    policy_routing,
    remove_policy_routing,
)

BPFFS_ENV = "SLUICEGATE_BPFFS"
DEFAULT_FOLDER = "/sys/fs/bpf/sluicegate"
OBJECT = "sk_lookup"
SK_LOOKUP_PROGRAM = "sg_sk_lookup"
TC_PROGRAM = "sg_tc_mark"
PROGRAMS = (SK_LOOKUP_PROGRAM, TC_PROGRAM)
MAPS = ("sg_config", "sg_ports", "sg_dst4", "sg_excl4", "sg_dst6", "sg_excl6", "sg_ifaces",
        "sg_sockets", "sg_stats")
# Mirrors of bpf/src/sk_lookup.h (change both together).
SLOTS = {("tcp", 4): 0, ("tcp", 6): 1, ("udp", 4): 2, ("udp", 6): 3}
F_TCP, F_UDP, F_V4, F_V6, F_IFACES, F_PRESERVE_SOURCE = (1 << bit for bit in range(6))
PORT_WORDS = 1024
# Entries of each LPM trie (captured and excluded, per family): SG_MAX_PREFIXES in
# bpf/src/sk_lookup.bpf.c (change both together).
MAX_PREFIXES = 262144
STATS = ("marked", "reply_marked", "assigned", "no_listener", "assign_failed")
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
ETHERNET_HEADER = 14
MOUNT_TIMEOUT = 10.0

# (protocol, IP version) → the listening socket the SOCKMAP slot gets.
Listeners = Mapping[tuple[str, int], socket.socket]


def bpffs_folder(folder: str | Path | None = None) -> Path:
    """Where our pins live: `folder`, else $SLUICEGATE_BPFFS, else /sys/fs/bpf/sluicegate."""
    return Path(folder or os.environ.get(BPFFS_ENV) or DEFAULT_FOLDER)


def _mount_type(path: Path) -> str | None:
    """The filesystem type of the mount holding `path` (from /proc/self/mountinfo)."""
    best, kind = "", None
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            fstype = fields[fields.index("-") + 1]
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fstype
    return kind


def ensure_bpffs(folder: Path) -> None:
    """Create `folder` on a bpffs, mounting one on its parent when the parent is not on
    one (KERNEL.md: bpffs is not mounted by default; /sys/fs/bpf under `ip netns exec` is
    a private remount, so use a folder outside /sys there)."""
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    if _mount_type(parent) != "bpf":
        mount = shutil.which("mount")
        if mount is None:
            raise InterceptError(f"{parent} is not a bpffs and the mount command is missing")
        result = subprocess.run([mount, "-t", "bpf", "bpf", str(parent)], capture_output=True,
                                text=True, timeout=MOUNT_TIMEOUT, check=False)
        if result.returncode != 0:
            raise InterceptError(f"mounting a bpffs on {parent} failed: "
                                 f"{result.stderr.strip() or result.returncode}")
    folder.mkdir(exist_ok=True)


def _lpm_key(network: Network) -> bytes:
    return struct.pack("<I", network.prefixlen) + network.network_address.packed


def port_bitmap(ranges: Iterable[tuple[int, int]]) -> bytes:
    """The `struct sg_ports` value: bit p of word p/64 set for each captured port p."""
    words = [0] * PORT_WORDS
    for lo, hi in ranges:
        for port in range(lo, hi + 1):
            words[port >> 6] |= 1 << (port & 63)
    return struct.pack(f"<{PORT_WORDS}Q", *words)


def config_value(spec: InterceptSpec) -> bytes:
    """The `struct sg_config` value for `spec`."""
    flags = (F_TCP if "tcp" in spec.protocols else 0) | (F_UDP if "udp" in spec.protocols
                                                         else 0)
    flags |= (F_V4 if 4 in spec.families else 0) | (F_V6 if 6 in spec.families else 0)
    flags |= (F_IFACES if spec.interfaces else 0)
    flags |= (F_PRESERVE_SOURCE if spec.preserve_source else 0)
    return struct.pack("<II", flags, spec.fwmark)


def excluded_prefixes(spec: InterceptSpec, own: Iterable[str]) -> list[Network]:
    """What is never captured: `exclude`, loopback, and this host's own addresses (as the
    nftables ruleset's `fib daddr type local return` does in TPROXY mode)."""
    networks: list[Network] = [*spec.exclude, *LOOPBACK]
    for address in own:
        ip = ipaddress.ip_address(str(address).split("%", 1)[0].split("/", 1)[0])
        networks.append(ipaddress.ip_network(ip))
    return list(dict.fromkeys(networks))


def _check_trie_sizes(spec: InterceptSpec, own: Iterable[str]) -> None:
    """Refuse, naming the option, what the LPM tries cannot hold (else a bare ENOSPC from
    a map update halfway through the install)."""
    for what, networks in (("destinations", spec.destinations),
                           ("exclude", excluded_prefixes(spec, own))):
        for version in (4, 6):
            count = sum(1 for n in networks if n.version == version)
            if count > MAX_PREFIXES:
                raise InterceptError(
                    f"{what}: {count} IPv{version} prefixes (after merging); eBPF mode "
                    f"holds at most {MAX_PREFIXES} per family: merge prefixes or use "
                    "mode: tproxy")


def _interfaces(spec: InterceptSpec) -> list[tuple[int, str, int]]:
    """(ifindex, name, l2 header length) of the interfaces to capture on: the spec's, or
    every non-loopback interface of the namespace now."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = [(link["index"], link.get_attr("IFLA_IFNAME"), link["ifi_type"])
                 for link in ipr.get_links()]
    by_name = {name: (index, kind) for index, name, kind in links}
    if spec.interfaces:
        missing = [name for name in spec.interfaces if name not in by_name]
        if missing:
            raise InterceptError(f"interfaces: {', '.join(missing)} not found in this "
                                 "network namespace")
        chosen = [(by_name[name][0], name, by_name[name][1]) for name in spec.interfaces]
    else:
        chosen = [link for link in links if link[2] != ARPHRD_LOOPBACK]
    return [(index, name, ETHERNET_HEADER if kind == ARPHRD_ETHER else 0)
            for index, name, kind in chosen]


def _bpf() -> Any:
    """The loader module, imported on use: TPROXY-only hosts need no libbpf."""
    from sluicegate.bpf import libbpf

    return libbpf


class EbpfInterceptor:
    """The eBPF (sk_lookup) implementation of the Interceptor contract (see DESIGN.md).

    `listeners`: the gateway's transparent listening sockets by (protocol, IP version),
    opened before `install` (intercept/entries.py hands them over). `fail_open`: links
    are not pinned, so a dead gateway stops capturing (see the module docstring).
    `folder`: the bpffs folder for the pins. Methods act on the caller's network namespace
    and raise `InterceptError` with a one-line reason.
    """

    mode = "ebpf"

    def __init__(self, listeners: Listeners | None = None, fail_open: bool = True,
                 folder: str | Path | None = None) -> None:
        self.listeners: Listeners = listeners or {}
        self.fail_open = fail_open
        self.folder = bpffs_folder(folder)
        self.spec: InterceptSpec | None = None
        self.obj: Any = None
        self.links: list[Any] = []
        self.cleared_timewait = 0

    # -- contract ---------------------------------------------------------------------

    def install(self, spec: InterceptSpec) -> None:
        try:
            addresses = local_addresses()
        except Exception as error:  # NetlinkError is not an OSError
            raise InterceptError(f"reading this host's addresses failed: {error}") from None
        reasons = check_loop(spec, addresses)
        if reasons:
            raise InterceptError("refusing the interception spec: " + "; ".join(reasons))
        sockets = self._sockets_for(spec)
        _check_trie_sizes(spec, addresses)
        self.remove()
        libbpf = _bpf()
        try:
            interfaces = off_loop(lambda: _interfaces(spec))
            ensure_bpffs(self.folder)
            self.obj = libbpf.BpfObject(object_path(OBJECT))
            self._fill_maps(spec, addresses, interfaces, sockets)
            self._pin_objects()
            # Steering first, then routing, then marking: nothing is delivered locally
            # before sk_lookup can hand it to a listener.
            netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._keep(self.obj.program(SK_LOOKUP_PROGRAM).attach_netns(netns),
                           "link_sk_lookup")
            finally:
                os.close(netns)
            off_loop(lambda: add_policy_routing(spec))
            marker = self.obj.program(TC_PROGRAM)
            for index, name, _ in interfaces:
                self._keep(marker.attach_tcx_ingress(index, name), f"link_tcx_{name}")
        except (libbpf.BpfError, InterceptError, OSError) as error:
            with contextlib.suppress(InterceptError):
                self.remove()
            if isinstance(error, InterceptError):
                raise
            raise InterceptError(str(error) if not isinstance(error, OSError)
                                 else f"eBPF interception failed: {error}") from None
        self.spec = spec

    def remove(self) -> None:
        failures: list[str] = []
        self._close_own()
        if self.folder.is_dir():
            try:
                self._detach_pinned_programs_links()
            except Exception as error:  # BpfError, libbpf missing: unpinning still helps
                failures.append(str(error))
            for path in sorted(self.folder.iterdir()):
                try:
                    path.unlink()
                except OSError as error:
                    failures.append(f"unpinning {path} failed: {error.strerror}")
            with contextlib.suppress(OSError):
                self.folder.rmdir()
        try:
            off_loop(remove_policy_routing)
        except InterceptError as error:
            failures.append(str(error))
        if failures:
            raise InterceptError(failures[0])
        # As in TPROXY mode (intercept/timewait.py): TIME_WAIT sockets of intercepted
        # connections would black-hole clients reusing a 4-tuple once forwarding resumes.
        with contextlib.suppress(Exception):
            self.cleared_timewait = clear_transparent_timewait(local_addresses())
        self.spec = None

    def status(self) -> dict[str, Any]:
        policy_rules, routes = off_loop(policy_routing)
        pinned: list[dict[str, Any]] = []
        links: list[dict[str, Any]] = []
        counters: dict[str, int] = {}
        sockets: dict[str, str] = {}
        if self.folder.is_dir():
            libbpf = _bpf()
            try:
                pinned = libbpf.describe_pins(self.folder)
                links = links_running(pinned)
                counters = self._counters()
                sockets = self._socket_cookies()
            except libbpf.BpfError as error:
                raise InterceptError(str(error)) from None
        netns = os.stat("/proc/self/ns/net").st_ino
        steering = any(link.get("program") == SK_LOOKUP_PROGRAM
                       and link.get("netns_ino") == netns for link in links)
        return {
            "mode": self.mode,
            "installed": steering and bool(policy_rules) and bool(routes),
            "folder": str(self.folder),
            "fail_open": self.fail_open if self.spec is not None else None,
            "pinned": pinned,
            "links": links,
            "counters": counters,
            "sockets": sockets,
            "policy_rules": policy_rules,
            "routes": routes,
            "spec": self.spec.to_dict() if self.spec is not None else None,
        }

    # -- installing -------------------------------------------------------------------

    def _sockets_for(self, spec: InterceptSpec) -> dict[int, socket.socket]:
        """SOCKMAP slot → listener for every captured (protocol, family)."""
        chosen = {}
        for protocol in spec.protocols:
            for version in spec.families:
                sock = self.listeners.get((protocol, version))
                if sock is None or sock.fileno() < 0:
                    raise InterceptError(f"no transparent {protocol} listener for IPv{version}"
                                         " to steer captured traffic to")
                chosen[SLOTS[(protocol, version)]] = sock
        return chosen

    def _fill_maps(self, spec: InterceptSpec, addresses: list[str],
                   interfaces: list[tuple[int, str, int]],
                   sockets: dict[int, socket.socket]) -> None:
        obj = self.obj
        zero = struct.pack("<I", 0)
        obj.map("sg_config").update(zero, config_value(spec))
        obj.map("sg_ports").update(zero, port_bitmap(spec.port_ranges))
        tries = {4: (obj.map("sg_dst4"), obj.map("sg_excl4")),
                 6: (obj.map("sg_dst6"), obj.map("sg_excl6"))}
        for network in spec.destinations:
            tries[network.version][0].update(_lpm_key(network), b"\x01")
        for network in excluded_prefixes(spec, addresses):
            tries[network.version][1].update(_lpm_key(network), b"\x01")
        ifaces = obj.map("sg_ifaces")
        for index, _, l2_len in interfaces:
            ifaces.update(struct.pack("<I", index), struct.pack("<I", l2_len))
        sockmap = obj.map("sg_sockets")
        for slot, sock in sockets.items():
            try:
                sockmap.update(struct.pack("<I", slot), struct.pack("<Q", sock.fileno()))
            except _bpf().BpfError as error:
                if error.errno == errno.EOPNOTSUPP:
                    raise InterceptError(f"the kernel refused listener {sock.getsockname()} "
                                         "in the SOCKMAP (a TCP socket must be listening)"
                                         ) from None
                raise

    def _pin_objects(self) -> None:
        libbpf = _bpf()
        for name in PROGRAMS:
            libbpf.pin(self.obj.program(name).fd, self.folder / name, f"program {name}")
        for name in MAPS:
            libbpf.pin(self.obj.map(name).fd, self.folder / name, f"map {name}")

    def _keep(self, link: Any, pin_name: str) -> None:
        self.links.append(link)
        if not self.fail_open:
            link.pin(self.folder / pin_name)

    def _close_own(self) -> None:
        for link in reversed(self.links):
            link.close()
        self.links.clear()
        if self.obj is not None:
            self.obj.close()
            self.obj = None

    # -- finding what an earlier run left -----------------------------------------------

    def _pinned_program_ids(self) -> set[int]:
        libbpf = _bpf()
        ids = set()
        for name in PROGRAMS:
            path = self.folder / name
            if path.exists():
                fd = libbpf.open_pinned(path)
                try:
                    ids.add(libbpf.describe(fd)["id"])
                finally:
                    os.close(fd)
        return ids

    def _detach_pinned_programs_links(self) -> None:
        """Detach every link running one of our pinned programs, wherever it is held
        (a pin, or a process that is still alive): remove() means nothing keeps capturing."""
        libbpf = _bpf()
        ids = self._pinned_program_ids()
        if not ids:
            return
        for fd, described in libbpf.links():
            try:
                if described.get("prog_id") in ids:
                    libbpf.detach_link(fd, f"{described['type']} link {described['id']}")
            finally:
                os.close(fd)

    def _counters(self) -> dict[str, int]:
        path = self.folder / "sg_stats"
        if not path.exists():
            return {}
        stats = _bpf().open_pinned_map(path)
        try:
            return {name: sum(struct.unpack("<Q", value)[0] for value in
                              stats.lookup_percpu(struct.pack("<I", slot), 8))
                    for slot, name in enumerate(STATS)}
        finally:
            os.close(stats.fd)

    def _socket_cookies(self) -> dict[str, str]:
        """Filled SOCKMAP slots: "tcp/ipv4" → the listener's socket cookie."""
        path = self.folder / "sg_sockets"
        if not path.exists():
            return {}
        sockmap = _bpf().open_pinned_map(path)
        try:
            cookies = {}
            for (protocol, version), slot in SLOTS.items():
                value = sockmap.lookup(struct.pack("<I", slot), 8)
                if value is not None:
                    cookies[f"{protocol}/ipv{version}"] = str(struct.unpack("<Q", value)[0])
            return cookies
        finally:
            os.close(sockmap.fd)


def links_running(pinned: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every BPF link on the host running one of the pinned programs, described."""
    ids = {item["id"] for item in pinned if item.get("kind") == "program"}
    found = []
    for fd, described in _bpf().links():
        os.close(fd)
        if described.get("prog_id") in ids:
            found.append(described)
    return found


def bpf_status(folder: str | Path | None = None) -> dict[str, Any]:
    """What `sluicegate bpf status` prints: the pinned programs, maps and links of the
    folder, with ids and names (bpftool reads the same ids), and the links running them."""
    path = bpffs_folder(folder)
    if not path.is_dir():
        return {"folder": str(path), "pinned": [], "links": []}
    pinned = _bpf().describe_pins(path)
    return {"folder": str(path), "pinned": pinned, "links": links_running(pinned)}
