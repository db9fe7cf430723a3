"""http-logger: send access log entries in batches to an HTTP(S) collector (APISIX options).

The request path only appends the entry to a bounded queue; a background task per logger
sends batches with aiohttp. A collector that is down or slow never blocks or slows requests:
entries beyond `max_pending_entries` are dropped and counted
(`sluicegate_http_logger_dropped_total{name,reason}` on /metrics).

The sender (`BatchSender`) is shared by every route and config snapshot that uses the same
http-logger options, so a reload neither loses queued entries nor opens a second connection
to the collector. Its task ends after `IDLE_EXIT_SECONDS` with nothing to send (closing its
session) and starts again with the next entry; when the worker stops, the task makes one
last attempt, bounded by `timeout` and `FINAL_FLUSH_SECONDS`, to send what is queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import ConfigDict, Field, field_validator

from sluicegate.http.context import RequestContext
from sluicegate.observe.access_log import UtcClock, access_entry
from sluicegate.plugins.base import Plugin, PluginConfig, PluginEnv, register

if TYPE_CHECKING:
    import aiohttp

    from sluicegate.observe.metrics import MetricsStore

log = logging.getLogger("sluicegate.http_logger")

# A sender task with nothing queued for this long ends and closes its connections; the next
# entry starts it again. Long enough to keep a connection for steady low traffic.
IDLE_EXIT_SECONDS = 30.0
# Longest a stopping worker waits for its last batches (at most `timeout`): a stop must
# stay well inside the drain budget supervisors give a process.
FINAL_FLUSH_SECONDS = 5.0
# One encoder: json.dumps with non-default options builds a new encoder per call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


class HttpLoggerConfig(PluginConfig):
    """http-logger options (APISIX's names and defaults)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    uri: str
    """Collector URL, `http://` or `https://`; entries are POSTed to it."""
    auth_header: str | None = None
    """Sent as the `Authorization` header of every POST (never logged)."""
    timeout: float = Field(3, gt=0, le=3600)
    """Seconds one POST (connect, send, response) may take."""
    name: str = Field("http logger", min_length=1, max_length=200)
    """Label of this logger in metrics and the gateway's log."""
    batch_max_size: int = Field(1000, ge=1, le=100_000)
    """Entries per POST; a full batch is sent at once."""
    inactive_timeout: float = Field(5, gt=0, le=86_400)
    """Seconds without a new entry after which a partial batch is sent."""
    buffer_duration: float = Field(60, gt=0, le=86_400)
    """Seconds the oldest waiting entry may wait before its (partial) batch is sent."""
    max_retry_count: int = Field(0, ge=0, le=100)
    """Retries of a batch the collector refused (non-2xx) or that failed (connect,
    timeout); after them the batch is dropped and counted."""
    retry_delay: float = Field(1, ge=0, le=3600)
    """Seconds between retries of a batch."""
    include_req_body: bool = False
    """Not supported: sluicegate does not buffer request bodies for logging. Accepted only
    as `false`, so APISIX configs load."""
    include_resp_body: bool = False
    """Add the response body (up to `max_resp_body_bytes`, decoded as UTF-8) as `resp_body`.
    The response is then sent chunked (its Content-Length is dropped)."""
    max_resp_body_bytes: int = Field(524_288, ge=1, le=64 * 1024 * 1024)
    """Bytes of the response body kept with `include_resp_body`."""
    concat_method: Literal["json", "new_line"] = "json"
    """`json`: a batch is one JSON array (`application/json`); `new_line`: one JSON object
    per line (`text/plain`). As in APISIX, a batch of one entry is the bare object."""
    ssl_verify: bool = True
    """Verify an https collector's certificate (system trust store)."""
    max_pending_entries: int = Field(10_000, ge=1, le=10_000_000)
    """Entries that may wait for the collector; newer entries beyond this are dropped and
    counted, so a down or slow collector costs bounded memory."""

    @field_validator("uri")
    @classmethod
    def _collector_url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if any(c in value for c in " \r\n\t"):
            raise ValueError("must not contain whitespace")
        return value

    @field_validator("auth_header")
    @classmethod
    def _header_value(cls, value: str | None) -> str | None:
        if value is not None and any(c in value for c in "\r\n\0"):
            raise ValueError("must be one line")
        return value

    @field_validator("include_req_body")
    @classmethod
    def _no_request_body(cls, value: bool) -> bool:
        if value:
            raise ValueError("not supported: sluicegate does not log request bodies")
        return value


class BatchSender:
    """The queue of one http-logger configuration and the task that empties it. Get one
    with `sender_for(conf, metrics)`."""

    __slots__ = ("__weakref__", "_failing", "_session", "_task", "_wake", "batch_max_size",
                 "conf", "counts", "headers", "last_added", "max_pending", "metrics", "name",
                 "queue")

    def __init__(self, conf: HttpLoggerConfig, metrics: MetricsStore | None) -> None:
        self.conf = conf
        self.name = conf.name
        self.metrics = metrics
        self.batch_max_size = conf.batch_max_size
        self.max_pending = conf.max_pending_entries
        # (monotonic time added, entry); the time decides buffer_duration.
        self.queue: collections.deque[tuple[float, dict[str, Any]]] = collections.deque()
        self.last_added = 0.0
        # Per-process totals, also counted into the worker's metrics store.
        self.counts = {"sent_entries": 0, "sent_batches": 0, "failed_batches": 0,
                       "dropped_queue_full": 0, "dropped_send_failed": 0}
        self.headers = {"Content-Type": "application/json" if conf.concat_method == "json"
                        else "text/plain", "User-Agent": "sluicegate-http-logger"}
        if conf.auth_header:
            self.headers["Authorization"] = conf.auth_header
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None
        self._failing = False

    def add(self, entry: dict[str, Any]) -> None:
        """Queue one entry (request path: no I/O, no waiting)."""
        queue = self.queue
        if len(queue) >= self.max_pending:
            self._count("dropped_queue_full", 1)
            return
        now = time.monotonic()
        queue.append((now, entry))
        self.last_added = now
        size = len(queue)
        if self._task is None:
            self._start()
        elif size == 1 or size == self.batch_max_size:
            assert self._wake is not None
            self._wake.set()  # the first entry starts the timers; a full batch goes now

    def _count(self, kind: str, amount: int) -> None:
        self.counts[kind] += amount
        if self.metrics is not None:
            self.metrics.count_http_logger(self.name, kind, amount)

    def _start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (CLI tools): entries wait for one
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name=f"http-logger {self.name}")
        _TASKS.add(self._task)  # a reference to every task: the loop keeps only weak ones
        self._task.add_done_callback(_TASKS.discard)

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        queue = self.queue
        try:
            while True:
                if not queue:
                    wake.clear()
                    if not await _wait(wake, IDLE_EXIT_SECONDS) and not queue:
                        return
                    continue
                if len(queue) < self.batch_max_size:
                    conf = self.conf
                    due = min(self.last_added + conf.inactive_timeout,
                              queue[0][0] + conf.buffer_duration)
                    delay = due - time.monotonic()
                    if delay > 0:
                        wake.clear()
                        await _wait(wake, delay)
                        continue
                await self._deliver(self._take())
        except asyncio.CancelledError:
            # The worker is stopping: one bounded try for what is queued, then stop.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._send_remaining(),
                                       min(self.conf.timeout, FINAL_FLUSH_SECONDS))
            raise
        finally:
            self._task = None
            if self._session is not None:
                session, self._session = self._session, None
                await session.close()

    def _take(self) -> list[dict[str, Any]]:
        queue = self.queue
        return [queue.popleft()[1] for _ in range(min(len(queue), self.batch_max_size))]

    async def _send_remaining(self) -> None:
        while self.queue:
            batch = self._take()
            if await self._post(self._body(batch)) is None:
                self._count("sent_batches", 1)
                self._count("sent_entries", len(batch))

    def _body(self, batch: list[dict[str, Any]]) -> bytes:
        if len(batch) == 1:
            return _encode(batch[0]).encode()
        if self.conf.concat_method == "json":
            return _encode(batch).encode()
        return "\n".join(_encode(entry) for entry in batch).encode()

    async def _deliver(self, batch: list[dict[str, Any]]) -> None:
        body = self._body(batch)
        conf = self.conf
        error = ""
        for attempt in range(conf.max_retry_count + 1):
            if attempt:
                await asyncio.sleep(conf.retry_delay)
            failure = await self._post(body)
            if failure is None:
                self._count("sent_batches", 1)
                self._count("sent_entries", len(batch))
                if self._failing:
                    self._failing = False
                    log.warning("http-logger %r: the collector accepts batches again",
                                self.name)
                return
            error = failure
        self._count("failed_batches", 1)
        self._count("dropped_send_failed", len(batch))
        if not self._failing:  # once per outage, not per batch
            self._failing = True
            log.warning("http-logger %r: dropped a batch of %d entries after %d attempts "
                        "(%s); dropping failed batches until the collector accepts again",
                        self.name, len(batch), conf.max_retry_count + 1, error)

    async def _post(self, body: bytes) -> str | None:
        """POST one batch; None on a 2xx answer, else what went wrong."""
        import aiohttp  # here, not at import: the CLI loads every plugin

        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.conf.ssl_verify),
                timeout=aiohttp.ClientTimeout(total=self.conf.timeout))
        try:
            async with session.post(self.conf.uri, data=body, headers=self.headers) as response:
                await response.read()
                if 200 <= response.status < 300:
                    return None
                return f"status {response.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    """Wait for `event` up to `timeout` seconds; True when it was set."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


_TASKS: set[asyncio.Task[None]] = set()
# Alive while a plugin instance (of any live snapshot) or its running task holds it.
_SENDERS: weakref.WeakValueDictionary[str, BatchSender] = weakref.WeakValueDictionary()


def sender_for(conf: HttpLoggerConfig, metrics: MetricsStore | None) -> BatchSender:
    """The process's sender for these options (shared across routes and reloads)."""
    key = conf.model_dump_json()
    sender = _SENDERS.get(key)
    if sender is None or sender.metrics is not metrics:
        sender = BatchSender(conf, metrics)
        _SENDERS[key] = sender
    return sender


@register
class HttpLogger(Plugin):
    """Sends one JSON entry per request to the collector at `uri`, in batches: the fields
    file-logger writes (`time`, `client_ip`, `method`, `uri` (path only), `host`, `status`,
    `upstream_status`, `upstream_addr`, `route_id`, `consumer`, `request_id`, `latency_ms`,
    `upstream_latency_ms`, `bytes_sent`, `bytes_received`, `user_agent`), plus `resp_body`
    with `include_resp_body`. No credentials are logged: no Authorization header, API key,
    cookie or query string."""

    name = "http-logger"
    priority = 410
    schema = HttpLoggerConfig

    def __init__(self, conf: HttpLoggerConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.sender = sender_for(conf, env.metrics)
        self.clock = UtcClock()
        if conf.include_resp_body:
            # Only then: a body_filter hook makes every response on the route filtered.
            self.body_filter = self._keep_body
            self.body_key = f"http-logger:{id(self)}"
            self.body_limit = conf.max_resp_body_bytes

    def _keep_body(self, ctx: RequestContext, chunk: bytes, eof: bool) -> bytes:
        if chunk:
            if ctx.vars is None:
                ctx.vars = {}
            kept = ctx.vars.get(self.body_key)
            if kept is None:
                kept = ctx.vars[self.body_key] = bytearray()
            room = self.body_limit - len(kept)
            if room > 0:
                kept += chunk[:room]
        return chunk

    def log(self, ctx: RequestContext) -> None:
        entry = access_entry(ctx, self.clock)
        if self.conf.include_resp_body:
            kept = ctx.vars.get(self.body_key) if ctx.vars else None
            entry["resp_body"] = bytes(kept).decode("utf-8", "replace") if kept else ""
        self.sender.add(entry)
