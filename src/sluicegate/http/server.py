"""The client side of the L7 data plane: an asyncio Protocol per connection (uvloop +
httptools), request parsing with our limits, pipelining, keep-alive, and the listener set.

A connection enters here from a normal listener, or from an interceptor that hands over an
accepted socket and its original destination (`HttpServer.accept_socket`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections import deque
from typing import Any
from urllib.parse import unquote

import httptools

from sluicegate.http.clock import CLOCK, TICK_SECONDS
from sluicegate.http.context import RequestContext
from sluicegate.http.exchange import Exchange
from sluicegate.http.snapshot import Snapshot
from sluicegate.http.upstream import UpstreamPool
from sluicegate.proto.http1 import (
    MAX_HEAD_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADER_COUNT,
    MAX_REQUEST_LINE,
    REQUEST_SPECIAL,
    RequestRejected,
    check_request_framing,
    error_body,
    status_line,
)

log = logging.getLogger("sluicegate.http")

CLOSE_HEADER = b"Connection: close\r\n"
# How long a connection closed after an error keeps draining what the client still sends
# (nginx lingering_timeout is 5 s; lingering_time 30 s).
LINGER_SECONDS = 2.0
KEEP_ALIVE_HEADER = b"Connection: keep-alive\r\n"
CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade", b""})
# Methods whose request may be sent again to another node (RFC 9110 §9.2.2).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests, queues pipelined ones, writes responses."""

    PAUSE_PIPELINE = 1
    PAUSE_BODY = 2
    PAUSE_UPSTREAM = 4
    # What the listener speaks; HttpsClientConnection (http/https.py) overrides these, so
    # plain HTTP pays nothing for TLS.
    scheme = "http"
    forwarded_proto = b"http"
    context_class = RequestContext

    __slots__ = (
        "closing",
        "connection_value",
        "content_length",
        "deferred",
        "feeding",
        "forwarded_base",
        "head_bytes",
        "head_size",
        "head_started",
        "header_count",
        "headers",
        "host",
        "host_count",
        "intercept_mode",
        "last_activity",
        "lingering",
        "original_destination",
        "out",
        "parser",
        "parsing",
        "paused",
        "peer",
        "pending_error",
        "prior_xff",
        "queue",
        "scope",
        "server",
        "sockname",
        "te_chunked",
        "te_value",
        "transport",
        "tunnel",
        "upgrade_value",
        "url",
    )

    def __init__(self, server: HttpServer,
                 original_destination: tuple[str, int] | None = None,
                 scope: str | None = None, intercept_mode: str | None = None) -> None:
        self.server = server
        self.original_destination = original_destination
        # Intercepted traffic: the interception entry it came through, and how.
        self.scope = scope
        self.intercept_mode = intercept_mode
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.parsing: Exchange | None = None
        self.out: list[bytes] = []
        self.paused = 0
        self.closing = False
        self.pending_error: tuple[int, str] | None = None
        self.tunnel: Exchange | None = None
        self.last_activity = CLOCK.now
        self.head_started = CLOCK.now  # a connection starts in a request head
        self.head_bytes = 0
        self.feeding = False
        self.lingering = False
        self.deferred: Exchange | None = None
        self._reset_head()

    def _reset_head(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.header_count = 0
        self.host = b""
        self.host_count = 0
        self.te_chunked = False
        self.te_value = b""
        self.upgrade_value: bytes | None = None
        self.prior_xff: bytes | None = None
        self.connection_value: bytes | None = None
        self.content_length: bytes | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer = (peer[0], peer[1]) if isinstance(peer, tuple) else ("unix", 0)
        sockname = transport.get_extra_info("sockname") or ("", 0)
        self.sockname = (sockname[0], sockname[1]) if isinstance(sockname, tuple) else ("", 0)
        if self.intercept_mode in ("tproxy", "ebpf") and self.original_destination is None:
            # A transparent socket's local address is where the client was connecting to.
            self.original_destination = self.sockname
        ip = self.peer[0].encode()
        self.forwarded_base = b"X-Real-IP: %s\r\nX-Forwarded-Proto: %s\r\n" % (
            ip, self.forwarded_proto)
        self.server.connections.add(self)
        if self.server.draining:
            self.closing = True

    def data_received(self, data: bytes) -> None:
        self.last_activity = CLOCK.now
        if self.lingering:
            return
        if self.tunnel is not None:
            self.tunnel.tunnel_from_client(data)
            return
        if self.pending_error is not None or (self.closing and not self.queue):
            return
        # While parsing, upstream writes are deferred to the end of this read: bytes that
        # turn out to be malformed later in the same read never reach the upstream.
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.feeding = False
            self._after_upgrade_request(data[upgrade.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            self.feeding = False
            cause = exc.__context__
            if isinstance(cause, RequestRejected):
                self.reject(cause.status, cause.reason)
            else:
                log.error("request handling failed", exc_info=cause)
                self.reject(500, "internal error")
            return
        except httptools.HttpParserError as exc:
            self.feeding = False
            self.reject(400, str(exc))
            return
        self.feeding = False
        if self.head_started:
            # httptools holds an unfinished header line without calling back: count here.
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self.reject(431, "request headers too large")
                return
        deferred = self.deferred
        if deferred is not None:
            self.deferred = None
            deferred.flush_request_body()
        exchange = self.parsing
        if exchange is not None and exchange is not deferred and exchange.body_parts:
            exchange.flush_request_body()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        CLOCK.watchers.discard(self)
        for exchange in list(self.queue):
            exchange.abort()
        self.queue.clear()
        self.server.connection_closed()

    def pause_writing(self) -> None:
        exchange = self.queue[0] if self.queue else None
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        exchange = self.queue[0] if self.queue else None
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.transport.resume_reading()  # type: ignore[union-attr]

    # -- httptools callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.head_started = CLOCK.now
        self.head_bytes = 0
        self._reset_head()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_REQUEST_LINE:
            raise RequestRejected(414, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        self.header_count += 1
        if self.head_size > MAX_HEADER_BYTES or self.header_count > MAX_HEADER_COUNT:
            raise RequestRejected(431, "request headers too large")
        lower = name.lower()
        if lower in REQUEST_SPECIAL:
            if lower == b"host":
                self.host = value
                self.host_count += 1
            elif lower == b"transfer-encoding":
                self.te_value = value if not self.te_chunked else b"(repeated)"
                self.te_chunked = True
            elif lower == b"x-forwarded-for":
                self.prior_xff = value if self.prior_xff is None else \
                    self.prior_xff + b", " + value
            elif lower == b"upgrade":
                self.upgrade_value = value
            elif lower == b"connection":
                self.connection_value = value if self.connection_value is None else \
                    self.connection_value + b", " + value
            elif lower == b"content-length":
                self.content_length = value
                self.headers.append((name, value))
            # Other hop-by-hop headers and those the gateway sets are not forwarded.
            return
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        version = parser.get_http_version()
        check_request_framing(version, self.te_chunked, self.host_count)
        method = parser.get_method()
        if self.connection_value is not None:
            self._drop_connection_listed_headers()
        url = self.url
        if url[:1] != b"/":
            url = self._origin_form(url, method)
        path, _, query = url.partition(b"?")
        path_text = path.decode("latin-1")
        if "%" in path_text:
            path_text = unquote(path_text, errors="strict")
        host = self.host.decode("latin-1").lower()
        if host:
            host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        ctx = self.context_class(method.decode(), path_text, query.decode("latin-1"),
                                 self.headers, host, self.peer, self.sockname, version)
        if self.original_destination is not None:
            ctx.original_destination = self.original_destination
            ctx.intercept_mode = self.intercept_mode
        upgrade = self.upgrade_value if parser.should_upgrade() else None
        if method == b"CONNECT":
            raise RequestRejected(405, "CONNECT is not supported")
        chunked = self.te_chunked
        if chunked and self.te_value.strip().lower() != b"chunked":
            # Only a lone "chunked" is understood; anything else is a framing we cannot
            # read the way the upstream would (RFC 9112 §6.1).
            raise RequestRejected(400, "unsupported Transfer-Encoding")
        body_expected = chunked or (self.content_length is not None and
                                    self.content_length.strip(b" \t0") != b"")
        exchange = Exchange(self, ctx, self.server.snapshot, method, url, self.host, chunked,
                            method in IDEMPOTENT and not chunked, upgrade, self.prior_xff,
                            body_expected, self._wants_keep_alive(version))
        self.parsing = exchange
        self.url = b""
        self.headers = []
        self.head_started = 0.0
        self.queue.append(exchange)
        if len(self.queue) == 1:
            exchange.start()
        else:
            self.pause_reading_for(self.PAUSE_PIPELINE)

    def _drop_connection_listed_headers(self) -> None:
        # RFC 9110 §7.6.1: headers named in Connection are hop-by-hop too.
        names = {token.strip().lower() for token in self.connection_value.split(b",")}
        names -= CONNECTION_OPTIONS
        if names:
            self.headers = [(n, v) for n, v in self.headers if n.lower() not in names]

    def _wants_keep_alive(self, version: str) -> bool:
        tokens = self.connection_value.lower() if self.connection_value else b""
        if version == "1.1":
            return b"close" not in tokens
        return b"keep-alive" in tokens

    def _origin_form(self, url: bytes, method: bytes) -> bytes:
        # absolute-form (RFC 9112 §3.2.2): take the path; the authority replaces Host.
        if method == b"OPTIONS" and url == b"*":
            return b"/"
        parsed = httptools.parse_url(url)
        if parsed.host:
            self.host = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
            if self.host_count == 0:
                self.host_count = 1
        path = parsed.path or b"/"
        return path + (b"?" + parsed.query if parsed.query else b"")

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        if exchange is not None:
            exchange.request_body(body)

    def on_message_complete(self) -> None:
        exchange = self.parsing
        if exchange is not None:
            self.parsing = None
            exchange.request_done()

    # -- after an upgrade request (WebSocket) --------------------------------------------
    def _after_upgrade_request(self, tail: bytes) -> None:
        exchange = self.queue[-1] if self.queue else None
        if exchange is None:
            return
        if tail:
            exchange.tunnel_from_client(tail)
        # Nothing more is parsed on this connection: it becomes a tunnel or closes.
        self.pause_reading_for(self.PAUSE_PIPELINE)

    def start_tunnel(self, exchange: Exchange) -> None:
        self.tunnel = exchange
        self.resume_reading_for(self.PAUSE_PIPELINE)

    # -- output --------------------------------------------------------------------------
    def flush(self) -> None:
        out = self.out
        if out and self.transport is not None:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
            out.clear()

    def forwarded_headers(self, host: bytes, prior_xff: bytes | None) -> bytes:
        ip = self.peer[0].encode()
        xff = prior_xff + b", " + ip if prior_xff else ip
        forwarded_host = b"X-Forwarded-Host: %s\r\n" % host if host else b""
        return b"%sX-Forwarded-For: %s\r\n%s" % (self.forwarded_base, xff, forwarded_host)

    def connection_header(self, exchange: Exchange) -> bytes:
        """Decide whether this response is the last on the connection, and say so."""
        if (not exchange.keep_alive or self.closing or exchange.upgrade is not None
                or self.server.draining
                or (exchange.body_expected and not exchange.request_complete)):
            exchange.keep_alive = False
            return CLOSE_HEADER
        if exchange.ctx.version == "1.0":
            return KEEP_ALIVE_HEADER
        return b""

    def exchange_finished(self, exchange: Exchange) -> None:
        if self.queue and self.queue[0] is exchange:
            self.queue.popleft()
        elif exchange in self.queue:
            self.queue.remove(exchange)
        if self.transport is None or self.transport.is_closing():
            return
        if self.tunnel is exchange:
            return
        if not exchange.request_complete:
            self.linger()  # unread request body: drain it so the client sees the answer
            return
        if not exchange.keep_alive or self.closing or self.server.draining:
            self.close()
            return
        self.last_activity = CLOCK.now
        if self.queue:
            self.queue[0].start()
        elif self.pending_error is not None:
            status, reason = self.pending_error
            self.pending_error = None
            self._send_error(status, reason)
        else:
            self.resume_reading_for(self.PAUSE_PIPELINE)

    def reject(self, status: int, reason: str) -> None:
        """Answer a bad request with `status` and close, after earlier pipelined answers."""
        self.pause_reading_for(self.PAUSE_PIPELINE)
        self.head_started = 0.0
        broken = self.parsing
        self.parsing = None
        self.deferred = None
        if broken is not None and not broken.request_complete:
            broken.body_parts.clear()  # never forward the rest of a malformed request
            broken.keep_alive = False
            if broken.started:
                # It is the exchange in flight: answer in its place (or cut the
                # connection when its response has begun) and drop its upstream side.
                self.closing = True
                broken.respond_error(status, reason)
                return
            if broken in self.queue:
                self.queue.remove(broken)
        if self.queue:
            self.pending_error = (status, reason)
        else:
            self._send_error(status, reason)

    def _send_error(self, status: int, reason: str) -> None:
        body = error_body(status, reason)
        self.out.append(b"%sContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
            status_line(status), len(body), CLOSE_HEADER, body))
        self.flush()
        self.linger()

    def linger(self) -> None:
        """Close after an error the way nginx's lingering_close does: send FIN, then read and
        discard what the client is still sending for a while. Closing at once with unread
        bytes makes the kernel send RST, and the client may lose the error response."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.closing = True
        self.lingering = True
        try:
            transport.write_eof()
        except (OSError, RuntimeError):
            self.close()
            return
        self.paused = 0
        transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, self.close)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0), as a host with nothing listening would."""
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.abort()

    def pause_reading_for(self, reason: int) -> None:
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused |= reason

    def resume_reading_for(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.transport is not None and \
                    not self.transport.is_closing():
                self.transport.resume_reading()

    def check_timeouts(self, now: float) -> None:
        settings = self.server.snapshot.config.gateway
        if self.queue or self.tunnel is not None:
            return
        if self.head_started:  # a request head is arriving
            if now - self.head_started > settings.client_header_timeout + TICK_SECONDS:
                self._send_error(408, "request header timeout")
        elif now - self.last_activity > settings.keepalive_timeout + TICK_SECONDS:
            self.close()


class HttpServer:
    """The listeners of one worker, the live config snapshot and the upstream pool."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.pool = UpstreamPool()
        self.connections: set[ClientConnection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.draining = False
        self._drained: asyncio.Event | None = None

    def swap(self, snapshot: Snapshot) -> None:
        """Atomically switch to a new config; in-flight requests keep the old one."""
        self.snapshot = snapshot

    async def listen(self, host: str, port: int, reuse_port: bool = False,
                     scope: str | None = None, ssl_context: ssl.SSLContext | None = None,
                     connection_class: type[ClientConnection] = ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.setblocking(False)
        tls: dict[str, Any] = {} if ssl_context is None else {
            # nginx bounds the handshake by client_header_timeout too. A TLS close waits for
            # the client's close_notify, dropping what it still sends: the lingering close
            # of plain HTTP, bounded the same way (and so is a drain).
            "ssl": ssl_context, "ssl_shutdown_timeout": LINGER_SECONDS,
            "ssl_handshake_timeout": self.snapshot.config.gateway.client_header_timeout}
        server = await loop.create_server(lambda: connection_class(self, None, scope),
                                          sock=sock, backlog=4096, **tls)
        self.servers.append(server)

    def accept_socket(self, sock: socket.socket, original_destination: tuple[str, int],
                      scope: str | None = None, intercept_mode: str = "ebpf"
                      ) -> asyncio.Future[Any]:
        """Entry point for interceptors: an accepted socket plus where it was going."""
        loop = asyncio.get_running_loop()
        return asyncio.ensure_future(loop.connect_accepted_socket(
            lambda: ClientConnection(self, original_destination, scope, intercept_mode), sock))

    async def listen_socket(self, sock: socket.socket, scope: str | None = None,
                            intercept_mode: str | None = None) -> None:
        """Serve on a listening socket made elsewhere (e.g. a TPROXY listener): every
        connection it accepts carries its original destination and interception scope."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: ClientConnection(self, None, scope, intercept_mode), sock=sock,
            backlog=4096)
        self.servers.append(server)

    def sockets(self) -> list[socket.socket]:
        return [s for server in self.servers for s in (server.sockets or [])]

    def tick(self, now: float) -> None:
        for connection in list(self.connections):
            connection.check_timeouts(now)
        self.pool.sweep(now)

    def connection_closed(self) -> None:
        if self.draining and not self.connections and self._drained is not None:
            self._drained.set()

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, let in-flight exchanges finish (up to timeout), close the rest.
        Returns True when everything finished in time."""
        self.draining = True
        for server in self.servers:
            server.close()
        self._drained = asyncio.Event()
        for connection in list(self.connections):
            if not connection.queue and connection.tunnel is None:
                connection.close()
        clean = True
        if self.connections:
            try:
                await asyncio.wait_for(self._drained.wait(), timeout)
            except TimeoutError:
                clean = False
                for connection in list(self.connections):
                    connection.abort()
        self.pool.close_all()
        return clean
