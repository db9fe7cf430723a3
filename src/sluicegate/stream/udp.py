"""The UDP proxy: per-flow sessions, each with its own upstream socket and an idle timeout.

A flow is keyed by (client address, original destination). Its first datagram matches a
stream route (protocol ``udp``), the route's balancer picks a node once for the whole flow,
and a connected socket to that node carries the flow's datagrams; what the node sends back
goes to the client. A flow quiet in both directions for ``idle_timeout`` (default 60 s)
ends and its sockets close.

Where datagrams come from:

- ``UdpProxy.listen(host, port)``: an ordinary listener read with ``recvfrom``; the original
  destination of every datagram is the listener's address.
- ``UdpProxy.add_listener(sock, recv_hook)``: a socket the interceptor set up (IP_TRANSPARENT,
  IP_RECVORIGDSTADDR); ``recv_hook(sock) -> (data, client, original_destination)`` reads one
  datagram with ``recvmsg`` and its ancillary data (asyncio datagram endpoints cannot, so
  readiness comes from ``loop.add_reader``). The hook raises BlockingIOError when the socket
  is empty.
- ``UdpProxy.datagram_received(...)``: datagrams pushed by a caller with its own reader.

Replies leave from the listener socket by default (``sendto(client)``). With
``reply_socket_factory(original_destination, client) -> socket``, each flow gets a socket bound
to the original destination and connected to the client (IP_TRANSPARENT for TPROXY), so
replies carry the address the client sent to. The kernel then delivers that client's later
datagrams to this more specific socket, so it is read as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from sluicegate.http.balancer import UpstreamNode
from sluicegate.http.clock import CLOCK
from sluicegate.stream.connection import literal_family, resolve
from sluicegate.stream.routes import StreamContext, StreamRoute, StreamRouteTable

__all__ = [
    "DEFAULT_UDP_IDLE_TIMEOUT",
    "DEFAULT_UDP_MAX_SESSIONS",
    "RecvHook",
    "ReplySocketFactory",
    "UdpProxy",
    "UdpSession",
]

log = logging.getLogger("sluicegate.stream.udp")

Address = tuple[Any, ...]
RecvHook = Callable[[socket.socket], tuple[bytes, Address, Address]]
ReplySocketFactory = Callable[[Address, Address], socket.socket]
UdpConnectSocketFactory = Callable[[UpstreamNode, Address], "socket.socket | None"]

# nginx stream `proxy_timeout` is 10 min, but UDP flows have no end marker: conntrack's
# udp stream timeout (nf_conntrack_udp_timeout_stream) is 120 s, Envoy's UDP proxy idle
# timeout 60 s. 60 s keeps request/response protocols (DNS, RADIUS) from piling up sessions.
DEFAULT_UDP_IDLE_TIMEOUT = 60.0
# Flows held at once; a new flow beyond it is dropped (existing flows keep working), so a
# flood of spoofed sources cannot exhaust file descriptors. Two fds a flow at most.
DEFAULT_UDP_MAX_SESSIONS = 16384
# Largest UDP payload (IPv4 65507, IPv6 jumbograms aside); one recv buffer this size.
MAX_DATAGRAM = 65535
# Datagrams read per readiness event before other sockets get their turn.
RECV_BATCH = 64
# Datagrams held while a node's host name resolves; later ones are dropped.
PENDING_LIMIT = 32


class UdpSession:
    """One flow: client ↔ upstream node, plus an optional reply socket."""

    __slots__ = ("bytes_from_client", "bytes_from_upstream", "client", "closed",
                 "datagrams_dropped", "key", "last_activity", "listener", "node",
                 "original_destination", "pending", "proxy", "reply_sock", "reply_to", "route",
                 "upstream_sock")

    def __init__(self, proxy: UdpProxy, key: tuple[Address, Address], client: Address,
                 original_destination: Address, listener: socket.socket | None,
                 route: StreamRoute) -> None:
        self.proxy = proxy
        self.key = key
        self.client = client
        self.original_destination = original_destination
        self.listener = listener
        self.reply_to = client
        if listener is not None and listener.family == socket.AF_INET6 and \
                ":" not in str(client[0]):
            # A dual-stack listener and a client address given as plain IPv4 (an
            # interceptor's hook may normalise it): sendto needs the mapped form.
            self.reply_to = ("::ffff:" + str(client[0]), client[1])
        self.route = route
        self.node: UpstreamNode | None = None
        self.upstream_sock: socket.socket | None = None
        self.reply_sock: socket.socket | None = None
        self.pending: list[bytes] | None = None  # while the node's name resolves
        self.last_activity = CLOCK.now
        self.bytes_from_client = 0
        self.bytes_from_upstream = 0
        self.datagrams_dropped = 0
        self.closed = False

    def touch(self) -> None:
        now = CLOCK.now
        if self.last_activity != now:
            # Sessions stay ordered by last activity, so expiry looks at the front only.
            self.last_activity = now
            self.proxy.sessions.move_to_end(self.key)

    # -- client → upstream ---------------------------------------------------------------
    def send_upstream(self, data: bytes) -> None:
        if self.closed:
            return
        sock = self.upstream_sock
        if sock is None:
            if self.pending is not None and len(self.pending) < PENDING_LIMIT:
                self.pending.append(data)
            else:
                self.datagrams_dropped += 1
            return
        self.touch()
        self.bytes_from_client += len(data)
        try:
            sock.send(data)
        except ConnectionRefusedError:
            # An ICMP port unreachable from an earlier datagram surfaces here, and this
            # datagram was not sent: try once more.
            try:
                sock.send(data)
            except OSError:
                self.datagrams_dropped += 1
        except OSError:  # buffer full (EAGAIN), unreachable: UDP drops
            self.datagrams_dropped += 1

    def on_reply_socket_readable(self) -> None:
        sock = self.reply_sock
        for _ in range(RECV_BATCH):
            if sock is None or self.closed:
                return
            try:
                data = sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error for an earlier reply
            self.send_upstream(data)

    # -- upstream → client ---------------------------------------------------------------
    def on_upstream_readable(self) -> None:
        sock = self.upstream_sock
        for _ in range(RECV_BATCH):
            if sock is None or self.closed:
                return
            try:
                data = sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # ICMP (port unreachable) for an earlier datagram: keep the flow
            self.touch()
            self.bytes_from_upstream += len(data)
            try:
                if self.reply_sock is not None:
                    self.reply_sock.send(data)
                elif self.listener is not None:
                    self.listener.sendto(data, self.reply_to)
                else:
                    self.datagrams_dropped += 1
            except OSError:
                self.datagrams_dropped += 1

    # -- set-up and tear-down ------------------------------------------------------------
    def attach_upstream(self, sock: socket.socket) -> None:
        self.upstream_sock = sock
        self.proxy.loop.add_reader(sock.fileno(), self.on_upstream_readable)
        pending, self.pending = self.pending, None
        for data in pending or ():
            self.send_upstream(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        proxy = self.proxy
        if proxy.sessions.get(self.key) is self:
            del proxy.sessions[self.key]
        loop = proxy.loop
        for sock in (self.upstream_sock, self.reply_sock):
            if sock is None:
                continue
            if not loop.is_closed():
                loop.remove_reader(sock.fileno())
            sock.close()
        self.upstream_sock = self.reply_sock = None
        self.pending = None
        node, upstream = self.node, self.route.upstream
        if node is not None and upstream is not None:
            upstream.balancer.on_request_end(node, 0.0, False)
        if proxy.on_close is not None:
            try:
                proxy.on_close(self)
            except Exception:
                log.exception("udp on_close hook failed")


class UdpProxy:
    """UDP side of the stream proxy for one worker: listeners, live route table, flows.

    ``idle_timeout``: seconds a flow may be quiet in both directions. ``max_sessions``:
    flows at once. ``reply_socket_factory(original_destination, client)``: a socket for a
    flow's replies (bound to the original destination, connected to the client) instead of
    the listener. ``connect_socket_factory(node, client)``: an unconnected upstream socket
    (e.g. bound to the client's address for ``preserve_source``) or None for a plain one.
    ``is_own_destination(original_destination)``: True for the gateway's own address; a
    route without an upstream drops such flows instead of looping them back to us.
    ``on_close(session)`` is called once per flow when it ends.

    Expiry needs ``tick(now)`` called periodically: add it to ``CLOCK.extra``.
    """

    def __init__(self, table: StreamRouteTable, *,
                 idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT,
                 max_sessions: int = DEFAULT_UDP_MAX_SESSIONS,
                 reply_socket_factory: ReplySocketFactory | None = None,
                 connect_socket_factory: UdpConnectSocketFactory | None = None,
                 is_own_destination: Callable[[Address], bool] | None = None,
                 on_close: Callable[[UdpSession], None] | None = None) -> None:
        self.table = table
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.reply_socket_factory = reply_socket_factory
        self.connect_socket_factory = connect_socket_factory
        self.is_own_destination = is_own_destination
        self.on_close = on_close
        self.sessions: OrderedDict[tuple[Address, Address], UdpSession] = OrderedDict()
        self.listeners: list[socket.socket] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.datagrams_unrouted = 0  # no route, or no original destination to go to
        self.sessions_refused = 0  # over max_sessions, or the upstream socket failed

    def swap(self, table: StreamRouteTable) -> None:
        """Switch to a new route table; existing flows keep their route and node."""
        self.table = table

    # -- listeners -----------------------------------------------------------------------
    def listen(self, host: str, port: int, reuse_port: bool = False) -> socket.socket:
        """Receive on ``host:port`` (``::`` is dual-stack). Call with the loop running."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        self.add_listener(sock)
        return sock

    def add_listener(self, sock: socket.socket, recv_hook: RecvHook | None = None) -> None:
        """Serve a bound UDP socket. Without ``recv_hook`` it is read with ``recvfrom`` and
        the original destination is its own address. With one, the hook's original
        destination is trusted: routes without an upstream send the flow there."""
        self.loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self.listeners.append(sock)
        if recv_hook is None:
            address = sock.getsockname()
            self.loop.add_reader(sock.fileno(), self._read_plain, sock, address[:2])
        else:
            self.loop.add_reader(sock.fileno(), self._read_with_hook, sock, recv_hook)

    def _read_plain(self, sock: socket.socket, address: Address) -> None:
        for _ in range(RECV_BATCH):
            try:
                data, client = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error for a reply we sent
            self._dispatch(data, client, address, sock, False)

    def _read_with_hook(self, sock: socket.socket, recv_hook: RecvHook) -> None:
        for _ in range(RECV_BATCH):
            try:
                data, client, original_destination = recv_hook(sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            self._dispatch(data, client, original_destination, sock, True)

    def datagram_received(self, data: bytes, client: Address, original_destination: Address,
                          listener: socket.socket | None = None) -> None:
        """Entry point for a caller with its own reader (an interceptor): one datagram from
        ``client`` to ``original_destination``. Replies go out of ``listener`` unless a
        ``reply_socket_factory`` is set."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        self._dispatch(data, client, original_destination, listener, True)

    def _dispatch(self, data: bytes, client: Address, original_destination: Address,
                  listener: socket.socket | None, transparent: bool) -> None:
        key = (client, original_destination)
        session = self.sessions.get(key)
        if session is None:
            session = self._open(key, client, original_destination, listener, transparent)
            if session is None:
                return
        session.send_upstream(data)

    # -- flows ---------------------------------------------------------------------------
    def _open(self, key: tuple[Address, Address], client: Address,
              original_destination: Address, listener: socket.socket | None,
              transparent: bool) -> UdpSession | None:
        route = self.table.match(str(original_destination[0]), original_destination[1],
                                 str(client[0]), "udp")
        if route is None or (route.upstream is None and (
                not transparent or (self.is_own_destination is not None
                                    and self.is_own_destination(original_destination)))):
            self.datagrams_unrouted += 1
            return None
        if len(self.sessions) >= self.max_sessions:
            self.sessions_refused += 1
            return None
        upstream = route.upstream
        if upstream is None:
            node: UpstreamNode | None = UpstreamNode(str(original_destination[0]),
                                                     original_destination[1], 1)
        else:
            node = upstream.balancer.pick(StreamContext(client, original_destination))
            if node is None:
                self.sessions_refused += 1
                return None
        session = UdpSession(self, key, client, original_destination, listener, route)
        if self.reply_socket_factory is not None:
            try:
                reply = self.reply_socket_factory(original_destination, client)
                reply.setblocking(False)
            except OSError as exc:
                log.warning("udp reply socket for %s failed: %s", original_destination, exc)
                self.sessions_refused += 1
                return None
            session.reply_sock = reply
            self.loop.add_reader(reply.fileno(), session.on_reply_socket_readable)
        self.sessions[key] = session
        session.node = node
        if upstream is not None:
            upstream.balancer.on_request_start(node)
        family = literal_family(node.host)
        if family:
            sock = self._connect(node, family, (node.host, node.port), client)
            if sock is None:
                session.close()
                return None
            session.attach_upstream(sock)
        else:
            session.pending = []
            task = self.loop.create_task(self._resolve_then_attach(session, node))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return session

    def _connect(self, node: UpstreamNode, family: int, sockaddr: Address,
                 client: Address) -> socket.socket | None:
        factory = self.connect_socket_factory
        sock = None
        try:
            sock = factory(node, client) if factory is not None else None
            if sock is None:
                sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(sockaddr)
        except OSError as exc:
            log.info("udp upstream %s unusable: %s", node.address, exc)
            if sock is not None:
                sock.close()
            self.sessions_refused += 1
            return None
        return sock

    async def _resolve_then_attach(self, session: UdpSession, node: UpstreamNode) -> None:
        try:
            family, sockaddr = await resolve(self.loop, node.host, node.port,
                                              socket.SOCK_DGRAM)
        except OSError as exc:
            log.info("udp upstream %s does not resolve: %s", node.address, exc)
            session.close()
            return
        if session.closed:
            return
        sock = self._connect(node, family, sockaddr, session.client)
        if sock is None:
            session.close()
            return
        session.attach_upstream(sock)

    # -- expiry and shutdown -------------------------------------------------------------
    def tick(self, now: float) -> None:
        """End flows quiet for longer than ``idle_timeout``."""
        sessions = self.sessions
        timeout = self.idle_timeout
        while sessions:
            session = next(iter(sessions.values()))
            if now - session.last_activity <= timeout:
                break  # ordered by last activity: the rest are newer
            session.close()

    def close(self) -> None:
        """Stop receiving and end every flow."""
        for task in list(self.tasks):
            task.cancel()
        for session in list(self.sessions.values()):
            session.close()
        loop = self.loop
        for sock in self.listeners:
            if loop is not None and not loop.is_closed():
                loop.remove_reader(sock.fileno())
            with contextlib.suppress(OSError):
                sock.close()
        self.listeners.clear()
