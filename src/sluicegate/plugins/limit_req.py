"""limit-req: a leaky bucket per key (nginx limit_req, lua-resty-limit-req)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from pydantic import ConfigDict

from sluicegate.http.context import RequestContext
from sluicegate.limits.counters import BucketResult
from sluicegate.limits.keys import compile_key, key_problems, limit_scope
from sluicegate.limits.options import (
    MIN_DELAY_SECONDS,
    LimitOptions,
    NonNegativeNumber,
    PositiveNumber,
    StoreFailure,
    StoreUnavailable,
    rejection,
    store_for,
)
from sluicegate.plugins.base import HookResult, Plugin, PluginEnv, Response, register


class LimitReqConfig(LimitOptions):
    """limit-req options."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    rate: PositiveNumber
    """Requests a second each key may make: the rate the bucket leaks at."""
    burst: NonNegativeNumber
    """Requests beyond the rate a key may have waiting; past it requests are rejected."""
    nodelay: bool = False
    """false: requests within the burst are delayed to keep to the rate. true: they pass
    at once (the burst is still bounded)."""


@register
class LimitReq(Plugin):
    """Keeps each key to `rate` requests a second: a request over the rate waits its turn
    (or passes at once with `nodelay`) while no more than `burst` are ahead of it, and is
    rejected with `rejected_code` beyond that."""

    name = "limit-req"
    priority = 1001
    schema = LimitReqConfig

    def __init__(self, conf: LimitReqConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.store = store_for(conf)
        self.key_of = compile_key(conf.key_type, conf.key, limit_scope(self.name, conf, env))
        self.rate = conf.rate
        self.burst = conf.burst
        self.nodelay = conf.nodelay
        self.rejection = rejection(conf)
        self.store_failure = StoreFailure(self.name, conf, env)

    @classmethod
    def check(cls, conf: LimitReqConfig) -> list[str]:
        return key_problems(conf.key_type, conf.key)

    def access(self, ctx: RequestContext) -> HookResult:
        result = self.store.leaky_bucket(self.key_of(ctx), self.rate, self.burst)
        if type(result) is not tuple:
            return self._decide_later(result)
        allowed, delay = result
        if not allowed:
            return self.rejection
        if delay >= MIN_DELAY_SECONDS and not self.nodelay:
            return asyncio.sleep(delay)  # the exchange resumes the chain when it ends
        return None

    async def _decide_later(self, pending: Awaitable[BucketResult]) -> Response | None:
        try:
            allowed, delay = await pending
        except StoreUnavailable:
            return self.store_failure()
        if not allowed:
            return self.rejection
        if delay >= MIN_DELAY_SECONDS and not self.nodelay:
            await asyncio.sleep(delay)
        return None
