"""The response side of an exchange: the upstream's response head and body on their way to
the client (header and body filters, framing), upstream errors and timeouts, and upgrades
(WebSocket tunnels). Part of `Exchange` (http/exchange.py), whose state it uses; the
methods are called by `UpstreamConnection` (http/upstream.py).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from sluicegate.http.clock import CLOCK, TICK_SECONDS
from sluicegate.proto.http1 import (
    CHUNKED,
    LAST_CHUNK,
    NO_BODY_STATUS,
    NONE,
    RAW,
    RESPONSE_DROP,
    UNTIL_CLOSE,
    chunk,
    encode_headers,
    status_line,
)

if TYPE_CHECKING:
    from sluicegate.http.upstream import UpstreamConnection

__all__ = ["MAX_STALE_RETRIES", "UpstreamResponse"]

log = logging.getLogger("sluicegate.http")

# How often a pooled connection found dead is replaced for the same request.
MAX_STALE_RETRIES = 3


class UpstreamResponse:
    """`Exchange`'s response side (its slots hold the state)."""

    __slots__ = ()

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
        self.end_framing()
        self.release_upstream(keep_alive and self.request_complete)
        self.client.flush()
        self.finish()

    def end_framing(self) -> None:
        """What ends the body towards the client: the body filters' last words, and the last
        chunk when the gateway chunks it (an upstream's body, or a local handler's)."""
        if self.body_filtered:
            tail = self.filter_body(b"", True)
            if tail:
                self.ctx.bytes_sent += len(tail)
                self.client.out.append(chunk(tail) if self.mode == CHUNKED else tail)
        if self.mode == CHUNKED:
            self.client.out.append(LAST_CHUNK)

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
