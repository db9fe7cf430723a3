"""Upstream connections and the keep-alive pool.

An `UpstreamConnection` parses responses with httptools and hands each event to the
exchange it currently serves; between exchanges it idles in the `UpstreamPool`. Pools are
keyed by node address and outlive config snapshots, so a reload keeps warm connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools

from sluicegate.http.clock import CLOCK, TICK_SECONDS

if TYPE_CHECKING:
    from sluicegate.http.exchange import Exchange

log = logging.getLogger("sluicegate.upstream")


class HeadResponseDone(Exception):
    """Raised from on_headers_complete of a HEAD response: it has no body whatever its
    Content-Length says, and httptools ignores the callback's return value (PERF.md)."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an upstream node."""

    __slots__ = ("closed", "exchange", "idle_since", "key", "last_read", "parser", "pool",
                 "requests", "transport", "tunnel", "writing_paused")

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.requests = 0
        self.idle_since = 0.0
        self.last_read = 0.0
        self.closed = False
        self.tunnel = False
        self.writing_paused = False

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        self.last_read = CLOCK.now
        if exchange is None:  # unsolicited bytes on an idle connection: unusable
            self.close()
            return
        if self.tunnel:
            exchange.tunnel_from_upstream(data)
            return
        try:
            self.parser.feed_data(data)
        except HeadResponseDone:
            self.parser = httptools.HttpResponseParser(self)
            exchange.response_complete(self, True)
        except httptools.HttpParserUpgrade as upgrade:
            exchange.response_upgraded(self, data[upgrade.args[0]:])
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
            if isinstance(cause, HeadResponseDone):
                self.parser = httptools.HttpResponseParser(self)
                exchange.response_complete(self, True)
            else:
                exchange.upstream_protocol_error(self, str(cause))
                return
        if self.exchange is not None:
            self.exchange.flush_to_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.upstream_lost(self, exc)
        else:
            self.pool.forget(self)

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.exchange is not None:
            self.exchange.upstream_write_paused(True)

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.exchange is not None:
            self.exchange.upstream_write_paused(False)

    # -- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.exchange.response_header(name, value)  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        if self.exchange.response_headers_complete(self, self.parser):  # type: ignore[union-attr]
            raise HeadResponseDone

    def on_body(self, body: bytes) -> None:
        self.exchange.response_body(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response_complete(self, self.parser.should_keep_alive())

    # -- pool side ----------------------------------------------------------------------
    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class UpstreamPool:
    """Idle keep-alive connections per node, with size, idle-time and request-count limits."""

    def __init__(self) -> None:
        self.idle: dict[tuple[str, int], deque[UpstreamConnection]] = {}
        self.idle_timeouts: dict[tuple[str, int], float] = {}

    def acquire(self, key: tuple[str, int]) -> UpstreamConnection | None:
        idle = self.idle.get(key)
        while idle:
            connection = idle.pop()  # most recently used: least likely to be closed
            if not connection.closed:
                return connection
        return None

    def release(self, connection: UpstreamConnection, size: int, max_requests: int,
                idle_timeout: float) -> None:
        connection.exchange = None
        if connection.closed or connection.requests >= max_requests or size == 0:
            connection.close()
            return
        idle = self.idle.get(connection.key)
        if idle is None:
            idle = self.idle[connection.key] = deque()
        if len(idle) >= size:
            idle.popleft().close()
        connection.idle_since = CLOCK.now
        self.idle_timeouts[connection.key] = idle_timeout
        if connection.transport is not None and connection.writing_paused is False:
            idle.append(connection)
        else:
            connection.close()

    def forget(self, connection: UpstreamConnection) -> None:
        idle = self.idle.get(connection.key)
        if idle is not None:
            with contextlib.suppress(ValueError):
                idle.remove(connection)

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than their upstream's idle_timeout."""
        for key, idle in self.idle.items():
            idle_timeout = self.idle_timeouts.get(key, 60.0)
            while idle and now - idle[0].idle_since > idle_timeout + TICK_SECONDS:
                idle.popleft().close()

    def close_all(self) -> None:
        for idle in self.idle.values():
            while idle:
                idle.popleft().close()

    def idle_count(self) -> int:
        return sum(len(idle) for idle in self.idle.values())
