"""The TCP relay's server: accept, match a stream route, hand the connection to a copy path.

A connection enters from a listener (`StreamServer.listen` / `add_listener`) or from an
interceptor that hands over an accepted socket and its original destination
(`StreamServer.accept_socket`). Each one is matched against the `StreamRouteTable` and
becomes a `StreamConnection` (stream/connection.py: connect phase, next node on failure,
RST when none is left) of the copy path in use, one flag (`StreamServer(splice=...)`,
splice by default where `os.splice` exists; `copy=` for the sockmap path), the same tests
on each: stream/copy_relay.py (user space, the reference), stream/splice_relay.py,
stream/sockmap_relay.py.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

from sluicegate.http.balancer import UpstreamNode
from sluicegate.stream.connection import StreamConnection, reset_socket
from sluicegate.stream.copy_relay import CopyConnection
from sluicegate.stream.routes import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    StreamRouteTable,
)
from sluicegate.stream.splice_relay import SpliceConnection, splice_available

__all__ = [
    "ConnectSocketFactory",
    "CopyConnection",
    "SpliceConnection",
    "StreamConnection",
    "StreamServer",
    "reset_socket",
    "splice_available",
]

log = logging.getLogger("sluicegate.stream")

ConnectSocketFactory = Callable[[UpstreamNode, tuple[str, int]], "socket.socket | None"]

# Same backlog as the L7 listeners (HttpServer.listen).
LISTEN_BACKLOG = 4096
# Connections accepted per readiness event before yielding to the loop; asyncio's own
# accept loop takes up to `backlog` at once, which can starve relays under a SYN burst.
ACCEPT_BATCH = 64
# After EMFILE/ENFILE, stop accepting this long (asyncio's selector loop does the same).
ACCEPT_PAUSE_SECONDS = 1.0
# How often idle and stalled relays are looked for: stream timeouts are minutes (nginx
# proxy_timeout 10 min), so a full scan per second is plenty and costs nothing per byte.
SWEEP_SECONDS = 1.0


class StreamServer:
    """TCP stream proxy of one worker: listeners, live route table, open connections.

    ``copy`` (``auto``, ``sockmap``, ``splice``, ``userspace``; stream/sockmap_relay.py)
    selects the copy path and overrides ``splice``. ``splice`` selects between the two
    user-space-driven paths (see the module docs); None (the default) takes the
    splice path where ``os.splice`` exists: it moves the same bytes for ~40% less relay CPU
    (bench/stream_copy.py: 0.21-0.23 vs 0.36-0.42 CPU s per GiB). ``connect_socket_factory(node,
    client_address)`` may return an unconnected socket for the upstream connection (e.g.
    IP_TRANSPARENT and bound to the client's address for ``preserve_source``) or None for
    a plain one. ``connect_timeout`` and ``idle_timeout`` apply to routes without an
    upstream (original destination). ``is_own_destination(original_destination)`` returns
    True for an address that is the gateway itself (e.g. a client connecting straight to a
    transparent listener): routes without an upstream refuse such connections instead of
    relaying them back to the gateway in a loop. ``on_close(connection)`` is called once per
    connection when it ends (access log, metrics).

    Timeouts need ``tick(now)`` called periodically: add it to ``CLOCK.extra``.
    """

    def __init__(self, table: StreamRouteTable, *, splice: bool | None = None,
                 copy: str | None = None,
                 connect_socket_factory: ConnectSocketFactory | None = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 is_own_destination: Callable[[tuple[str, int]], bool] | None = None,
                 on_close: Callable[[StreamConnection], None] | None = None) -> None:
        if splice is None:
            splice = splice_available()
        elif splice and not splice_available():
            raise RuntimeError("the splice path needs os.splice (Linux, Python 3.10+)")
        self.table = table
        self.splice = splice
        self.connection_class: type[StreamConnection] = (
            SpliceConnection if splice else CopyConnection)
        # `copy` (auto | sockmap | splice | userspace) overrides `splice`; the path really
        # used (after falling back when sockmap can't load) is `copy_path`.
        self.copy_path = "splice" if splice else "userspace"
        if copy is not None:
            from sluicegate.stream.sockmap_relay import connection_class_for

            self.copy_path, self.connection_class = connection_class_for(copy)
            self.splice = self.copy_path != "userspace"
        self.connect_socket_factory = connect_socket_factory
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.is_own_destination = is_own_destination
        self.on_close = on_close
        self.connections: set[StreamConnection] = set()
        self.listeners: list[socket.socket] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.draining = False
        self.accepted = 0
        self.refused = 0  # no route, or no original destination for a route that needs it
        self.connect_failures = 0
        self.bytes_from_clients = 0
        self.bytes_from_upstreams = 0
        self._last_sweep = 0.0
        self._drained: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def swap(self, table: StreamRouteTable) -> None:
        """Switch to a new route table; open connections keep the route they matched."""
        self.table = table

    # -- listeners -----------------------------------------------------------------------
    def listen(self, host: str, port: int, reuse_port: bool = False) -> socket.socket:
        """Listen on ``host:port`` (``::`` is dual-stack). Call with the loop running.
        Returns the listening socket (its ``getsockname()`` tells a port chosen by 0)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            sock.listen(LISTEN_BACKLOG)
        except BaseException:
            sock.close()
            raise
        self.add_listener(sock)
        return sock

    def add_listener(self, sock: socket.socket, transparent: bool = False) -> None:
        """Serve a bound, listening socket. ``transparent``: it is an IP_TRANSPARENT
        (TPROXY) listener, so an accepted socket's ``getsockname()`` is the original
        destination; routes without an upstream then connect there."""
        loop = self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self.listeners.append(sock)
        loop.add_reader(sock.fileno(), self._accept, sock, transparent)

    def accept_socket(self, sock: socket.socket,
                      original_destination: tuple[str, int] | None = None) -> None:
        """Entry point for interceptors: an accepted TCP socket and where it was going
        (None: an ordinary connection, its local address is the server address)."""
        self._loop = asyncio.get_running_loop()
        try:
            peer = sock.getpeername()
        except OSError:  # already reset by the client
            sock.close()
            return
        self._start(sock, peer, original_destination)

    def _accept(self, listener: socket.socket, transparent: bool) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("stream accept failed (%s): pausing accepts for %.0fs", exc,
                                ACCEPT_PAUSE_SECONDS)
                    self._pause_accepting(listener, transparent)
                    return
                raise
            if self.draining:
                reset_socket(sock)
                continue
            original = None
            if transparent:
                try:
                    original = sock.getsockname()[:2]
                except OSError:
                    sock.close()
                    continue
            self._start(sock, peer, original)

    def _pause_accepting(self, listener: socket.socket, transparent: bool) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(listener.fileno())

        def resume() -> None:
            if listener in self.listeners and not self.draining:
                loop.add_reader(listener.fileno(), self._accept, listener, transparent)

        loop.call_later(ACCEPT_PAUSE_SECONDS, resume)

    def _start(self, sock: socket.socket, peer: Any,
               original_destination: tuple[str, int] | None) -> None:
        self.accepted += 1
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server_address = original_destination or sock.getsockname()[:2]
        except OSError:
            sock.close()
            return
        client_address = (peer[0], peer[1])
        route = self.table.match(server_address[0], server_address[1], client_address[0],
                                 "tcp")
        if route is None or (route.upstream is None and (
                original_destination is None or (
                    self.is_own_destination is not None
                    and self.is_own_destination(original_destination)))):
            # No route, or "original destination" when that is ourselves (an ordinary
            # listener, or the gateway's own address): refuse as a closed port would.
            self.refused += 1
            reset_socket(sock)
            return
        connection = self.connection_class(self, sock, client_address,
                                           (server_address[0], server_address[1]),
                                           original_destination, route)
        self.connections.add(connection)
        task = asyncio.get_running_loop().create_task(connection.run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- timeouts and shutdown -----------------------------------------------------------
    def tick(self, now: float) -> None:
        """Close idle and stalled connections (checked every SWEEP_SECONDS)."""
        if now - self._last_sweep < SWEEP_SECONDS:
            return
        self._last_sweep = now
        for connection in list(self.connections):
            connection.check_timeouts(now)

    def connection_closed(self) -> None:
        if self.draining and not self.connections and self._drained is not None:
            self._drained.set()

    def close_listeners(self) -> None:
        loop = self._loop
        for sock in self.listeners:
            if loop is not None and not loop.is_closed():
                loop.remove_reader(sock.fileno())
            sock.close()
        self.listeners.clear()

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, let open connections finish for up to ``timeout`` seconds, then
        reset the rest. Returns True when all finished in time."""
        self.draining = True
        self.close_listeners()
        clean = True
        if self.connections:
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), timeout)
            except TimeoutError:
                clean = False
        self.close()
        return clean

    def close(self) -> None:
        """Stop accepting and reset every connection now."""
        self.draining = True
        self.close_listeners()
        for task in list(self.tasks):
            task.cancel()
        for connection in list(self.connections):
            connection.abort()
