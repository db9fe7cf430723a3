"""What to intercept: the interception spec, and the loop guard.

Pure logic, no I/O. The config layer validates user input with pydantic and builds an
`InterceptSpec` (with `InterceptSpec.from_options`); the constructor checks everything once
more and raises `ValueError` with the field and reason, so a spec that exists is valid.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTOCOLS = ("tcp", "udp")
# The firewall mark that routes a captured packet to the local table. 0x1 is the value
# every TPROXY guide uses; change it when another program on the host already uses mark 1
# (e.g. for its own policy routing). The gateway's own sockets must never carry this mark.
DEFAULT_FWMARK = 0x1
# The routing table holding `local 0.0.0.0/0 dev lo` (and `::/0`); 100 is the customary one.
# 253 (default), 254 (main) and 255 (local) are the kernel's own tables and are refused.
DEFAULT_ROUTE_TABLE = 100
RESERVED_ROUTE_TABLES = (0, 253, 254, 255)
# Linux interface names: IFNAMSIZ is 16 including the terminating NUL.
MAX_IFNAME = 15
# Prefixes of each list written in a log line (see InterceptSpec.summary).
LOGGED_PREFIXES = 8
ANY_V4 = ipaddress.IPv4Network("0.0.0.0/0")
ANY_V6 = ipaddress.IPv6Network("::/0")
# Addresses that always mean "this host", whatever its interfaces say.
LOOPBACK = (ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv6Network("::1/128"))


def parse_port_range(value: Any) -> tuple[int, int]:
    """`80`, `"80"`, `"8000-8099"`, `"8000:8099"` or `(8000, 8099)` → (lo, hi)."""
    if isinstance(value, bool):
        raise ValueError(f"port range {value!r}: expected a port or lo-hi")
    if isinstance(value, int):
        lo = hi = value
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        lo, hi = (_port(part, value) for part in value)
    elif isinstance(value, str):
        text = value.strip().replace(":", "-")
        lo_text, sep, hi_text = text.partition("-")
        lo = _port(lo_text, value)
        hi = _port(hi_text, value) if sep else lo
    else:
        raise ValueError(f"port range {value!r}: expected a port or lo-hi")
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"port range {value!r}: ports are 1-65535 and lo <= hi")
    return lo, hi


def _port(part: Any, whole: Any) -> int:
    if isinstance(part, int) and not isinstance(part, bool):
        return part
    if isinstance(part, str) and part.strip().isdigit():
        return int(part.strip())
    raise ValueError(f"port range {whole!r}: expected a port or lo-hi")


def parse_network(value: Any, what: str = "CIDR") -> Network:
    """`10.0.0.0/8`, `fd00::/64`, or a bare address (a /32 or /128). Host bits are dropped
    (`10.1.2.3/8` means 10.0.0.0/8)."""
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    text = str(value).strip()
    fast = _parse_plain(text)
    if fast is not None:
        return fast
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{what} {value!r}: not an IPv4 or IPv6 address or prefix") from None


def _parse_plain(text: str) -> Network | None:
    """`ADDR/LEN` or `ADDR` through inet_pton (strict: no leading zeros, no zone), about
    10x faster than `ip_network`, which makes a 100k-prefix spec take seconds per parse.
    None for anything else (netmask forms, errors): `ip_network` decides and words the
    error."""
    address, slash, length = text.partition("/")
    kind = ipaddress.IPv6Network if ":" in address else ipaddress.IPv4Network
    bits = 128 if kind is ipaddress.IPv6Network else 32
    if slash and not (length.isascii() and length.isdigit() and int(length) <= bits):
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET6 if bits == 128 else socket.AF_INET, address)
    except OSError:
        return None
    prefixlen = int(length) if slash else bits
    mask = ((1 << bits) - 1) ^ ((1 << (bits - prefixlen)) - 1)
    return kind((int.from_bytes(packed, "big") & mask, prefixlen))


def collapse(networks: Iterable[Network]) -> tuple[Network, ...]:
    """Sorted, merged, v4 before v6 (nft interval sets refuse overlapping elements).

    What `ipaddress.collapse_addresses` returns, computed on integers: that one takes
    about a second per 100k prefixes, this a tenth of it, and it keeps the given objects
    when nothing merges (the common case)."""
    nets = list(networks)
    v4 = _collapse_family([n for n in nets if n.version == 4], ipaddress.IPv4Network, 32)
    v6 = _collapse_family([n for n in nets if n.version == 6], ipaddress.IPv6Network, 128)
    return (*v4, *v6)


def _collapse_family(nets: list[Any], kind: Any, bits: int) -> list[Any]:
    # CIDR blocks either nest or are disjoint: sorted by (start, length), a block starting
    # inside the previous kept one is inside it.
    items = sorted(((int(n.network_address), n.prefixlen, n) for n in nets),
                   key=lambda item: (item[0], item[1]))
    stack: list[tuple[int, int, Any]] = []
    end = -1
    for start, prefixlen, net in items:
        if start <= end:
            continue
        end = start + (1 << (bits - prefixlen)) - 1
        stack.append((start, prefixlen, net))
        # Two sibling halves become their parent, which may pair with the block before it.
        while len(stack) >= 2:
            (a, alen, _), (b, blen, _) = stack[-2], stack[-1]
            size = 1 << (bits - alen)
            if alen != blen or alen == 0 or a & ((size << 1) - 1) or b != a + size:
                break
            stack[-2:] = [(a, alen - 1, kind((a, alen - 1)))]
    return [net for _, _, net in stack]


@functools.lru_cache(maxsize=8)
def _prefixes(values: tuple[Any, ...], what: str) -> tuple[Network, ...]:
    """Parsed and collapsed. Cached: one config load builds the same spec several times
    (validation, the entry, each worker), which costs ~0.4 s each with 100k prefixes."""
    return collapse(parse_network(n, what) for n in values)


@dataclass(frozen=True, slots=True)
class InterceptSpec:
    """Which traffic the gateway intercepts transparently (TPROXY), and how.

    - `listen_port`: the port of the gateway's transparent listener; captured packets are
      handed to it (`tproxy to :PORT`). The listener must be bound to the wildcard address
      of each captured family unless `listen_address` names it.
    - `protocols`: `"tcp"`, `"udp"` or both. Default: tcp.
    - `port_ranges`: destination ports to capture, as (lo, hi) pairs. Default: the listen
      port only.
    - `destinations`: destination prefixes to capture, IPv4 and IPv6 mixed. A family with
      no prefix is not captured. Default: everything (`0.0.0.0/0` and `::/0`). The gateway's
      own addresses are never captured, whatever this says.
    - `exclude`: destination prefixes never captured (checked before `destinations`).
    - `interfaces`: capture only packets arriving on these interfaces; empty = any.
    - `preserve_source`: upstream connections carry the client's address (the gateway
      binds it with IP_TRANSPARENT); adds the rule that routes the server's replies back
      to the gateway's socket.
    - `fwmark`: the mark that sends captured packets to `route_table` (default 0x1).
    - `route_table`: the routing table with the `local` default routes (default 100).
    - `listen_address`: the listener's address when it is not the wildcard; `None` (the
      default) makes the rule `tproxy to :PORT`, which finds a wildcard listener.
    """

    listen_port: int
    protocols: tuple[str, ...] = ("tcp",)
    port_ranges: tuple[tuple[int, int], ...] = ()
    destinations: tuple[Network, ...] = (ANY_V4, ANY_V6)
    exclude: tuple[Network, ...] = ()
    interfaces: tuple[str, ...] = ()
    preserve_source: bool = False
    fwmark: int = DEFAULT_FWMARK
    route_table: int = DEFAULT_ROUTE_TABLE
    listen_address: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.listen_port, bool) or not isinstance(self.listen_port, int) \
                or not 1 <= self.listen_port <= 65535:
            raise ValueError(f"listen_port {self.listen_port!r}: expected 1-65535")
        protocols = tuple(dict.fromkeys(str(p).lower() for p in self.protocols))
        if not protocols or any(p not in PROTOCOLS for p in protocols):
            raise ValueError(f"protocols {list(self.protocols)!r}: expected a non-empty "
                             f"list of {' and '.join(PROTOCOLS)}")
        set_(self, "protocols", protocols)
        ranges = tuple(sorted(parse_port_range(r) for r in self.port_ranges))
        set_(self, "port_ranges", ranges or ((self.listen_port, self.listen_port),))
        destinations = _prefixes(tuple(self.destinations), "destination")
        if not destinations:
            raise ValueError("destinations: at least one prefix is needed "
                             "(0.0.0.0/0 and ::/0 capture everything)")
        set_(self, "destinations", destinations)
        set_(self, "exclude", _prefixes(tuple(self.exclude), "exclude"))
        interfaces = tuple(dict.fromkeys(str(i) for i in self.interfaces))
        for name in interfaces:
            if not name or len(name) > MAX_IFNAME or "/" in name or name.strip() != name \
                    or any(ch.isspace() for ch in name) or name in (".", ".."):
                raise ValueError(f"interfaces: {name!r} is not a valid interface name "
                                 f"(1-{MAX_IFNAME} characters, no '/' or spaces)")
        set_(self, "interfaces", interfaces)
        set_(self, "preserve_source", bool(self.preserve_source))
        if isinstance(self.fwmark, bool) or not isinstance(self.fwmark, int) \
                or not 1 <= self.fwmark <= 0xFFFFFFFF:
            raise ValueError(f"fwmark {self.fwmark!r}: expected 1-0xffffffff")
        if isinstance(self.route_table, bool) or not isinstance(self.route_table, int) \
                or not 1 <= self.route_table <= 0xFFFFFFFF \
                or self.route_table in RESERVED_ROUTE_TABLES:
            raise ValueError(f"route_table {self.route_table!r}: expected 1-4294967295, "
                             "not one of the kernel's tables 253 (default), 254 (main), "
                             "255 (local)")
        if self.listen_address is not None:
            try:
                address = ipaddress.ip_address(str(self.listen_address).strip("[]"))
            except ValueError:
                raise ValueError(f"listen_address {self.listen_address!r}: not an IP "
                                 "address") from None
            set_(self, "listen_address", None if address.is_unspecified else str(address))

    @classmethod
    def from_options(cls, listen_port: int, *, protocols: Iterable[str] = ("tcp",),
                     ports: Iterable[Any] = (), destinations: Iterable[Any] | None = None,
                     exclude: Iterable[Any] = (), interfaces: Iterable[str] = (),
                     preserve_source: bool = False, fwmark: int = DEFAULT_FWMARK,
                     route_table: int = DEFAULT_ROUTE_TABLE,
                     listen_address: str | None = None) -> InterceptSpec:
        """Build from config-shaped values: `ports` like `[80, "8000-8099"]`,
        `destinations`/`exclude` like `["10.0.0.0/8", "fd00::/8"]` (None = everything)."""
        return cls(listen_port=listen_port, protocols=tuple(protocols),
                   port_ranges=tuple(parse_port_range(p) for p in ports),
                   destinations=(ANY_V4, ANY_V6) if destinations is None
                   else tuple(destinations),
                   exclude=tuple(exclude), interfaces=tuple(interfaces),
                   preserve_source=preserve_source, fwmark=fwmark, route_table=route_table,
                   listen_address=listen_address)

    @property
    def destinations_v4(self) -> tuple[ipaddress.IPv4Network, ...]:
        return tuple(n for n in self.destinations if isinstance(n, ipaddress.IPv4Network))

    @property
    def destinations_v6(self) -> tuple[ipaddress.IPv6Network, ...]:
        return tuple(n for n in self.destinations if isinstance(n, ipaddress.IPv6Network))

    @property
    def families(self) -> tuple[int, ...]:
        """IP versions captured (4, 6): those with a destination prefix and a listener
        (all of them unless `listen_address` names one family's address)."""
        listener = None if self.listen_address is None \
            else ipaddress.ip_address(self.listen_address).version
        return tuple(v for v in (4, 6) if any(n.version == v for n in self.destinations)
                     and listener in (None, v))

    def captures_port(self, port: int) -> bool:
        return any(lo <= port <= hi for lo, hi in self.port_ranges)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for `intercept status` and logs)."""
        return {
            "listen_port": self.listen_port,
            "listen_address": self.listen_address,
            "protocols": list(self.protocols),
            "ports": [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.port_ranges],
            "destinations": [str(n) for n in self.destinations],
            "exclude": [str(n) for n in self.exclude],
            "interfaces": list(self.interfaces),
            "preserve_source": self.preserve_source,
            "fwmark": f"{self.fwmark:#x}",
            "route_table": self.route_table,
        }

    def summary(self, most: int = LOGGED_PREFIXES) -> dict[str, Any]:
        """`to_dict` with long prefix lists cut to their first `most` entries and a count:
        100,000 prefixes would make one log line of megabytes."""
        found = self.to_dict()
        for key in ("destinations", "exclude"):
            values = found[key]
            if len(values) > most:
                found[key] = [*values[:most], f"... {len(values) - most} more"]
        return found


def _subtract(network: Network, excluded: Iterable[Network]) -> list[Network]:
    """`network` minus the excluded prefixes, as a list of prefixes."""
    remaining = [network]
    for hole in excluded:
        if hole.version != network.version:
            continue
        kept: list[Network] = []
        for part in remaining:
            if not part.overlaps(hole):
                kept.append(part)
            elif not part.subnet_of(hole):  # type: ignore[arg-type]
                kept.extend(part.address_exclude(hole))  # type: ignore[arg-type]
        remaining = kept
    return remaining


def _only_own(network: Network, own: set[Address]) -> bool:
    """True when every address of `network` is one of the gateway's own addresses."""
    # subnet_of on integers: ipaddress' own takes ~5 µs, which adds up over 100k prefixes.
    start = int(network.network_address)
    if any(network.version == lo.version and network.prefixlen >= lo.prefixlen
           and start & int(lo.netmask) == int(lo.network_address) for lo in LOOPBACK):
        return True
    if 1 << (network.max_prefixlen - network.prefixlen) > len(own):  # num_addresses, cheap
        return False
    return all(address in own for address in network)


def check_loop(spec: InterceptSpec, local_addresses: Iterable[Any]) -> list[str]:
    """Reasons to refuse `spec` because it would capture the gateway's own listener traffic
    in a loop; empty when the spec is safe. `local_addresses`: the host's (or namespace's)
    addresses, as strings (`"10.0.0.1"` or `"10.0.0.1/24"`) or ipaddress objects.

    Why the check is narrow: the ruleset returns every packet addressed to the gateway
    itself before any capture rule (`fib daddr type local return`), and the gateway's own
    upstream packets are generated locally, so they never cross the prerouting hook where
    capture happens. A broad prefix such as `0.0.0.0/0` that contains the gateway's
    addresses is therefore safe: those addresses are simply not captured.

    What is refused, precisely: a destination prefix that — after removing the `exclude`
    prefixes — contains nothing but the gateway's own addresses (its interface addresses,
    127.0.0.0/8, ::1), while the listen port is one of the captured ports. Such a spec
    asks to intercept connections to the gateway's own listener. They reach the listener
    directly (nothing is diverted), its "original destination" is the listener itself, and
    relaying to the original destination connects to the listener again: every connection
    spawns another until ports and file descriptors run out. (At run time the relay must
    also refuse such a destination: see `is_listener_destination`.)
    """
    own: set[Address] = set()
    for item in local_addresses:
        text = str(item).split("%", 1)[0]
        own.add(ipaddress.ip_interface(text).ip)
    if not spec.captures_port(spec.listen_port):
        return []
    reasons = []
    for network in spec.destinations:
        remaining = _subtract(network, spec.exclude)
        if remaining and all(_only_own(part, own) for part in remaining):
            addresses = ", ".join(str(p) for p in remaining[:4]) + \
                (", ..." if len(remaining) > 4 else "")
            reasons.append(
                f"destination {network} holds only the gateway's own addresses ({addresses}) "
                f"and port {spec.listen_port} is the listener's own port: intercepted "
                f"connections would be relayed back to the listener in a loop; remove "
                f"{network} from destinations or add it to exclude")
    return reasons


def is_listener_destination(original_destination: tuple[str, int], listen_port: int,
                            local_addresses: Iterable[Any]) -> bool:
    """True when an accepted connection's original destination is the gateway's own
    listener (a client connected to the gateway's address on the listen port directly).
    Relaying such a connection to its original destination would loop; the relay must
    answer it itself or close it."""
    host, port = original_destination[0], original_destination[1]
    if port != listen_port:
        return False
    address = ipaddress.ip_address(str(host).split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback or address.is_unspecified:
        return True
    return any(ipaddress.ip_interface(str(a).split("%", 1)[0]).ip == address
               for a in local_addresses)
