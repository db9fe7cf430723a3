"""limit-conn: a bound on the requests of each key in flight at once (nginx limit_conn,
lua-resty-limit-conn)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any

from pydantic import ConfigDict

from sluicegate.http.context import RequestContext
from sluicegate.limits.counters import ConnResult
from sluicegate.limits.keys import compile_key, key_problems, limit_scope
from sluicegate.limits.options import (
    MIN_DELAY_SECONDS,
    LimitOptions,
    NonNegativeInt,
    PositiveInt,
    PositiveNumber,
    StoreFailure,
    StoreUnavailable,
    rejection,
    store_for,
)
from sluicegate.plugins.base import HookResult, Plugin, PluginEnv, Response, register


class LimitConnConfig(LimitOptions):
    """limit-conn options."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    conn: PositiveInt
    """Requests of one key served at once without delay."""
    burst: NonNegativeInt
    """Requests beyond `conn` admitted after a delay; past `conn + burst` in flight, a
    request is rejected."""
    default_conn_delay: PositiveNumber
    """Seconds a request beyond `conn` waits per `conn` requests ahead of it (the first
    `conn` excess requests wait once this, the next `conn` twice...)."""
    only_use_default_delay: bool = False
    """true: always delay by `default_conn_delay`. false: the unit delay follows the
    latency of finished requests (its running mean with each new latency), as in APISIX."""
    key_ttl: PositiveInt = 3600
    """Policy redis: seconds a key's count outlives its last change, so a count that a
    gateway never gave back (it crashed, or Redis was down at the release) frees itself."""


@register
class LimitConn(Plugin):
    """Counts a key's requests in flight from `access` to `log`: up to `conn` pass, up to
    `conn + burst` pass after a delay, more are rejected with `rejected_code`. With the
    local policy the count covers all the gateway's workers; with the redis policy, every
    gateway using the Redis server."""

    name = "limit-conn"
    priority = 1003
    schema = LimitConnConfig

    def __init__(self, conf: LimitConnConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.store = store_for(conf, conn_ttl=conf.key_ttl)
        self.key_of = compile_key(conf.key_type, conf.key, limit_scope(self.name, conf, env))
        self.conn = conf.conn
        self.most = conf.conn + conf.burst
        # This worker's unit delay; adapts unless only_use_default_delay (APISIX keeps it
        # per worker too).
        self.unit_delay = conf.default_conn_delay
        self.adaptive = not conf.only_use_default_delay
        self.rejection = rejection(conf)
        self.store_failure = StoreFailure(self.name, conf, env)
        self.state_key = f"{self.name}#{id(self)}"
        self.releases: set[asyncio.Future[Any]] = set()  # a network store's, in flight

    @classmethod
    def check(cls, conf: LimitConnConfig) -> list[str]:
        return key_problems(conf.key_type, conf.key)

    def access(self, ctx: RequestContext) -> HookResult:
        key = self.key_of(ctx)
        result = self.store.acquire(key, self.most)
        if type(result) is not tuple:
            return self._admit_later(result, ctx, key)
        delay = self._admit(result, ctx, key)
        if delay is None:
            return self.rejection
        return asyncio.sleep(delay) if delay >= MIN_DELAY_SECONDS else None

    async def _admit_later(self, pending: Awaitable[ConnResult], ctx: RequestContext,
                           key: str) -> Response | None:
        try:
            result = await pending
        except StoreUnavailable:  # not admitted by the store: nothing to release later
            return self.store_failure()
        delay = self._admit(result, ctx, key)
        if delay is None:
            return self.rejection
        if delay >= MIN_DELAY_SECONDS:
            await asyncio.sleep(delay)
        return None

    def _admit(self, result: ConnResult, ctx: RequestContext, key: str) -> float | None:
        """The delay for an admitted request (remembered for `log`), None when rejected."""
        allowed, count = result
        if not allowed:
            return None
        delay = self.unit_delay * ((count - 1) // self.conn) if count > self.conn else 0.0
        if ctx.vars is None:
            ctx.vars = {}
        ctx.vars[self.state_key] = (key, delay)
        return delay

    def log(self, ctx: RequestContext) -> None:
        state = ctx.vars.pop(self.state_key, None) if ctx.vars else None
        if state is None:  # not admitted by this plugin: nothing to give back
            return
        key, delay = state
        left = self.store.release(key)
        if type(left) is not int:  # a network store: let it finish, keep a reference
            task = asyncio.ensure_future(_release_later(left))
            self.releases.add(task)
            task.add_done_callback(self.releases.discard)
        if self.adaptive:
            latency = time.monotonic() - ctx.start_time - delay
            self.unit_delay = (latency + self.unit_delay) / 2


async def _release_later(pending: Awaitable[int]) -> None:
    # A failed release leaves the count high until key_ttl expires it; the store has
    # logged the outage.
    with contextlib.suppress(StoreUnavailable):
        await pending
