"""The user-space copy path of the TCP relay (the reference path).

Both sockets become uvloop transports; each `data_received` chunk is written to the other
transport. A transport whose write buffer passes the high-water mark pauses reading on the
other side (backpressure). Half-close aware: EOF from one side becomes `shutdown(SHUT_WR)`
towards the other, and the connection ends when both directions have ended. An error on
either side (reset, broken pipe) or a timeout resets both.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from sluicegate.http.clock import CLOCK
from sluicegate.stream.connection import StreamConnection, reset_socket, reset_transport

__all__ = ["CopyConnection"]

log = logging.getLogger("sluicegate.stream")

# Copy path: write buffer high-water mark per transport. bench/stream_copy.py (1 GiB over
# loopback, 3 runs each): 64 KiB (uvloop's default), 256 KiB and 1 MiB all cost 0.3-0.45
# relay CPU s/GiB, no difference above the noise; 256 KiB bounds what a connection holds.
COPY_WRITE_BUFFER_HIGH = 256 * 1024


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
        reset_transport(side.transport)


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
