"""The splice copy path of the TCP relay (the default where `os.splice` exists).

Bytes go socket → pipe → socket with `os.splice` and never enter Python; readiness comes
from `loop.add_reader` / `add_writer`. A direction reads only when its pipe is empty, so a
slow receiver stops the reads (backpressure) and each connection holds at most two pipes'
worth of bytes. bench/stream_copy.py (1 GiB over loopback): the same Gbit/s as the copy path
where the peers are the limit, for ~40% less relay CPU (0.21-0.24 vs 0.36-0.42 CPU seconds
per GiB). Half-close and errors as in stream/copy_relay.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
from typing import Any

from sluicegate.http.clock import CLOCK
from sluicegate.stream.connection import StreamConnection, reset_socket

__all__ = ["SpliceConnection", "splice_available"]

log = logging.getLogger("sluicegate.stream")

# Splice path: pipe capacity per direction (F_SETPIPE_SZ; 1 MiB is fs.pipe-max-size's
# default, the most an unprivileged process may ask for). bench/stream_copy.py, relay CPU
# per GiB: 64 KiB pipe 0.45-0.58 s, 256 KiB 0.27-0.31 s, 1 MiB 0.21-0.24 s. Looping on
# the socket until EAGAIN instead of one splice per readiness event measured the same.
SPLICE_PIPE_BYTES = 1024 * 1024
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ is Python 3.10+, but not on every build
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


def splice_available() -> bool:
    """True when this Python and kernel have ``os.splice`` (Linux, Python 3.10+)."""
    return hasattr(os, "splice")



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

