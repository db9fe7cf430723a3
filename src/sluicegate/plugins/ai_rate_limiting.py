"""ai-rate-limiting: at most `limit` LLM tokens per `time_window` seconds for each key.

A request's tokens are known only once its answer is complete (the provider's usage
figures, at the end of a stream too), so a request is admitted while its key's window has
budget left, and its tokens are charged after the response (the `log` phase, from the usage
ai-proxy recorded). The request that spends the budget completes; the next ones are
rejected until the window ends, with `Retry-After` saying when. This is how APISIX's
ai-rate-limiting works too (it charges limit-count in its log phase).

With ai-proxy the budgets of `instances` are named by provider; with ai-proxy-multi by
instance name, as in APISIX. Each request is charged to one budget: the instance's own
when it has one, else the route-wide `limit` (shared by every instance without its own).
On an ai-proxy-multi route whose `instances` are set, this plugin checks nothing in
`access`; it hands itself to ai-proxy-multi (ctx.vars, `BUDGET_GATE_VAR`) as the gate
asked about each instance it picks: an instance whose budget is spent is skipped, and the
request is rejected only when no instance with budget left remains. Tokens are charged to
the budget of the instance that answered (the last one admitted).

The counters are the rate-limit plugins' stores (limits/): a fixed window per key, exact
across the workers of a host (`policy: local`) or across gateways (`policy: redis`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sluicegate.http.context import RequestContext
from sluicegate.limits.charge import Charges
from sluicegate.limits.counters import CounterStore, CountResult
from sluicegate.limits.keys import compile_key, key_problems, limit_scope
from sluicegate.limits.options import (
    LimitOptions,
    PositiveInt,
    StoreFailure,
    StoreUnavailable,
    store_for,
)
from sluicegate.observe.access_log import AI_RECORD_VAR
from sluicegate.plugins.ai_proxy_multi import BUDGET_GATE_VAR
from sluicegate.plugins.base import HookResult, Plugin, PluginEnv, Response, register

log = logging.getLogger("sluicegate.ai")

LIMIT_HEADER = "X-AI-RateLimit-Limit-"
REMAINING_HEADER = "X-AI-RateLimit-Remaining-"
RESET_HEADER = "X-AI-RateLimit-Reset-"
# The header suffix (APISIX: the instance name) when no instance is named.
DEFAULT_INSTANCE = "ai-proxy"


class InstanceLimit(BaseModel):
    """The budget for requests to one provider (ai-proxy) or instance (ai-proxy-multi)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = Field(min_length=1)
    """With ai-proxy, the provider it names (`openai`, `gemini`, `wenxin`...); with
    ai-proxy-multi, an instance's `name`."""
    limit: PositiveInt
    """Tokens allowed per key in one `time_window` for this provider or instance."""
    time_window: PositiveInt
    """Length of this budget's window in seconds."""


class AiRateLimitingConfig(LimitOptions):
    """ai-rate-limiting options (APISIX's names). Which requests share a budget is set by
    `key_type` / `key` as in limit-count: by default the whole route (`key_type:
    constant`); per consumer with `key_type: var` and `key: consumer_name`."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    limit: PositiveInt | None = None
    """Tokens allowed per key in one `time_window`, for requests to every provider
    (ai-proxy) or instance (ai-proxy-multi) without an entry in `instances`, which share
    it. Give `limit` and `time_window`, or `instances`, or both."""
    time_window: PositiveInt | None = None
    """Length of the window in seconds. A window starts with the first request after the
    previous one ended."""
    limit_strategy: Literal["total_tokens", "prompt_tokens", "completion_tokens"] = \
        "total_tokens"
    """Which tokens count, from the provider's usage: `total_tokens` (prompt +
    completion), `prompt_tokens` or `completion_tokens`."""
    instances: list[InstanceLimit] = Field(default_factory=list)
    """Budgets per provider (ai-proxy) or per instance (ai-proxy-multi), each with its own
    counters, used instead of `limit` for requests to that provider or instance. With
    ai-proxy-multi an instance whose budget is spent is skipped when picking; the request
    is rejected only when every instance's budget is spent."""
    show_limit_quota_header: bool = True
    """Send `X-AI-RateLimit-Limit-<name>`, `X-AI-RateLimit-Remaining-<name>` and
    `X-AI-RateLimit-Reset-<name>` (seconds until the window ends) with each response.
    With ai-proxy `<name>` is the provider of an `instances` entry, `ai-proxy` for the
    route-wide `limit`; with ai-proxy-multi it is the instance that answered, whichever
    budget it used. Remaining is the budget left when the request was admitted (its own
    tokens are charged after it)."""
    key_type: Literal["var", "var_combination", "constant"] = "constant"
    """How `key` is read: `constant` (one budget for all requests), `var` (one variable,
    e.g. `consumer_name`), `var_combination` (`$consumer_name $http_x_team`)."""
    key: str = "route"
    """What budgets are kept by (see `key_type`). A variable that is unset or empty counts
    by `remote_addr`, as in APISIX."""
    rejected_code: int = Field(429, json_schema_extra={"minimum": 200, "maximum": 599})
    """Status of a request whose budget is spent; sent with `Retry-After` (seconds until
    the window ends)."""
    rejected_msg: str | None = None
    """`error.message` of the rejection (an OpenAI error object, so SDKs show it)."""

    @model_validator(mode="after")
    def _a_budget(self) -> AiRateLimitingConfig:
        if self.limit is None and self.time_window is not None:
            raise ValueError("limit: required with time_window")
        if self.limit is not None and self.time_window is None:
            raise ValueError("time_window: required with limit")
        if self.limit is None and not self.instances:
            raise ValueError("limit: required (with time_window) unless instances are given")
        seen: set[str] = set()
        for index, instance in enumerate(self.instances):
            if instance.name in seen:
                raise ValueError(f"instances[{index}].name: {instance.name!r} is listed twice")
            seen.add(instance.name)
        return self


HeaderNames = tuple[str, str, str]


def _header_names(name: str) -> HeaderNames:
    return LIMIT_HEADER + name, REMAINING_HEADER + name, RESET_HEADER + name


class _Budget:
    """One configured budget: how its counter keys are made, and its numbers."""

    __slots__ = ("headers", "key_of", "limit", "limit_text", "name", "window")

    def __init__(self, conf: AiRateLimitingConfig, name: str, limit: int, window: int,
                 scope: str) -> None:
        self.key_of = compile_key(conf.key_type, conf.key, scope)
        self.name = name
        self.headers = _header_names(name)
        self.limit = limit
        self.limit_text = str(limit)
        self.window = float(window)


def _rejection_body(conf: AiRateLimitingConfig) -> bytes:
    message = conf.rejected_msg or "token rate limit exceeded: this key's budget for the " \
        "current time window is spent"
    return json.dumps({"error": {"message": message, "type": "rate_limit_error",
                                 "param": None, "code": "rate_limit_exceeded"}}).encode()


@register
class AiRateLimiting(Plugin):
    """Rejects a key's LLM requests once the tokens its answers used in the current window
    reached `limit` (with `rejected_code`, default 429, and `Retry-After`). Tokens are
    charged when an answer is complete, from the usage ai-proxy recorded; answers without
    usage (provider errors) cost nothing. With the local policy a budget is exact across
    the gateway's workers; with the redis policy, across every gateway using the server."""

    name = "ai-rate-limiting"
    # Checks in `access`, before ai-proxy serves (before_proxy); APISIX's priority.
    priority = 1030
    schema = AiRateLimitingConfig

    def __init__(self, conf: AiRateLimitingConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.store: CounterStore = store_for(conf)
        scope = limit_scope(self.name, conf, env)
        self.default: _Budget | None = None
        if conf.limit is not None and conf.time_window is not None:
            self.default = _Budget(conf, DEFAULT_INSTANCE, conf.limit, conf.time_window,
                                   scope)
        self.instances = {
            instance.name: _Budget(conf, instance.name, instance.limit, instance.time_window,
                                   f"{scope}{instance.name}|")
            for instance in conf.instances}
        self.tokens_field = conf.limit_strategy
        self.rejected_status = conf.rejected_code
        self.rejected_body = _rejection_body(conf)
        self.store_failure = StoreFailure(self.name, conf, env)
        # ctx.vars entries of a request: the budget it is admitted on, (budget, counter
        # key or None when rejected, remaining, reset seconds, header names or None for
        # "the instance that answered"); and with ai-proxy-multi, the spent budget that
        # frees up first, (budget, reset seconds, instance).
        self.state_key = f"{self.name}#{id(self)}"
        self.spent_key = f"{self.name}#{id(self)}#spent"
        # Header names per ai-proxy-multi instance, made once (instance names come from
        # the config, so this stays small).
        self.instance_headers: dict[str, HeaderNames] = {}
        # Tokens are charged after the response (with redis, as tasks of their own).
        self.charges = Charges(self.name, self.store_failure)
        if conf.show_limit_quota_header:
            self.header_filter = self._header_filter

    @classmethod
    def check(cls, conf: AiRateLimitingConfig) -> list[str]:
        if conf.key_type != "constant" and conf.key == "route":
            # The constant's default left in place: as a variable it would count by client
            # address, which nobody asking for `var` means.
            return [f"key: required with key_type {conf.key_type} (e.g. consumer_name)"]
        return key_problems(conf.key_type, conf.key)

    @classmethod
    def check_siblings(cls, conf: Any, plugins: dict[str, Any]) -> list[str]:
        """An `instances` name must name what serves next to it: an ai-proxy-multi
        instance, or ai-proxy's provider. Any other name is a budget no request is ever
        charged to."""
        instances = conf.get("instances") if isinstance(conf, dict) else None
        if not isinstance(instances, list) or not instances:
            return []
        multi, single = plugins.get("ai-proxy-multi"), plugins.get("ai-proxy")
        if isinstance(multi, dict) and isinstance(multi.get("instances"), list):
            known = [i.get("name") for i in multi["instances"] if isinstance(i, dict)]
            what, listed = "no ai-proxy-multi instance", "its instances"
        elif isinstance(single, dict) and isinstance(single.get("provider"), str):
            known = [single["provider"]]
            what, listed = "not the provider of ai-proxy", "provider"
        else:
            return []  # served by plugins configured elsewhere (a service, a global rule)
        return [f"instances[{index}].name: {entry['name']!r} is {what} configured with it "
                f"({listed}: {', '.join(repr(name) for name in known)}); no request would "
                "be charged to this budget"
                for index, entry in enumerate(instances)
                if isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and entry["name"] not in known]

    def _names_of(self, instance: str) -> HeaderNames:
        names = self.instance_headers.get(instance)
        if names is None:
            names = self.instance_headers[instance] = _header_names(instance)
        return names

    # -- before the request: is there budget left? -------------------------------------
    def access(self, ctx: RequestContext) -> HookResult:
        budget = self.default
        # None: the headers name the ai-proxy-multi instance that answers, else the budget.
        names: HeaderNames | None = None
        if self.instances:
            server = _server_of(ctx)
            if server is not None and server.name == "ai-proxy-multi":
                # Which budget applies is known once an instance is picked: ai-proxy-multi
                # asks `admit` about each one it picks.
                if ctx.vars is None:
                    ctx.vars = {}
                ctx.vars[BUDGET_GATE_VAR] = self
                return None
            budget = self.instances.get(getattr(server, "provider", ""), budget)
            if budget is not None:
                names = budget.headers
        # Else only the route-wide budget, shared by every provider or instance: checked
        # now, before the body is read.
        if budget is None:  # a provider without a budget of its own, and no route-wide one
            return None
        key = budget.key_of(ctx)
        # Cost 0: a read that also starts the window. Charges fill a window up to exactly
        # its limit, so "remaining 0" is "spent".
        result = self.store.incr(key, budget.limit, budget.window, False, 0)
        if type(result) is not tuple:
            return self._decide_later(result, ctx, budget, key, names)
        return self._decide(result, ctx, budget, key, names)

    async def _decide_later(self, pending: Awaitable[CountResult], ctx: RequestContext,
                            budget: _Budget, key: str, names: HeaderNames | None
                            ) -> Response | None:
        try:
            result = await pending
        except StoreUnavailable:
            return self.store_failure()
        return self._decide(result, ctx, budget, key, names)

    def _decide(self, result: CountResult, ctx: RequestContext, budget: _Budget, key: str,
                names: HeaderNames | None) -> Response | None:
        allowed, remaining, reset = result
        reset_seconds = max(math.ceil(reset), 0)
        if ctx.vars is None:
            ctx.vars = {}
        if allowed and remaining > 0:
            ctx.vars[self.state_key] = (budget, key, remaining, reset_seconds, names)
            return None
        # Rejected: nothing to charge later, but the quota headers still go out.
        ctx.vars[self.state_key] = (budget, None, 0, reset_seconds, budget.headers)
        return self._rejected(reset_seconds)

    def _rejected(self, reset_seconds: int) -> Response:
        return Response(self.rejected_status, self.rejected_body,
                        [("Content-Type", "application/json"),
                         ("Retry-After", str(max(reset_seconds, 1)))])

    # -- ai-proxy-multi's gate (plugins/ai_proxy_multi.py BudgetGate) ---------------------
    def admit(self, ctx: RequestContext, instance: str
              ) -> bool | Response | Awaitable[bool | Response]:
        """Has `instance` budget left? If so it becomes the budget this request is charged
        to (the instance tried last is the one that answered)."""
        budget = self.instances.get(instance, self.default)
        if budget is None:  # an instance without a budget, and no route-wide one
            ctx.vars.pop(self.state_key, None)  # type: ignore[union-attr]
            return True
        key = budget.key_of(ctx)
        result = self.store.incr(key, budget.limit, budget.window, False, 0)
        if type(result) is not tuple:
            return self._admit_later(result, ctx, budget, key, instance)
        return self._admit(result, ctx, budget, key, instance)

    async def _admit_later(self, pending: Awaitable[CountResult], ctx: RequestContext,
                           budget: _Budget, key: str, instance: str) -> bool | Response:
        try:
            result = await pending
        except StoreUnavailable:
            failed = self.store_failure()
            if failed is None:  # allow_degradation: served, and not charged
                ctx.vars.pop(self.state_key, None)  # type: ignore[union-attr]
                return True
            return failed
        return self._admit(result, ctx, budget, key, instance)

    def _admit(self, result: CountResult, ctx: RequestContext, budget: _Budget, key: str,
               instance: str) -> bool:
        allowed, remaining, reset = result
        reset_seconds = max(math.ceil(reset), 0)
        variables: dict[str, Any] = ctx.vars  # type: ignore[assignment]
        if allowed and remaining > 0:
            variables[self.state_key] = (budget, key, remaining, reset_seconds,
                                         self._names_of(instance))
            return True
        spent = variables.get(self.spent_key)
        if spent is None or reset_seconds < spent[1]:
            variables[self.spent_key] = (budget, reset_seconds, instance)
        return False

    def rejection(self, ctx: RequestContext) -> Response:
        """Every instance's budget is spent: Retry-After says when the first frees up, and
        the quota headers are that instance's."""
        variables: dict[str, Any] = ctx.vars  # type: ignore[assignment]
        budget, reset_seconds, instance = variables[self.spent_key]
        variables[self.state_key] = (budget, None, 0, reset_seconds,
                                     self._names_of(instance))
        return self._rejected(reset_seconds)

    def _header_filter(self, ctx: RequestContext) -> None:
        state = ctx.vars.get(self.state_key) if ctx.vars else None
        if state is None:  # an earlier plugin answered before this one looked
            return
        budget, _, remaining, reset, names = state
        if names is None:  # the route-wide budget: ai-proxy-multi's instance that answered
            instance = getattr(ctx.vars.get(AI_RECORD_VAR), "instance", None)  # type: ignore[union-attr]
            names = self._names_of(instance) if instance else budget.headers
        lower = {name.lower() for name in names}
        headers = [(k, v) for k, v in ctx.response_headers if k.lower() not in lower]
        headers += ((names[0], budget.limit_text), (names[1], str(remaining)),
                    (names[2], str(reset)))
        ctx.response_headers = headers

    # -- after the response: charge its tokens ----------------------------------------------
    def log(self, ctx: RequestContext) -> None:
        state = ctx.vars.get(self.state_key) if ctx.vars else None
        if state is None or state[1] is None:
            return
        record = ctx.vars.get(AI_RECORD_VAR) if ctx.vars else None
        usage = getattr(record, "usage", None)
        if usage is None:
            return
        tokens = int(getattr(usage, self.tokens_field) or 0)
        if tokens <= 0:
            return
        budget = state[0]
        self.charges.charge(self.store, state[1], budget.limit, budget.window, tokens)


def _server_of(ctx: RequestContext) -> Plugin | None:
    """The route's ai-proxy or ai-proxy-multi (it serves after this plugin's check, so
    its record does not exist yet: read the route's chain)."""
    route = ctx.route
    if route is None:
        return None
    for plugin in route.chain.plugins:
        if plugin.name == "ai-proxy" or plugin.name == "ai-proxy-multi":
            return plugin
    return None
