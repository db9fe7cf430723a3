"""Access log files: one buffered writer per path, shared by every plugin instance (and
config snapshot) that logs to it, reopened when the file is rotated.

Lines are written with one `write` per flush, when the buffer passes `FLUSH_BYTES` or at
most `FLUSH_DELAY` after the first buffered line (a timer on the running event loop).
Without a running loop (CLI tools, tests) each line is written at once. The file is opened
with O_APPEND, so workers in other processes appending to the same file do not interleave
within a flush.

`access_entry` builds the one JSON-ready entry shape that every access logger writes
(file-logger to a file, http-logger to a collector).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sluicegate.http.context import RequestContext

FLUSH_BYTES = 64 * 1024
FLUSH_DELAY = 0.5  # seconds a line may wait in the buffer
FILE_MODE = 0o640

log = logging.getLogger(__name__)


class UtcClock:
    """ISO 8601 UTC timestamps with milliseconds; the date part is formatted once a second."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.prefix}.{int((now - second) * 1000):03d}Z"


def access_entry(ctx: RequestContext, clock: UtcClock) -> dict[str, Any]:
    """One request's log entry. No credentials: no Authorization header, API key, cookie
    or query string (the query can hold keys), so only the path of the URI."""
    latency = time.monotonic() - ctx.start_time
    upstream = ctx.upstream_status != 0
    route = ctx.route
    entry: dict[str, Any] = {
        "time": clock.now(),
        "client_ip": ctx.remote_addr,
        "method": ctx.method,
        "uri": ctx.uri,
        "host": ctx.host,
        "status": ctx.response_status,
        "upstream_status": ctx.upstream_status if upstream else None,
        "upstream_addr": ctx.upstream_addr,
        "route_id": route.id if route is not None else None,
        "consumer": ctx.consumer_name,
        "request_id": ctx.request_id,
        "latency_ms": round(latency * 1000, 3),
        "upstream_latency_ms": round(ctx.upstream_latency * 1000, 3) if upstream else None,
        "bytes_sent": ctx.bytes_sent,
        "bytes_received": ctx.bytes_received,
        "user_agent": ctx.get_header("user-agent"),
    }
    if ctx.original_destination is not None:  # intercepted: where it was going, and how
        host, port = ctx.original_destination
        entry["original_destination"] = f"[{host}]:{port}" if ":" in host else \
            f"{host}:{port}"
        entry["intercept_mode"] = ctx.intercept_mode
    ai = ctx.vars.get(AI_RECORD_VAR) if ctx.vars else None
    if ai is not None:  # ai-proxy: provider, model, token figures (never the API key)
        entry["ai"] = ai.log_fields()
    return entry


# ctx.vars key of the AI request record (plugins/ai_proxy.py, ai/accounting.py).
AI_RECORD_VAR = "ai"


class AccessLogWriter:
    """Appends lines to one file. Get one with `writer_for(path)`."""

    __slots__ = ("_buffer", "_failing", "_fd", "_identity", "_size", "_timer", "_timer_loop",
                 "dropped_lines", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self.dropped_lines = 0  # lines lost to write errors (full disk, missing folder)
        self._buffer: list[bytes] = []
        self._size = 0
        self._fd = -1
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._failing = False

    def write(self, line: bytes) -> None:
        """Queue one line (ending in a newline)."""
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._timer is not None:
            if self._timer_loop is loop:
                return
            self._timer.cancel()  # left on a loop that has stopped running
        self._timer = loop.call_later(FLUSH_DELAY, self.flush)
        self._timer_loop = loop

    def flush(self) -> None:
        """Write the buffered lines now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_loop = None
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer = []
        self._size = 0
        try:
            fd = self._open()
            view = memoryview(data)
            while view:  # a short write means a full disk or a signal; go on after it
                view = view[os.write(fd, view):]
        except OSError as exc:
            self.dropped_lines += data.count(b"\n")
            if not self._failing:
                log.warning("access log %s: %s; dropping lines until it works again",
                            self.path, exc)
            self._failing = True
            self._close()
            return
        if self._failing:
            log.warning("access log %s: writing again (%d lines dropped so far)", self.path,
                        self.dropped_lines)
            self._failing = False

    def close(self) -> None:
        self.flush()
        self._close()

    def _open(self) -> int:
        """The open descriptor, reopened when the path no longer names the open file
        (logrotate moved or deleted it)."""
        if self._fd >= 0:
            try:
                status = os.stat(self.path)
                if (status.st_dev, status.st_ino) == self._identity:
                    return self._fd
            except FileNotFoundError:
                pass
            self._close()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     FILE_MODE)
        status = os.fstat(fd)
        self._fd, self._identity = fd, (status.st_dev, status.st_ino)
        return fd

    def _close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd, self._identity = -1, None

    def _forget_after_fork(self) -> None:
        # The parent writes what was buffered before the fork; its timer is not ours.
        self._buffer, self._size = [], 0
        self._timer = self._timer_loop = None


_WRITERS: dict[str, AccessLogWriter] = {}


def writer_for(path: str) -> AccessLogWriter:
    """The process's writer for `path` (created on first use; the file opens on the
    first flush)."""
    key = os.path.abspath(path)
    writer = _WRITERS.get(key)
    if writer is None:
        writer = _WRITERS[key] = AccessLogWriter(key)
    return writer


def flush_all() -> None:
    """Write every buffered line (at shutdown; also registered with atexit)."""
    for writer in list(_WRITERS.values()):
        writer.flush()


def close_all() -> None:
    """Flush and close every writer and forget them."""
    for writer in list(_WRITERS.values()):
        writer.close()
    _WRITERS.clear()


def _after_fork_in_child() -> None:
    for writer in _WRITERS.values():
        writer._forget_after_fork()


atexit.register(flush_all)
os.register_at_fork(after_in_child=_after_fork_in_child)
