"""The TCP relay: accept, match a stream route, connect upstream, copy bytes both ways.

A connection enters from a listener (`StreamServer.listen` / `add_listener`) or from an
interceptor that hands over an accepted socket and its original destination
(`StreamServer.accept_socket`). Each one is matched against the `StreamRouteTable`; its
upstream's balancer picks a node, a failed or timed-out connect moves on to the next node,
and when none is left the client gets a RST at once (SO_LINGER 0), not a hang.

Two copy paths, one flag (`StreamServer(splice=...)`, splice by default where `os.splice`
exists), the same tests on both:

- **copy** (reference): both sockets become uvloop transports; each `data_received` chunk
  is written to the other transport. A transport whose write buffer passes the high-water
  mark pauses reading on the other side (backpressure).
- **splice** (fast path): bytes go socket → pipe → socket with `os.splice` and never enter
  Python; readiness comes from `loop.add_reader` / `add_writer`. A direction reads only
  when its pipe is empty, so a slow receiver stops the reads (backpressure) and each
  connection holds at most two pipes' worth of bytes. bench/stream_copy.py (1 GiB over
  loopback): the same Gbit/s as the copy path where the peers are the limit, for ~40% less
  relay CPU (0.21-0.24 vs 0.36-0.42 CPU seconds per GiB).

Both are half-close aware: EOF from one side becomes `shutdown(SHUT_WR)` towards the other,
and the connection ends when both directions have ended. An error on either side (reset,
broken pipe) or a timeout resets both.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from sluicegate.http.balancer import UpstreamNode
from sluicegate.http.clock import CLOCK
from sluicegate.stream.routes import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    StreamContext,
    StreamRoute,
    StreamRouteTable,
    StreamUpstream,
)

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
# Copy path: write buffer high-water mark per transport. bench/stream_copy.py (1 GiB over
# loopback, 3 runs each): 64 KiB (uvloop's default), 256 KiB and 1 MiB all cost 0.3-0.45
# relay CPU s/GiB, no difference above the noise; 256 KiB bounds what a connection holds.
COPY_WRITE_BUFFER_HIGH = 256 * 1024
# Splice path: pipe capacity per direction (F_SETPIPE_SZ; 1 MiB is fs.pipe-max-size's
# default, the most an unprivileged process may ask for). bench/stream_copy.py, relay CPU
# per GiB: 64 KiB pipe 0.45-0.58 s, 256 KiB 0.27-0.31 s, 1 MiB 0.21-0.24 s. Looping on
# the socket until EAGAIN instead of one splice per readiness event measured the same.
SPLICE_PIPE_BYTES = 1024 * 1024
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ is Python 3.10+, but not on every build
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
# How often idle and stalled relays are looked for: stream timeouts are minutes (nginx
# proxy_timeout 10 min), so a full scan per second is plenty and costs nothing per byte.
SWEEP_SECONDS = 1.0

_RST_LINGER = struct.pack("ii", 1, 0)


def splice_available() -> bool:
    """True when this Python and kernel have ``os.splice`` (Linux, Python 3.10+)."""
    return hasattr(os, "splice")


def reset_socket(sock: Any) -> None:
    """Close with RST instead of FIN (SO_LINGER on, 0 s): the peer learns at once that the
    connection is gone, as it would from a refused connect."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    with contextlib.suppress(OSError):
        sock.close()


def _reset_transport(transport: asyncio.BaseTransport | None) -> None:
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
def _literal_family(host: str) -> int:
    """AF_INET / AF_INET6 for an IP literal, 0 for a name that needs resolving."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return 0


async def _resolve(loop: asyncio.AbstractEventLoop, host: str, port: int,
                   kind: int) -> tuple[int, tuple[Any, ...]]:
    family = _literal_family(host)
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
                         node.address, _describe(exc))
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
                log.info("stream connect to %s failed: %s", node.address, _describe(exc))
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
        family, sockaddr = await _resolve(loop, node.host, node.port, socket.SOCK_STREAM)
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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "connect timed out"
    return str(exc) or type(exc).__name__


# -- copy path ------------------------------------------------------------------------------


class _Side(asyncio.Protocol):
    """One socket of a copy relay; writes what it reads to its peer's transport."""

    __slots__ = ("connection", "early", "eof", "is_client", "lost", "peer", "stalled_since",
                 "transport")

    def __init__(self, connection: CopyConnection, is_client: bool) -> None:
        self.connection = connection
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.early: list[bytes] = []
        self.eof = False
        self.lost = False
        self.stalled_since = 0.0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=COPY_WRITE_BUFFER_HIGH)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            # uvloop starts reading as soon as the transport exists, before the other side
            # is wrapped: hold the first chunk and wait.
            self.early.append(data)
            self.transport.pause_reading()  # type: ignore[union-attr]
            return
        peer.transport.write(data)  # type: ignore[union-attr]
        connection = self.connection
        if self.is_client:
            connection.bytes_from_client += len(data)
        else:
            connection.bytes_from_upstream += len(data)
        connection.last_activity = CLOCK.now

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None:
            self.connection.side_eof(self)
        return True  # keep our write half open: the other direction may still flow

    def pause_writing(self) -> None:
        # Our write buffer is full of the peer's bytes: stop reading the peer.
        self.stalled_since = CLOCK.now
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.stalled_since = 0.0
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.connection.side_lost(self, exc)


def _reset_side(side: _Side) -> None:
    if not side.lost:
        _reset_transport(side.transport)


class CopyConnection(StreamConnection):
    """The reference path: two uvloop transports writing to each other."""

    __slots__ = ("client", "upstream")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.client: _Side | None = None
        self.upstream: _Side | None = None

    async def start_relay(self, client_sock: socket.socket, upstream_sock: socket.socket
                          ) -> None:
        loop = asyncio.get_running_loop()
        client = self.client = _Side(self, True)
        upstream = self.upstream = _Side(self, False)
        try:
            await loop.connect_accepted_socket(lambda: upstream, upstream_sock)
        except BaseException:
            reset_socket(upstream_sock)
            raise
        self.client_sock = None  # the transport owns it from here
        try:
            await loop.connect_accepted_socket(lambda: client, client_sock)
        except BaseException:
            reset_socket(client_sock)
            raise
        if self.finished:  # aborted while wrapping
            _reset_side(client)
            _reset_side(upstream)
            return
        client.peer = upstream
        upstream.peer = client
        for side in (client, upstream):
            if side.lost:
                self.side_lost(side, ConnectionResetError("closed before the relay started"))
                return
        for side in (client, upstream):
            if side.early:
                early, side.early = side.early, []
                for data in early:
                    side.data_received(data)
                if not side.peer.stalled_since:  # type: ignore[union-attr]
                    side.transport.resume_reading()  # type: ignore[union-attr]
        for side in (client, upstream):
            if side.eof and not side.lost:
                self.side_eof(side)

    def side_eof(self, side: _Side) -> None:
        peer = side.peer
        assert peer is not None
        if peer.lost or peer.transport is None or peer.transport.is_closing():
            return
        if peer.eof:
            # Both directions ended: close both (close() still flushes what is buffered).
            side.transport.close()  # type: ignore[union-attr]
            peer.transport.close()
        else:
            peer.transport.write_eof()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        peer = side.peer or (self.upstream if side is self.client else self.client)
        if peer is not None and not peer.lost and peer.transport is not None:
            if exc is not None or not (side.eof and peer.eof):
                # The stream did not end cleanly: make the other side see it (RST).
                _reset_side(peer)
            else:
                peer.transport.close()
        if (self.client is None or self.client.lost or self.client.transport is None) and \
                (self.upstream is None or self.upstream.lost or self.upstream.transport is None):
            self._finish()

    def abort(self) -> None:
        client, upstream = self.client, self.upstream
        if client is None or client.transport is None:
            super().abort()  # not wrapped yet: the raw socket
            if upstream is not None:
                _reset_side(upstream)
            return
        _reset_side(client)
        if upstream is not None:
            _reset_side(upstream)

    def check_timeouts(self, now: float) -> None:
        idle, send = self._timeouts()
        client, upstream = self.client, self.upstream
        stalled = [s.stalled_since for s in (client, upstream) if s is not None and
                   s.stalled_since]
        if now - self.last_activity > idle or (stalled and now - min(stalled) > send):
            log.info("stream connection from %s timed out", self.client_address[0])
            self.abort()


# -- splice path ----------------------------------------------------------------------------


class _SpliceDirection:
    """One direction of a splice relay: src socket → pipe → dst socket."""

    __slots__ = ("connection", "done", "dst", "dst_sock", "eof", "loop", "moved", "pending",
                 "pipe_r", "pipe_w", "reading", "src", "stalled_since", "writing")

    def __init__(self, connection: SpliceConnection, loop: asyncio.AbstractEventLoop,
                 src: socket.socket, dst: socket.socket) -> None:
        self.connection = connection
        self.loop = loop
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.dst_sock = dst
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe still works, just slower
            fcntl.fcntl(self.pipe_w, F_SETPIPE_SZ, SPLICE_PIPE_BYTES)
        self.pending = 0  # bytes in the pipe
        self.moved = 0
        self.eof = False
        self.done = False
        self.reading = False
        self.writing = False
        self.stalled_since = 0.0

    def start(self) -> None:
        self.loop.add_reader(self.src, self.on_readable)
        self.reading = True

    def on_readable(self) -> None:
        # Called only while the pipe is empty, so a short splice means a short socket queue
        # and 0 means EOF (never "pipe full").
        try:
            n = os.splice(self.src, self.pipe_w, SPLICE_PIPE_BYTES, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.connection.fail(exc)
            return
        self.connection.last_activity = CLOCK.now
        if n == 0:
            self.eof = True
        else:
            self.pending = n
            self.moved += n
        self.flush()

    def flush(self) -> None:
        pending = self.pending
        while pending:
            try:
                n = os.splice(self.pipe_r, self.dst, pending, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                self.pending = pending
                if self.reading:
                    self.loop.remove_reader(self.src)
                    self.reading = False
                if not self.writing:
                    self.loop.add_writer(self.dst, self.flush)
                    self.writing = True
                    self.stalled_since = CLOCK.now
                return
            except OSError as exc:
                self.pending = pending
                self.connection.fail(exc)
                return
            pending -= n
        self.pending = 0
        if self.writing:
            self.loop.remove_writer(self.dst)
            self.writing = False
            self.stalled_since = 0.0
            self.connection.last_activity = CLOCK.now
        if self.eof:
            if self.reading:
                self.loop.remove_reader(self.src)
                self.reading = False
            with contextlib.suppress(OSError):
                self.dst_sock.shutdown(socket.SHUT_WR)
            self.done = True
            self.connection.direction_done()
        elif not self.reading:
            self.loop.add_reader(self.src, self.on_readable)
            self.reading = True

    def stop(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src)
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.dst)
            self.writing = False
        for fd in (self.pipe_r, self.pipe_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pipe_r = self.pipe_w = -1


class SpliceConnection(StreamConnection):
    """The fast path: ``os.splice`` through a pipe per direction, bytes stay in the kernel."""

    __slots__ = ("down", "up", "upstream_sock")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.up: _SpliceDirection | None = None
        self.down: _SpliceDirection | None = None
        self.upstream_sock: socket.socket | None = None

    async def start_relay(self, client_sock: socket.socket, upstream_sock: socket.socket
                          ) -> None:
        loop = asyncio.get_running_loop()
        self.upstream_sock = upstream_sock
        try:
            self.up = _SpliceDirection(self, loop, client_sock, upstream_sock)
            self.down = _SpliceDirection(self, loop, upstream_sock, client_sock)
        except OSError:  # out of fds for pipes
            self.fail(None)
            raise
        self.up.start()
        self.down.start()

    def direction_done(self) -> None:
        up, down = self.up, self.down
        if up is not None and down is not None and up.done and down.done:
            self._close(reset=False)

    def fail(self, exc: OSError | None) -> None:
        if exc is not None and exc.errno not in (errno.ECONNRESET, errno.EPIPE):
            log.info("stream relay for %s failed: %s", self.client_address[0], exc)
        self._close(reset=True)

    def abort(self) -> None:
        self._close(reset=True)

    def _close(self, reset: bool) -> None:
        if self.finished:
            return
        for direction in (self.up, self.down):
            if direction is not None:
                direction.stop()
        if self.up is not None:
            self.bytes_from_client = self.up.moved
        if self.down is not None:
            self.bytes_from_upstream = self.down.moved
        for sock in (self.client_sock, self.upstream_sock):
            if sock is None:
                continue
            if reset:
                reset_socket(sock)
            else:
                sock.close()
        self.client_sock = self.upstream_sock = None
        self._finish()

    def check_timeouts(self, now: float) -> None:
        idle, send = self._timeouts()
        stalled = [d.stalled_since for d in (self.up, self.down) if d is not None and
                   d.stalled_since]
        if now - self.last_activity > idle or (stalled and now - min(stalled) > send):
            log.info("stream connection from %s timed out", self.client_address[0])
            self.abort()


# -- the server -----------------------------------------------------------------------------


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
