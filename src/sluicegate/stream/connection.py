"""One relayed TCP connection, the part every copy path shares: route, connect phase, timeouts.

Its upstream's balancer picks a node; a failed or timed-out connect moves on to the next
node, and when none is left the client gets a RST at once (SO_LINGER 0), not a hang. Once
both sockets are connected, the copy path's subclass takes over in `start_relay`:
stream/copy_relay.py (user space), stream/splice_relay.py (os.splice),
stream/sockmap_relay.py (in the kernel). Also here: the socket helpers they all use.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from sluicegate.http.balancer import UpstreamNode
from sluicegate.http.clock import CLOCK
from sluicegate.stream.routes import StreamContext, StreamRoute, StreamUpstream

if TYPE_CHECKING:
    from sluicegate.stream.tcp import StreamServer

__all__ = ["StreamConnection", "describe_error", "literal_family", "reset_socket",
           "reset_transport", "resolve"]

log = logging.getLogger("sluicegate.stream")

_RST_LINGER = struct.pack("ii", 1, 0)


def reset_socket(sock: Any) -> None:
    """Close with RST instead of FIN (SO_LINGER on, 0 s): the peer learns at once that the
    connection is gone, as it would from a refused connect."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    with contextlib.suppress(OSError):
        sock.close()


def reset_transport(transport: asyncio.BaseTransport | None) -> None:
    """RST and close now, also a transport already closing: one stuck flushing its buffer
    to a peer that stopped reading is exactly what a timeout must end."""
    if transport is None:
        return
    with contextlib.suppress(OSError, RuntimeError):
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    with contextlib.suppress(RuntimeError):
        transport.abort()  # type: ignore[attr-defined]


@lru_cache(maxsize=4096)
def literal_family(host: str) -> int:
    """AF_INET / AF_INET6 for an IP literal, 0 for a name that needs resolving."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return 0


async def resolve(loop: asyncio.AbstractEventLoop, host: str, port: int,
                   kind: int) -> tuple[int, tuple[Any, ...]]:
    family = literal_family(host)
    if family:
        return family, (host, port)
    infos = await loop.getaddrinfo(host, port, type=kind)
    if not infos:
        raise OSError(errno.EHOSTUNREACH, f"{host} has no address")
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


class StreamConnection:
    """One client connection: route, connect phase, and the state both copy paths share.

    ``bytes_from_client`` / ``bytes_from_upstream`` count relayed bytes; ``node`` is the
    upstream node in use (None while connecting).
    """

    __slots__ = ("bytes_from_client", "bytes_from_upstream", "client_address", "client_sock",
                 "connect_seconds", "finished", "last_activity", "node", "original_destination",
                 "route", "server", "server_address", "upstream_address")

    def __init__(self, server: StreamServer, client_sock: socket.socket,
                 client_address: tuple[str, int], server_address: tuple[str, int],
                 original_destination: tuple[str, int] | None, route: StreamRoute) -> None:
        self.server = server
        self.client_sock: socket.socket | None = client_sock
        self.client_address = client_address
        self.server_address = server_address
        self.original_destination = original_destination
        self.route = route
        self.node: UpstreamNode | None = None
        self.upstream_address: tuple[str, int] | None = None
        self.connect_seconds = 0.0
        self.bytes_from_client = 0
        self.bytes_from_upstream = 0
        self.last_activity = CLOCK.now
        self.finished = False

    # -- connect phase -------------------------------------------------------------------
    async def run(self) -> None:
        """Connect to a node (trying the next on failure), then start relaying."""
        client = self.client_sock
        try:
            upstream_sock = await self._connect_upstream()
        except asyncio.CancelledError:
            self._abandon()
            raise
        except Exception:
            log.exception("stream connect failed unexpectedly")
            upstream_sock = None
        if upstream_sock is None:
            self.server.connect_failures += 1
            self._abandon()
            return
        if client is None or self.finished:  # closed by drain meanwhile
            reset_socket(upstream_sock)
            return
        self.last_activity = CLOCK.now
        try:
            await self.start_relay(client, upstream_sock)
        except asyncio.CancelledError:
            self.abort()
            raise
        except OSError as exc:
            log.info("stream relay for %s could not start: %s", self.client_address, exc)
            self.abort()

    async def _connect_upstream(self) -> socket.socket | None:
        upstream = self.route.upstream
        loop = asyncio.get_running_loop()
        if upstream is None:
            assert self.original_destination is not None
            host, port = self.original_destination[:2]
            node = UpstreamNode(host, port, 1)
            try:
                return await self._connect_node(loop, node, self.server.connect_timeout)
            except (OSError, TimeoutError) as exc:
                log.info("stream connect to original destination %s failed: %s",
                         node.address, describe_error(exc))
                return None
        ctx = StreamContext(self.client_address, self.server_address)
        balancer = upstream.balancer
        excluded: set[UpstreamNode] | None = None
        for _ in range(upstream.attempts):
            node = balancer.pick(ctx, excluded)
            if node is None:
                break
            started = loop.time()
            balancer.on_request_start(node)
            try:
                sock = await self._connect_node(loop, node, upstream.connect_timeout)
            except (OSError, TimeoutError) as exc:
                balancer.on_request_end(node, loop.time() - started, True)
                log.info("stream connect to %s failed: %s", node.address, describe_error(exc))
                if excluded is None:
                    excluded = set()
                excluded.add(node)
                continue
            except BaseException:
                balancer.on_request_end(node, loop.time() - started, True)
                raise
            self.node = node
            self.connect_seconds = loop.time() - started
            return sock
        log.warning("stream route %s: no upstream node reachable for %s", self.route.id,
                    self.client_address[0])
        return None

    async def _connect_node(self, loop: asyncio.AbstractEventLoop, node: UpstreamNode,
                            timeout: float) -> socket.socket:
        family, sockaddr = await resolve(loop, node.host, node.port, socket.SOCK_STREAM)
        factory = self.server.connect_socket_factory
        sock = factory(node, self.client_address) if factory is not None else None
        if sock is None:
            sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(loop.sock_connect(sock, sockaddr), timeout)
        except BaseException:
            sock.close()
            raise
        self.upstream_address = (sockaddr[0], sockaddr[1])
        return sock

    def _abandon(self) -> None:
        """No relay will start: reset the client and forget the connection."""
        client = self.client_sock
        self.client_sock = None
        if client is not None:
            reset_socket(client)
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        server = self.server
        server.connections.discard(self)
        server.bytes_from_clients += self.bytes_from_client
        server.bytes_from_upstreams += self.bytes_from_upstream
        node = self.node
        upstream = self.route.upstream
        if node is not None and upstream is not None:
            # The connect time is the latency sample (ewma); the end frees a least_conn slot.
            upstream.balancer.on_request_end(node, self.connect_seconds, False)
        if server.on_close is not None:
            try:
                server.on_close(self)
            except Exception:
                log.exception("stream on_close hook failed")
        server.connection_closed()

    # -- what each copy path implements --------------------------------------------------
    async def start_relay(self, client: socket.socket, upstream: socket.socket) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Reset both sides now."""
        client = self.client_sock
        self.client_sock = None
        if client is not None:
            reset_socket(client)
        self._finish()

    def check_timeouts(self, now: float) -> None:
        return None

    def _timeouts(self) -> tuple[float, float]:
        upstream: StreamUpstream | None = self.route.upstream
        if upstream is None:
            return self.server.idle_timeout, self.server.idle_timeout
        return upstream.idle_timeout, upstream.send_timeout



def describe_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "connect timed out"
    return str(exc) or type(exc).__name__

