"""One request/response exchange: plugins, balancing, upstream I/O, response streaming.

Callbacks only append to output lists; the connection that received the bytes writes once
per read (PERF.md: coalescing writes is what decides the cost of a Python proxy).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from sluicegate.http.clock import CLOCK, TICK_SECONDS
from sluicegate.http.upstream import UpstreamConnection
from sluicegate.plugins.base import EMPTY_CHAIN, LocalHandler, PluginChain, Response
from sluicegate.proto.http1 import (
    LAST_CHUNK,
    NO_BODY_STATUS,
    RESPONSE_DROP,
    chunk,
    encode_headers,
    error_body,
    status_line,
)

if TYPE_CHECKING:
    from sluicegate.http.balancer import UpstreamNode
    from sluicegate.http.context import RequestContext
    from sluicegate.http.server import ClientConnection
    from sluicegate.http.snapshot import CompiledRoute, Snapshot

log = logging.getLogger("sluicegate.http")

# Request body bytes buffered while no upstream is attached before reading pauses.
MAX_BUFFERED_REQUEST_BODY = 256 * 1024
# How often a pooled connection found dead is replaced for the same request.
MAX_STALE_RETRIES = 3

# Response framing towards the client.
RAW, CHUNKED, UNTIL_CLOSE, NONE = 0, 1, 2, 3

JSON_HEADER = b"Content-Type: application/json\r\n"


class Exchange:
    """A request as it travels through the gateway, and its response coming back."""

    __slots__ = (
        "attempts",
        "body_buffered",
        "body_expected",
        "body_filtered",
        "body_parts",
        "chain",
        "client",
        "connect_task",
        "ctx",
        "finished",
        "handler",
        "head_sent",
        "host_bytes",
        "interim",
        "is_head",
        "keep_alive",
        "method_bytes",
        "mode",
        "node",
        "pending",
        "prior_xff",
        "replayable",
        "request_chunked",
        "request_complete",
        "resp_chunked",
        "resp_headers",
        "resp_length",
        "resp_upgrade",
        "reused",
        "route",
        "snapshot",
        "stale_retries",
        "started",
        "tried",
        "tunnel",
        "until_close",
        "upgrade",
        "upgrading",
        "upstream",
        "upstream_started",
        "url_bytes",
        "write_paused_since",
    )

    def __init__(self, client: ClientConnection, ctx: RequestContext, snapshot: Snapshot,
                 method_bytes: bytes, url_bytes: bytes, host_bytes: bytes,
                 request_chunked: bool, replayable: bool, upgrade: bytes | None,
                 prior_xff: bytes | None, body_expected: bool, keep_alive: bool) -> None:
        self.client = client
        self.body_expected = body_expected
        self.prior_xff = prior_xff
        self.ctx = ctx
        self.snapshot = snapshot
        self.method_bytes = method_bytes
        self.url_bytes = url_bytes
        self.host_bytes = host_bytes
        self.request_chunked = request_chunked
        self.replayable = replayable
        self.upgrade = upgrade
        self.is_head = method_bytes == b"HEAD"
        self.route: CompiledRoute | None = None
        self.chain: PluginChain = EMPTY_CHAIN
        self.body_parts: list[bytes] = []
        self.body_buffered = 0
        self.request_complete = False
        self.keep_alive = keep_alive
        self.started = False
        self.finished = False
        self.handler: LocalHandler | None = None
        self.upstream: UpstreamConnection | None = None
        self.node: UpstreamNode | None = None
        self.tried: set[UpstreamNode] | None = None
        self.attempts = 0
        self.stale_retries = 0
        self.reused = False
        self.connect_task: asyncio.Task[Any] | None = None
        self.pending: asyncio.Future[Any] | None = None
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.resp_length: bytes | None = None
        self.resp_upgrade: bytes | None = None
        self.resp_chunked = False
        self.until_close = False
        self.head_sent = False
        self.interim = False
        self.mode = RAW
        self.body_filtered = False
        self.upgrading = False
        self.tunnel = False
        self.upstream_started = 0.0
        self.write_paused_since = 0.0

    # -- request side ------------------------------------------------------------------
    def start(self) -> None:
        """Route the request and run the request-phase plugins."""
        self.started = True
        ctx = self.ctx
        scope_name = self.client.scope
        if scope_name is None:
            route = self.snapshot.table.match(ctx.method, ctx.uri, ctx.host, ctx)
        else:
            scope = self.snapshot.scopes.get(scope_name)
            route = scope.match(ctx.method, ctx.uri, ctx.host, ctx) if scope else None
        if route is None:
            # Global rules still run (APISIX), then the 404.
            self.chain = self.snapshot.global_chain
        else:
            ctx.route = self.route = route
            self.chain = route.chain
        if self.chain.request_hooks:
            self.run_request_hooks(0)
        else:
            self.proxy()

    def proxy(self) -> None:
        if self.route is None:
            self.respond_error(404, "", message="404 Route Not Found")
        else:
            self.connect_upstream()

    def run_request_hooks(self, index: int) -> None:
        hooks = self.chain.request_hooks
        ctx = self.ctx
        count = len(hooks)
        while index < count:
            try:
                result = hooks[index](ctx)
            except Exception:
                log.exception("plugin hook %r failed", hooks[index])
                self.respond_error(500, "plugin error")
                return
            index += 1
            if result is None:
                continue
            if isinstance(result, Response):
                self.respond(result)
                return
            if isinstance(result, PluginChain):
                # Authentication named a consumer with plugins of its own: go on with the
                # chain that merges them in (ConsumerChains in http/snapshot.py).
                self.chain = result
                hooks = result.request_hooks
                count = len(hooks)
                index = 0
                continue
            if isinstance(result, LocalHandler):
                self.serve_locally(result)
                return
            self.pending = asyncio.ensure_future(result)
            self.pending.add_done_callback(functools.partial(self._hook_done, index=index))
            return
        self.proxy()

    def _hook_done(self, future: asyncio.Future[Any], index: int) -> None:
        self.pending = None
        if self.finished:
            return
        try:
            result = future.result()
        except Exception:
            log.exception("plugin hook failed")
            self.respond_error(500, "plugin error")
            return
        if isinstance(result, Response):
            self.respond(result)
        elif isinstance(result, LocalHandler):
            self.serve_locally(result)
        else:
            self.run_request_hooks(index)

    def request_body(self, data: bytes) -> None:
        self.ctx.bytes_received += len(data)
        if self.finished:
            return
        self.body_parts.append(chunk(data) if self.request_chunked else data)
        self.body_buffered += len(data)

    def flush_request_body(self) -> None:
        """Send what arrived in one read to the upstream in one write."""
        upstream = self.upstream
        if upstream is not None and not self.tunnel:
            if self.body_parts:
                data = b"".join(self.body_parts) if len(self.body_parts) > 1 else \
                    self.body_parts[0]
                self.body_parts.clear()
                self.body_buffered = 0
                upstream.transport.write(data)  # type: ignore[union-attr]
        elif self.handler is not None:  # a plugin serving the request reads it whole
            if self.body_buffered > self.handler.max_body and not self.finished:
                self.respond_error(413, "request body too large")
        elif self.body_buffered > MAX_BUFFERED_REQUEST_BODY and not self.finished:
            self.client.pause_reading_for(self.client.PAUSE_BODY)

    def request_done(self) -> None:
        self.request_complete = True
        if self.finished:  # answered before the (empty) request body was parsed
            self.client.exchange_finished(self)
            return
        if self.handler is not None:
            self.start_local_handler()
            return
        if self.request_chunked:
            self.body_parts.append(LAST_CHUNK)
        self.flush_request_body()

    # -- choosing and reaching a node ---------------------------------------------------
    def connect_upstream(self) -> None:
        route = self.route
        assert route is not None
        upstream = route.upstream
        node = upstream.balancer.pick(self.ctx, self.tried)
        if node is None:
            self.respond_error(502, "no upstream node available")
            return
        self.node = node
        self.ctx.upstream_addr = node.address
        tls = upstream.tls
        # https: pooled apart from plain connections, per TLS name and settings (http/tls.py)
        key = node.key if tls is None else tls.pool_key(node, self.ctx)
        connection = self.client.server.pool.acquire(key)
        if connection is not None:
            self.reused = True
            self.attach(connection)
            return
        self.reused = False
        self.connect_task = asyncio.get_running_loop().create_task(
            self._connect(node, upstream.connect_timeout, upstream.source_from_client, key))

    async def _open(self, node: UpstreamNode, from_client: bool, key: Any) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        pool = self.client.server.pool
        tls = self.route.upstream.tls  # type: ignore[union-attr]
        # TLS: the handshake (and certificate verification) happens inside the connect
        # timeout; a failed verification is an OSError (ssl.SSLError) like a refused connect.
        options = {} if tls is None else tls.connect_options(key[2])
        if not from_client:
            _, connection = await loop.create_connection(
                lambda: UpstreamConnection(pool, key), node.host, node.port, **options)
            return connection
        # preserve_source: the upstream sees the client's address (IP_TRANSPARENT bind).
        from sluicegate.intercept.sockets import transparent_connect_socket

        sock = transparent_connect_socket(self.ctx.remote_addr)
        try:
            await loop.sock_connect(sock, (node.host, node.port))
            _, connection = await loop.create_connection(
                lambda: UpstreamConnection(pool, key), sock=sock, **options)
        except BaseException:
            sock.close()
            raise
        return connection

    async def _connect(self, node: UpstreamNode, timeout: float, from_client: bool,
                       key: Any) -> None:
        try:
            connection = await asyncio.wait_for(self._open(node, from_client, key), timeout)
        except asyncio.CancelledError:
            raise
        except (TimeoutError, OSError) as exc:
            self.connect_task = None
            if not self.finished:
                self.connect_failed(node, exc)
            return
        self.connect_task = None
        if self.finished:
            connection.close()
            return
        self.attach(connection)

    def connect_failed(self, node: UpstreamNode, exc: BaseException) -> None:
        timed_out = isinstance(exc, asyncio.TimeoutError)
        log.warning("upstream %s %s", node.address,
                    "connect timed out" if timed_out else f"connect failed: {exc}")
        self._node_failed(node)
        assert self.route is not None
        health = self.route.upstream.health
        if health is not None:
            health.passive_failure(node, timed_out)
        if self.may_retry():
            self.connect_upstream()
        elif self.ctx.intercept_mode is not None and not self.route.upstream.nodes:
            # Transparent traffic to its own destination: the client must see what it
            # would have seen without us, a reset, not an answer from a proxy it never chose.
            self.client.reset()
            self.abort()
        elif timed_out:
            self.respond_error(504, "upstream connect timed out")
        else:
            self.respond_error(502, "upstream connect failed")

    def may_retry(self) -> bool:
        """Another node may be tried: retries left and, with `retry_timeout`, time left
        (counted from the request's arrival)."""
        upstream = self.route.upstream  # type: ignore[union-attr]
        if self.attempts > upstream.retries:
            return False
        limit = upstream.retry_timeout
        return not limit or time.monotonic() - self.ctx.start_time < limit

    def _node_failed(self, node: UpstreamNode) -> None:
        self.attempts += 1
        if self.tried is None:
            self.tried = set()
        self.tried.add(node)

    def attach(self, connection: UpstreamConnection) -> None:
        self.upstream = connection
        connection.exchange = self
        connection.requests += 1
        connection.last_read = CLOCK.now
        self.upstream_started = time.monotonic()
        assert self.route is not None and self.node is not None
        self.route.upstream.balancer.on_request_start(self.node)
        self.body_parts.insert(0, self.build_upstream_head())
        client = self.client
        if client.feeding:
            client.deferred = self  # written when the read that carried it parsed cleanly
        else:
            self.flush_request_body()
        client.resume_reading_for(client.PAUSE_BODY)
        CLOCK.watchers.add(self)
        if connection.writing_paused:
            self.upstream_write_paused(True)

    def build_upstream_head(self) -> bytes:
        ctx = self.ctx
        route = self.route
        assert route is not None and self.node is not None
        upstream = route.upstream
        method = self.method_bytes if ctx.method == self.method_bytes.decode() else \
            ctx.method.encode()
        target = ctx.request_uri.encode() if ctx.uri_dirty else self.url_bytes
        if ctx.upstream_host:
            host = ctx.upstream_host.encode()
        elif upstream.pass_host == "pass":
            host = self.host_bytes
        elif upstream.pass_host == "node":
            host = self.node.host_header
        else:
            host = upstream.upstream_host.encode()  # type: ignore[union-attr]
        if not host:  # HTTP/1.0 without Host: HTTP/1.1 to the upstream needs one
            host = self.node.host_header
        parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
        for name, value in ctx.raw_headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(self.client.forwarded_headers(self.host_bytes, self.prior_xff))
        if self.request_chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if self.upgrade is not None:
            parts += (b"Connection: Upgrade\r\nUpgrade: ", self.upgrade, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    # -- response side (called by UpstreamConnection) ----------------------------------
    def response_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower in RESPONSE_DROP:
            if lower == b"upgrade":  # forwarded only with a 101
                self.resp_upgrade = value
            elif lower == b"transfer-encoding":
                self.resp_chunked = True
            return
        if lower == b"content-length":
            self.resp_length = value
        self.resp_headers.append((name, value))

    def response_headers_complete(self, connection: UpstreamConnection, parser: Any) -> bool:
        """Build the client response head; returns True when no body follows (HEAD)."""
        status = parser.get_status_code()
        if status < 200 and status != 101:
            # Interim response (100 Continue...): pass it on, wait for the final one.
            self.client.out.append(status_line(status) + b"\r\n")
            self.resp_headers = []
            self.interim = True
            return False
        ctx = self.ctx
        ctx.upstream_status = ctx.response_status = status
        ctx.upstream_latency = time.monotonic() - self.upstream_started
        health = self.route.upstream.health  # type: ignore[union-attr]
        if health is not None:
            health.passive_status(self.node, status)  # type: ignore[arg-type]
        if status == 101:
            self.upgrading = True
            head = [status_line(101)]
            head += [b"%s: %s\r\n" % header for header in self.resp_headers]
            head.append(b"Connection: Upgrade\r\nUpgrade: %s\r\n\r\n" % (
                self.resp_upgrade or self.upgrade or b"websocket"))
            self.client.out.append(b"".join(head))
            self.head_sent = True
            self.mode = NONE
            return False
        no_body = self.is_head or status in NO_BODY_STATUS
        if not no_body and self.resp_length is None and not self.resp_chunked:
            self.until_close = True  # the upstream ends this body by closing
        chain = self.chain
        if chain.needs_headers:
            headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.resp_headers]
            ctx.response_headers = headers
            ctx.merge_added_headers()
            self.run_header_filters()
            if chain.body_filter and not no_body:
                self.body_filtered = True
                ctx.set_response_header("Content-Length", None)
                self.resp_length = None
            head = [status_line(ctx.response_status), encode_headers(ctx.response_headers)]
        elif ctx.added_headers:
            raw, names = ctx.added_raw, ctx.added_names
            if raw is None or names is None:
                names = frozenset(name.lower().encode("latin-1")
                                  for name, _ in ctx.added_headers)
                raw = encode_headers(ctx.added_headers)
            head = [status_line(status)]
            head += [b"%s: %s\r\n" % header for header in self.resp_headers
                     if header[0].lower() not in names]
            head.append(raw)
        else:
            head = [status_line(status)]
            head += [b"%s: %s\r\n" % header for header in self.resp_headers]
        if no_body:
            self.mode = NONE
        elif self.resp_length is not None:
            self.mode = RAW
        elif ctx.version == "1.1":
            self.mode = CHUNKED
            head.append(b"Transfer-Encoding: chunked\r\n")
        else:
            self.mode = UNTIL_CLOSE
            self.keep_alive = False
        head.append(self.client.connection_header(self))
        head.append(b"\r\n")
        self.client.out.append(b"".join(head))
        self.head_sent = True
        return self.is_head

    def run_header_filters(self) -> None:
        ctx = self.ctx
        for hook in self.chain.header_filter:
            try:
                hook(ctx)
            except Exception:
                log.exception("header_filter %r failed", hook)

    def filter_body(self, data: bytes, eof: bool) -> bytes:
        ctx = self.ctx
        for hook in self.chain.body_filter:
            try:
                data = hook(ctx, data, eof)
            except Exception:
                log.exception("body_filter %r failed", hook)
        return data

    def response_body(self, data: bytes) -> None:
        if self.interim:
            return
        if self.body_filtered:
            data = self.filter_body(data, False)
            if not data:
                return
        self.ctx.bytes_sent += len(data)
        if self.mode == CHUNKED:
            self.client.out.append(chunk(data))
        else:
            self.client.out.append(data)

    def response_complete(self, connection: UpstreamConnection, keep_alive: bool) -> None:
        if self.interim:
            self.interim = False
            return
        if self.upgrading:
            return  # the parser reports the upgrade next
        if self.body_filtered:
            tail = self.filter_body(b"", True)
            if tail:
                self.ctx.bytes_sent += len(tail)
                self.client.out.append(chunk(tail) if self.mode == CHUNKED else tail)
        if self.mode == CHUNKED:
            self.client.out.append(LAST_CHUNK)
        self.release_upstream(keep_alive and self.request_complete)
        self.client.flush()
        self.finish()

    def release_upstream(self, reusable: bool) -> None:
        connection = self.upstream
        if connection is None:
            return
        self.upstream = None
        CLOCK.watchers.discard(self)
        route = self.route
        assert route is not None and self.node is not None
        route.upstream.balancer.on_request_end(self.node, time.monotonic() - self.upstream_started,
                                              not reusable and self.ctx.upstream_status == 0)
        if reusable:
            upstream = route.upstream
            self.client.server.pool.release(connection, upstream.keepalive_size,
                                            upstream.keepalive_requests, upstream.idle_timeout)
        else:
            connection.exchange = None
            connection.close()

    def flush_to_client(self) -> None:
        self.client.flush()

    def upstream_protocol_error(self, connection: UpstreamConnection, reason: str) -> None:
        log.warning("bad response from upstream %s: %s", self.ctx.upstream_addr, reason)
        health = self.route.upstream.health  # type: ignore[union-attr]
        if health is not None and not self.head_sent:
            health.passive_failure(self.node, False)  # type: ignore[arg-type]
        self.release_upstream(False)
        if self.head_sent:
            self.client.abort()
        else:
            self.respond_error(502, "invalid response from upstream")

    def upstream_lost(self, connection: UpstreamConnection, exc: Exception | None) -> None:
        if self.finished or connection is not self.upstream:
            return
        if self.tunnel:
            self.upstream = None
            self.client.close()
            self.finish()
            return
        got_response = self.head_sent or self.interim
        if not got_response:
            self.upstream = None
            CLOCK.watchers.discard(self)
            # Only a request without a body can be sent again: the body is not kept.
            replayable = self.replayable and self.ctx.bytes_received == 0
            if self.reused and replayable and self.stale_retries < MAX_STALE_RETRIES:
                # A pooled connection the upstream had closed: not the node's fault.
                self.stale_retries += 1
                self.connect_upstream()
                return
            assert self.node is not None and self.route is not None
            self.route.upstream.balancer.on_request_end(self.node, 0.0, True)
            health = self.route.upstream.health
            if health is not None:
                health.passive_failure(self.node, False)
            self._node_failed(self.node)
            if replayable and self.may_retry():
                self.connect_upstream()
            else:
                self.respond_error(502, "upstream closed the connection")
            return
        if self.until_close:
            self.response_complete(connection, False)
            return
        self.upstream = None
        CLOCK.watchers.discard(self)
        self.client.abort()
        self.finish()

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self.write_paused_since = CLOCK.now
            self.client.pause_reading_for(self.client.PAUSE_UPSTREAM)
        else:
            self.write_paused_since = 0.0
            self.client.resume_reading_for(self.client.PAUSE_UPSTREAM)

    def check_timeouts(self, now: float) -> None:
        connection = self.upstream
        if connection is None or self.finished or self.tunnel:
            return
        upstream = self.route.upstream  # type: ignore[union-attr]
        # Stamps come from the coarse clock (up to one tick old): add a tick so a timeout
        # never fires early.
        if self.write_paused_since and \
                now - self.write_paused_since > upstream.send_timeout + TICK_SECONDS:
            reason = "upstream send timed out"
        elif now - connection.last_read > upstream.read_timeout + TICK_SECONDS:
            reason = "upstream read timed out"
        else:
            return
        log.warning("%s (%s)", reason, self.ctx.upstream_addr)
        if upstream.health is not None and not self.head_sent:
            upstream.health.passive_failure(self.node, True)  # type: ignore[arg-type]
        self.release_upstream(False)
        if self.head_sent:
            self.client.abort()
            self.finish()
        else:
            self.respond_error(504, reason)

    # -- WebSocket and other upgrades ---------------------------------------------------
    def response_upgraded(self, connection: UpstreamConnection, tail: bytes) -> None:
        self.tunnel = True
        connection.tunnel = True
        CLOCK.watchers.discard(self)
        if tail:
            self.client.out.append(tail)
        self.client.flush()
        self.client.start_tunnel(self)
        if self.body_parts:  # bytes the client sent after its upgrade request
            connection.transport.write(b"".join(self.body_parts))  # type: ignore[union-attr]
            self.body_parts.clear()

    def tunnel_from_upstream(self, data: bytes) -> None:
        self.client.transport.write(data)  # type: ignore[union-attr]

    def tunnel_from_client(self, data: bytes) -> None:
        if self.tunnel and self.upstream is not None:
            self.upstream.transport.write(data)  # type: ignore[union-attr]
        else:
            self.body_parts.append(data)

    # -- a plugin serving the request itself (plugins/base.py LocalHandler) -------------
    def serve_locally(self, handler: LocalHandler) -> None:
        self.handler = handler
        # Body bytes may have arrived (and reading paused) while hooks ran.
        self.client.resume_reading_for(self.client.PAUSE_BODY)
        if self.body_buffered > handler.max_body:
            self.respond_error(413, "request body too large")
        elif self.request_complete:
            self.start_local_handler()

    def start_local_handler(self) -> None:
        parts = self.body_parts
        if self.request_chunked:  # request_body() framed each piece as a chunk: unframe
            parts = [part[part.index(b"\r\n") + 2:-2] for part in parts]
        body = b"".join(parts)
        self.body_parts = []
        self.body_buffered = 0
        self.pending = asyncio.ensure_future(self.handler.serve(body, self))  # type: ignore
        self.pending.add_done_callback(self._local_handler_done)

    def _local_handler_done(self, task: asyncio.Future[Any]) -> None:
        self.pending = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("plugin handler failed", exc_info=exc)
        if self.finished:
            return
        if not self.head_sent:
            self.respond_error(500, "plugin error")
        elif exc is not None:
            self.client.abort()
            self.finish()
        else:
            self.end_body()

    def send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Start a streamed answer: chunked on HTTP/1.1, else delimited by closing."""
        ctx = self.ctx
        ctx.response_status = status
        ctx.response_headers = list(headers)
        ctx.merge_added_headers()
        if self.chain.needs_headers:
            self.run_header_filters()
            self.body_filtered = bool(self.chain.body_filter)
            ctx.set_response_header("Content-Length", None)
        if ctx.version == "1.1":
            self.mode = CHUNKED
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            self.mode = UNTIL_CLOSE
            self.keep_alive = False
            framing = b""
        self.client.out.append(b"".join((
            status_line(ctx.response_status), encode_headers(ctx.response_headers), framing,
            self.client.connection_header(self), b"\r\n")))
        self.head_sent = True
        self.client.flush()

    def send_body(self, data: bytes) -> None:
        if self.finished:
            return
        self.response_body(data)
        self.client.flush()

    def end_body(self) -> None:
        if self.finished:
            return
        if self.body_filtered:
            tail = self.filter_body(b"", True)
            if tail:
                self.ctx.bytes_sent += len(tail)
                self.client.out.append(chunk(tail) if self.mode == CHUNKED else tail)
        if self.mode == CHUNKED:
            self.client.out.append(LAST_CHUNK)
        self.client.flush()
        self.finish()

    # -- answers made by the gateway ---------------------------------------------------
    def respond_error(self, status: int, reason: str, message: str | None = None) -> None:
        import json

        body = json.dumps({"error_msg": message}).encode() if message else \
            error_body(status, reason)
        self.respond(Response(status, body, [("Content-Type", "application/json")]))

    def respond(self, response: Response) -> None:
        if self.finished:
            return
        if self.head_sent:
            self.client.abort()
            self.finish()
            return
        self.release_upstream(False)
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        ctx = self.ctx
        ctx.response_status = response.status
        ctx.response_headers = list(response.headers)
        ctx.merge_added_headers()
        body = response.body
        if self.chain.needs_headers:
            self.run_header_filters()
            if self.chain.body_filter:
                body = self.filter_body(body, True)
        if not self.request_complete and self.body_expected:
            self.keep_alive = False  # unread request body: the connection cannot be reused
        ctx.bytes_sent += len(body)
        self.client.out.append(b"".join((
            status_line(ctx.response_status), encode_headers(ctx.response_headers),
            b"Content-Length: %d\r\n" % len(body), self.client.connection_header(self), b"\r\n",
            b"" if self.is_head else body)))
        self.head_sent = True
        self.client.flush()
        self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        CLOCK.watchers.discard(self)
        for hook in self.chain.log:
            try:
                hook(self.ctx)
            except Exception:
                log.exception("log hook %r failed", hook)
        if self.request_complete or self.body_expected or self.client.closing:
            self.client.exchange_finished(self)
        # else: request_done() follows within the same parse and ends the exchange

    def abort(self) -> None:
        """The client went away: drop the upstream side, record what happened."""
        if self.finished:
            return
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        if self.pending is not None:
            self.pending.cancel()
        if not self.head_sent:
            self.ctx.response_status = 499  # nginx's "client closed request"
        self.release_upstream(False)
        self.finish()
