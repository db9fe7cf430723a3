"""Sockets for transparent interception: IP_TRANSPARENT listeners, the original destination
of what they receive, and the sockets that speak as someone else's address.

- A TPROXY listener needs IP_TRANSPARENT (IPv6: IPV6_TRANSPARENT) or the kernel will not
  hand it packets addressed elsewhere. For TCP the accepted socket's local address *is*
  the original destination (`original_destination`).
- A UDP listener receives datagrams for many destinations on one socket; with
  IP_RECVORIGDSTADDR each `recvmsg` carries the original destination as ancillary data
  (`recv_with_original_destination`). asyncio's datagram endpoints do not expose
  `recvmsg`: drive the socket with `loop.add_reader` and call it when readable.
- Answering a UDP client "from" the address it wrote to needs a per-flow socket bound to
  that (non-local) address with IP_TRANSPARENT + SO_REUSEADDR and connected to the client
  (`udp_reply_socket`).
- Source preservation: the upstream socket binds the client's address with IP_TRANSPARENT
  (`transparent_connect_socket`); the nftables `socket transparent 1` rule brings the
  server's replies back to it.

Python 3.11's socket module lacks most of these constants; they are defined here from
<linux/in.h> and <linux/in6.h>. Every socket returned is non-blocking.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

SOL_IP = 0
SOL_IPV6 = 41
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IP_ORIGDSTADDR = IP_RECVORIGDSTADDR  # cmsg type of the ancillary data it enables
IP_BIND_ADDRESS_NO_PORT = 24
IPV6_RECVORIGDSTADDR = 74
IPV6_ORIGDSTADDR = IPV6_RECVORIGDSTADDR
IPV6_TRANSPARENT = 75
# Default listen backlog, as in HttpServer.listen.
BACKLOG = 4096
# The largest UDP payload (65535 - 8-byte UDP header - 20-byte IPv4 header); IPv6 jumbograms
# are not a concern on veth/ethernet MTUs.
MAX_DATAGRAM = 65507
_ANCILLARY = socket.CMSG_SPACE(28)  # sockaddr_in6 is the larger of the two (28 bytes)

Address = tuple[str, int]


def family_of(host: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 literal (brackets allowed), else AF_INET."""
    text = host.strip("[]").split("%", 1)[0]
    return socket.AF_INET6 if ipaddress.ip_address(text).version == 6 else socket.AF_INET


def set_transparent(sock: socket.socket) -> None:
    """IP_TRANSPARENT / IPV6_TRANSPARENT: the socket may receive traffic for, and send from,
    addresses that are not this host's. Needs CAP_NET_ADMIN (or CAP_NET_RAW)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)


def transparent_listener(host: str, port: int, proto: str = "tcp",
                         family: socket.AddressFamily | None = None,
                         reuse_port: bool = False, backlog: int = BACKLOG) -> socket.socket:
    """A non-blocking IP_TRANSPARENT socket bound to (host, port), listening for TCP; for
    UDP also asking for each datagram's original destination. Bind the wildcard address
    (`0.0.0.0`, `::`) so `tproxy to :PORT` finds it; IPv6 sockets are IPv6-only (open one
    listener per family). `reuse_port` lets several workers share the port."""
    if proto not in ("tcp", "udp"):
        raise ValueError(f"proto {proto!r}: expected 'tcp' or 'udp'")
    family = family or family_of(host)
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        set_transparent(sock)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if proto == "udp":
                sock.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
        elif proto == "udp":
            sock.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
        sock.bind((host.strip("[]"), port))
        if proto == "tcp":
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _plain(address: tuple) -> Address:
    """(host, port) from a socket address; IPv4-mapped IPv6 addresses become IPv4."""
    host, port = address[0], address[1]
    if ":" in host:
        mapped = ipaddress.IPv6Address(host.split("%", 1)[0]).ipv4_mapped
        if mapped is not None:
            host = str(mapped)
    return host, port


def original_destination(sock: socket.socket) -> Address:
    """Where an intercepted TCP connection was going: with TPROXY the accepted socket's
    local address is the original destination (no SO_ORIGINAL_DST lookup needed)."""
    return _plain(sock.getsockname())


def parse_original_destination(ancillary: list[tuple[int, int, bytes]]) -> Address | None:
    """The original destination from `recvmsg` ancillary data (IP_ORIGDSTADDR: a
    sockaddr_in; IPV6_ORIGDSTADDR: a sockaddr_in6), or None when absent."""
    for level, kind, data in ancillary:
        if level == SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            port = struct.unpack_from("!H", data, 2)[0]
            return socket.inet_ntop(socket.AF_INET, data[4:8]), port
        if level == SOL_IPV6 and kind == IPV6_ORIGDSTADDR and len(data) >= 24:
            port = struct.unpack_from("!H", data, 2)[0]
            return _plain((socket.inet_ntop(socket.AF_INET6, data[8:24]), port))
    return None


def recv_with_original_destination(sock: socket.socket, bufsize: int = MAX_DATAGRAM
                                   ) -> tuple[bytes, Address, Address]:
    """One datagram from a transparent UDP listener: (data, client, original destination).
    A datagram sent to the listener directly (not intercepted) carries no ancillary data;
    its original destination is the listener's own address. Raises BlockingIOError when
    nothing is waiting (the socket is non-blocking)."""
    data, ancillary, _flags, client = sock.recvmsg(bufsize, _ANCILLARY)
    destination = parse_original_destination(ancillary) or _plain(sock.getsockname())
    return data, _plain(client), destination


def transparent_connect_socket(client_addr: str | tuple, family: socket.AddressFamily | None
                               = None, proto: str = "tcp") -> socket.socket:
    """An upstream socket that speaks as the client (source preservation): IP_TRANSPARENT
    and bound to the client's address with port 0, not yet connected. For TCP the port is
    chosen at connect time (IP_BIND_ADDRESS_NO_PORT), so many upstream connections from
    one client address do not exhaust ephemeral ports at bind time."""
    host = client_addr if isinstance(client_addr, str) else client_addr[0]
    host = _plain((host, 0))[0]
    family = family or family_of(host)
    sock = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    try:
        set_transparent(sock)
        if proto == "tcp":
            sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((host, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def udp_reply_socket(orig_dst: Address, client: Address) -> socket.socket:
    """A per-flow UDP socket that answers `client` from `orig_dst` (the address the client
    wrote to): IP_TRANSPARENT + SO_REUSEADDR, bound to orig_dst, connected to the client.
    While it is open the kernel also delivers that flow's next datagrams to it (a connected
    socket matches the 4-tuple better than the listener), so read from it too."""
    orig_dst, client = _plain(orig_dst), _plain(client)
    sock = socket.socket(family_of(orig_dst[0]), socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        set_transparent(sock)
        sock.bind(orig_dst)
        sock.connect(client)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
