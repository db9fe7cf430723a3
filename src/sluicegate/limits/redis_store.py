"""The `redis` policy: counters in one Redis server shared by every gateway node using it.

A limit key is one Redis key (`sluicegate:` + the limit key), whatever node counts against
it, so a limit holds for the whole cluster of gateways. Each operation is one Lua script run
atomically by Redis (EVALSHA; the script is loaded again after a Redis restart empties its
script cache) doing what the `*_step` function of `counters` does, on Redis's clock (`TIME`)
so the gateways' clocks need not agree. Every key carries a TTL: a window or a bucket
expires when it no longer matters, and a limit-conn count that a crashed gateway never gave
back expires after `key_ttl`.

A process keeps one connection pool per Redis server and credentials (per event loop),
shared by all the limits using it. When Redis cannot answer (refused, reset, timed out,
refused our credentials) the call raises `StoreUnavailable` and the server is marked down:
calls then fail at once for a short back-off (doubling from `BACKOFF_MIN_SECONDS` up to
`BACKOFF_MAX_SECONDS`), after which one call probes it while the others still fail fast. So
a Redis outage costs the request path no reconnect storm, and the limits decide
(`allow_degradation`) whether failing requests pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from sluicegate.limits.counters import BucketResult, ConnResult, CounterStore, CountResult

log = logging.getLogger("sluicegate.limits")

KEY_PREFIX = "sluicegate:"
# Connections per server per process; APISIX keeps 100 idle per worker (set_keepalive).
# Past this many commands in flight, callers wait for a connection (within the timeout).
POOL_SIZE = 100
# Fail-fast period after a failure, doubled by each failed probe up to the maximum: short
# enough that limiting resumes within ~2 s of Redis coming back.
BACKOFF_MIN_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 2.0
# limit-conn counts live this long after their last change (APISIX's key_ttl default): a
# count a crashed gateway never released frees itself.
DEFAULT_CONN_TTL_SECONDS = 3600

# The Lua scripts mirror counters.count_step / bucket_step / acquire_step / release_step.
# A state is a hash; field `e` is its expiry on Redis's clock, and the key also expires
# then (PEXPIREAT), so an expired state reads as none, as in the local stores. Floats go
# back as strings: Redis truncates a Lua number reply to an integer.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

COUNT_SCRIPT = _NOW + """
local limit, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local sliding, cost = ARGV[3] == '1', tonumber(ARGV[4])
local s = redis.call('HMGET', KEYS[1], 'e', 's', 'c', 'p')
local start, current, previous
if s[1] and tonumber(s[1]) > now then
  start, current, previous = tonumber(s[2]), tonumber(s[3]), tonumber(s[4])
  -- Redis's clock stepped back: hold time at the window start rather than stretch it.
  if now < start then now = start end
  local elapsed = now - start
  if elapsed >= window then
    if sliding then
      local periods = math.floor(elapsed / window)
      if periods == 1 then previous = current else previous = 0 end
      start = start + periods * window
    else
      start, previous = now, 0
    end
    current = 0
  end
else
  start, current, previous = now, 0, 0
end
local used = current
if previous > 0 then used = used + previous * (1 - (now - start) / window) end
local reset = start + window - now
if used + cost > limit then
  return {0, 0, string.format('%.6f', reset)}
end
current = current + cost
local expires = start + window
if sliding then expires = start + 2 * window end
redis.call('HSET', KEYS[1], 'e', expires, 's', start, 'c', current, 'p', previous)
redis.call('PEXPIREAT', KEYS[1], math.ceil(expires * 1000))
return {1, math.floor(limit - used - cost), string.format('%.6f', reset)}
"""

BUCKET_SCRIPT = _NOW + """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'e', 'x', 'l')
local excess = 0
if s[1] and tonumber(s[1]) > now then
  excess = math.max(tonumber(s[2]) - rate * math.abs(now - tonumber(s[3])) + 1, 0)
  if excess > burst then return {0, '0'} end
end
local expires = now + (excess + 1) / rate
redis.call('HSET', KEYS[1], 'e', expires, 'x', excess, 'l', now)
redis.call('PEXPIREAT', KEYS[1], math.ceil(expires * 1000))
return {1, string.format('%.6f', excess / rate)}
"""

ACQUIRE_SCRIPT = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0') + 1
if count > tonumber(ARGV[1]) then return {0, count - 1} end
redis.call('SET', KEYS[1], count, 'PX', ARGV[2])
return {1, count}
"""

RELEASE_SCRIPT = """
local value = redis.call('GET', KEYS[1])
if not value then return 0 end
local count = tonumber(value) - 1
if count <= 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('SET', KEYS[1], count, 'PX', ARGV[1])
return count
"""


SCRIPTS = {"count": COUNT_SCRIPT, "bucket": BUCKET_SCRIPT, "acquire": ACQUIRE_SCRIPT,
           "release": RELEASE_SCRIPT}


class StoreUnavailable(Exception):
    """The counter store could not answer: the limit's `allow_degradation` decides."""


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """How to reach one Redis server. Equal settings share one connection pool."""

    host: str
    port: int = 6379
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs or reprs
    database: int = 0
    timeout: float = 1.0  # seconds, for connecting and for each command
    ssl: bool = False

    @property
    def address(self) -> str:
        """Where it is, for logs (no credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}/{self.database}"


class RedisServer:
    """One Redis server as this process's event loop reaches it: the connection pool, the
    registered scripts, and whether it is down (failing fast until `down_until`)."""

    __slots__ = ("backoff", "batch", "client", "down_until", "probing", "sending", "settings",
                 "shas")

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        pool = BlockingConnectionPool(
            connection_class=SSLConnection if settings.ssl else Connection,
            host=settings.host, port=settings.port, db=settings.database,
            username=settings.username, password=settings.password,
            socket_timeout=settings.timeout, socket_connect_timeout=settings.timeout,
            # One immediate retry, on a fresh connection: a pooled connection that Redis
            # closed (restart, idle timeout) fails once. redis-py's default retries with
            # backoff of seconds, which would hold requests far past redis_timeout.
            retry=Retry(NoBackoff(), 1),
            max_connections=POOL_SIZE, timeout=settings.timeout)
        self.client = Redis(connection_pool=pool)
        self.shas = {name: hashlib.sha1(text.encode()).hexdigest()
                     for name, text in SCRIPTS.items()}
        self.batch: list[Any] = []  # (script, key, args, future, probe) of this loop turn
        self.sending: set[asyncio.Task[None]] = set()
        self.down_until = 0.0  # 0 while up
        self.backoff = BACKOFF_MIN_SECONDS
        self.probing = False

    async def run(self, script: str, key: str, args: tuple[Any, ...]) -> Any:
        """Run one script on one key; StoreUnavailable when Redis cannot answer.

        Calls made in the same event-loop turn go to Redis as one pipeline (one round trip,
        one connection): with many requests in flight this is what keeps the per-request
        cost of the redis policy down (docs/benchmarks.md, control plane)."""
        probe = False
        if self.down_until:
            if self.probing or time.monotonic() < self.down_until:
                raise StoreUnavailable(f"redis {self.settings.address} is down")
            self.probing = probe = True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.batch.append((script, key, args, future, probe))
        if len(self.batch) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self.batch = self.batch, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    async def _send(self, batch: list[Any]) -> None:
        probe = any(entry[4] for entry in batch)
        try:
            # The whole exchange, retry and pool wait included, stays within redis_timeout.
            async with asyncio.timeout(self.settings.timeout):
                results = await self._execute(batch)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc, probe)
            error = StoreUnavailable(f"redis {self.settings.address}: {_describe(exc)}")
            for entry in batch:
                if not entry[3].done():
                    entry[3].set_exception(error)
            return
        finally:
            if probe:
                self.probing = False
        if self.down_until:
            log.info("redis %s answers again: limits using it count there again",
                     self.settings.address)
            self.down_until = 0.0
            self.backoff = BACKOFF_MIN_SECONDS
        for entry, result in zip(batch, results, strict=True):
            future = entry[3]
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(StoreUnavailable(
                    f"redis {self.settings.address}: {_describe(result)}"))
            else:
                future.set_result(result)

    async def _execute(self, batch: list[Any]) -> list[Any]:
        results = await self._pipeline(batch)
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            # Redis lost its script cache (a restart): load the scripts and run again only
            # the calls that did not run.
            for name in {batch[i][0] for i in missing}:
                await self.client.script_load(SCRIPTS[name])
            again = await self._pipeline([batch[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _pipeline(self, batch: list[Any]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for script, key, args, _, _ in batch:
                pipe.evalsha(self.shas[script], 1, KEY_PREFIX + key, *args)
            return list(await pipe.execute(raise_on_error=False))

    def _failed(self, exc: BaseException, probe: bool) -> None:
        if self.down_until and not probe:
            return  # a call already in flight when another failure marked it down
        if probe:
            self.backoff = min(self.backoff * 2.0, BACKOFF_MAX_SECONDS)
            log.debug("redis %s still unavailable: %s", self.settings.address,
                      _describe(exc))
        else:
            log.warning("redis %s unavailable (%s): limits using it fail fast, retrying "
                        "from %.1fs on", self.settings.address, _describe(exc), self.backoff)
        self.down_until = time.monotonic() + self.backoff


def _describe(exc: BaseException) -> str:
    # redis-py's messages name the address, never the credentials.
    return f"{type(exc).__name__}: {str(exc) or 'timed out'}"


# Event loop -> settings -> server: connections belong to the loop that opened them.
_servers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[RedisSettings,
                                                                     RedisServer]] = \
    weakref.WeakKeyDictionary()


def redis_server(settings: RedisSettings) -> RedisServer:
    """The shared server object for these settings on the running event loop."""
    loop = asyncio.get_running_loop()
    servers = _servers.get(loop)
    if servers is None:
        servers = _servers[loop] = {}
    server = servers.get(settings)
    if server is None:
        server = servers[settings] = RedisServer(settings)
    return server


class RedisStore(CounterStore):
    """Counters in Redis, exact across every gateway node sharing the server. Methods
    return coroutines (the plugins await them) that raise `StoreUnavailable` when Redis
    cannot answer. Building one does no I/O: the connection opens on first use."""

    __slots__ = ("_loop", "_server", "conn_ttl_ms", "settings")

    def __init__(self, settings: RedisSettings,
                 conn_ttl: float = DEFAULT_CONN_TTL_SECONDS) -> None:
        self.settings = settings
        self.conn_ttl_ms = max(int(conn_ttl * 1000), 1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: RedisServer | None = None

    def __repr__(self) -> str:
        return f"RedisStore({self.settings.address})"

    def _run(self, script: str, key: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._server is None:
            self._server, self._loop = redis_server(self.settings), loop
        return self._server.run(script, key, args)

    async def _count(self, key: str, limit: int, window: float, sliding: bool,
                     cost: int) -> CountResult:
        allowed, remaining, reset = await self._run("count", key, limit, window,
                                                    1 if sliding else 0, cost)
        return bool(allowed), int(remaining), float(reset)

    def incr(self, key: str, limit: int, window: float, sliding: bool = False,
             cost: int = 1) -> Any:
        return self._count(key, limit, window, sliding, cost)

    async def _bucket(self, key: str, rate: float, burst: float) -> BucketResult:
        allowed, delay = await self._run("bucket", key, rate, burst)
        return bool(allowed), float(delay)

    def leaky_bucket(self, key: str, rate: float, burst: float) -> Any:
        return self._bucket(key, rate, burst)

    async def _acquire(self, key: str, limit: int) -> ConnResult:
        allowed, count = await self._run("acquire", key, limit, self.conn_ttl_ms)
        return bool(allowed), int(count)

    def acquire(self, key: str, limit: int) -> Any:
        return self._acquire(key, limit)

    async def _release(self, key: str) -> int:
        return int(await self._run("release", key, self.conn_ttl_ms))

    def release(self, key: str) -> Any:
        return self._release(key)
