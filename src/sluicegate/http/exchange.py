"""One request/response exchange: the request through the plugins, balancing and the
upstream connection. The response side is `UpstreamResponse` (http/upstream_response.py),
answers the gateway makes itself are `LocalAnswers` (http/local_answers.py): one class,
three files, each one job.

Callbacks only append to output lists; the connection that received the bytes writes once
per read (PERF.md: coalescing writes is what decides the cost of a Python proxy).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from sluicegate.http.clock import CLOCK
from sluicegate.http.local_answers import LocalAnswers
from sluicegate.http.upstream import UpstreamConnection
from sluicegate.http.upstream_response import UpstreamResponse
from sluicegate.plugins.base import EMPTY_CHAIN, LocalHandler, PluginChain, Response
from sluicegate.proto.http1 import LAST_CHUNK, RAW, chunk

if TYPE_CHECKING:
    from sluicegate.http.balancer import UpstreamNode
    from sluicegate.http.context import RequestContext
    from sluicegate.http.server import ClientConnection
    from sluicegate.http.snapshot import CompiledRoute, Snapshot

log = logging.getLogger("sluicegate.http")

# Request body bytes buffered while no upstream is attached before reading pauses.
MAX_BUFFERED_REQUEST_BODY = 256 * 1024


class Exchange(UpstreamResponse, LocalAnswers):
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
