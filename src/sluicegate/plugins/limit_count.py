"""limit-count: at most `count` requests per `time_window` seconds for each key."""

from __future__ import annotations

import math
from collections.abc import Awaitable
from typing import Literal

from pydantic import ConfigDict, field_validator

from sluicegate.http.context import RequestContext
from sluicegate.limits.counters import CountResult
from sluicegate.limits.keys import compile_key, key_problems, limit_scope
from sluicegate.limits.options import (
    LimitOptions,
    PositiveInt,
    StoreFailure,
    StoreUnavailable,
    rejection,
    store_for,
)
from sluicegate.plugins.base import HookResult, Plugin, PluginEnv, Response, register

LIMIT_HEADER = "X-RateLimit-Limit"
REMAINING_HEADER = "X-RateLimit-Remaining"
RESET_HEADER = "X-RateLimit-Reset"
_QUOTA_NAMES = frozenset(h.lower().encode() for h in (LIMIT_HEADER, REMAINING_HEADER, RESET_HEADER))


class LimitCountConfig(LimitOptions):
    """limit-count options."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    count: PositiveInt
    """Requests allowed per key in one `time_window`."""
    time_window: PositiveInt
    """Length of the window in seconds."""
    window_type: Literal["fixed", "sliding"] = "fixed"
    """`fixed`: a window starts with the first request after the previous one ended and
    allows `count`. `sliding`: windows follow each other and the previous window's count,
    weighted by how much of it the last `time_window` seconds still cover, counts too, which
    smooths the burst a fixed window allows at its boundary."""
    show_limit_quota_header: bool = True
    """Send `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset` (seconds
    until the window ends) with every response, rejections included."""
    group: str | None = None
    """Routes with the same group share one counter (give them the same `count` and
    `time_window`)."""

    @field_validator("group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("must not be empty")
        return value


@register
class LimitCount(Plugin):
    """Rejects a key's requests beyond `count` in `time_window` with `rejected_code`. With
    the local policy the count is exact across the gateway's workers; with the redis
    policy, across every gateway using the Redis server."""

    name = "limit-count"
    priority = 1002
    schema = LimitCountConfig

    def __init__(self, conf: LimitCountConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.store = store_for(conf)
        self.key_of = compile_key(conf.key_type, conf.key,
                                  limit_scope(self.name, conf, env, conf.group))
        self.count = conf.count
        self.window = float(conf.time_window)
        self.sliding = conf.window_type == "sliding"
        self.rejection = rejection(conf)
        self.store_failure = StoreFailure(self.name, conf, env)
        self.show_headers = conf.show_limit_quota_header
        self.limit_header = str(conf.count)
        self.raw_head = (f"{LIMIT_HEADER}: {conf.count}\r\n{REMAINING_HEADER}: %s\r\n"
                         f"{RESET_HEADER}: %s\r\n").encode("latin-1")

    @classmethod
    def check(cls, conf: LimitCountConfig) -> list[str]:
        return key_problems(conf.key_type, conf.key)

    def access(self, ctx: RequestContext) -> HookResult:
        result = self.store.incr(self.key_of(ctx), self.count, self.window, self.sliding)
        if type(result) is not tuple:
            return self._decide_later(result, ctx)
        return self._decide(result, ctx)

    async def _decide_later(self, pending: Awaitable[CountResult], ctx: RequestContext
                            ) -> Response | None:
        try:
            result = await pending
        except StoreUnavailable:
            return self.store_failure()
        return self._decide(result, ctx)

    def _decide(self, result: CountResult, ctx: RequestContext) -> Response | None:
        allowed, remaining, reset = result
        if self.show_headers:
            # Known now, so no header_filter (which would cost every response a rebuild);
            # also given encoded, for the raw response path.
            remaining_text, reset_text = str(remaining), str(max(math.ceil(reset), 0))
            ctx.add_response_headers(
                ((LIMIT_HEADER, self.limit_header), (REMAINING_HEADER, remaining_text),
                 (RESET_HEADER, reset_text)),
                self.raw_head % (remaining_text.encode(), reset_text.encode()), _QUOTA_NAMES)
        return None if allowed else self.rejection
