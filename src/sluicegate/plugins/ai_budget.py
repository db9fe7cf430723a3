"""ai-budget: what AI requests cost in USD, and a spending cap per consumer.

`prices` gives each model's USD per million prompt and completion tokens. After each
answer (the `log` phase) the request's cost is computed from the token figures ai-proxy or
ai-proxy-multi recorded (for the model and provider that actually answered), added to
`sluicegate_ai_spend_usd_total{route,consumer,provider,model}` and to the access log
(`ai.cost_usd`), and charged to the consumer's budget. A request is admitted while its
consumer has budget left in the current window (`time_window` seconds, or the gateway's
lifetime without one); the request that spends the budget completes, the next ones get 429
with an OpenAI-style `insufficient_quota` error (what OpenAI answers when an account's
quota is spent, so SDK users see the familiar shape), until the window ends.

A plugin of its own rather than options of ai-proxy: prices and budgets are a billing
concern that applies whichever AI plugin serves the route, and a route without budgets
keeps no counters.

Spend is counted, in nano-USD, in the rate-limit plugins' stores (limits/): with `policy:
local` (the default) in the host's shared-memory table, exact across the workers of one
gateway, starting over when the gateway restarts; with `policy: redis` in one Redis server,
exact across every gateway using it (a cluster's budget), and kept across restarts. Either
way spend survives config reloads (the counter key names the route or `group`, not the
config). When Redis cannot answer, a request is rejected with 503 (or, with
`allow_degradation`, served without a check), and an answer's cost that cannot be charged
is lost; both are counted in `sluicegate_limit_store_errors_total`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable

from pydantic import ConfigDict, Field

from sluicegate.ai.accounting import AI_PRICER_VAR
from sluicegate.http.context import RequestContext
from sluicegate.limits.charge import Charges
from sluicegate.limits.counters import CounterStore, CountResult
from sluicegate.limits.options import StoreFailure, StoreOptions, StoreUnavailable, store_for
from sluicegate.observe.access_log import AI_RECORD_VAR
from sluicegate.plugins.base import (
    HookResult,
    Plugin,
    PluginConfig,
    PluginEnv,
    Response,
    register,
)

log = logging.getLogger("sluicegate.ai")

# Counters hold whole nano-USD: a token of the cheapest models costs fractions of a
# micro-dollar, and the store's floats keep integers exact up to 2^53 nano-USD (~9e6 USD).
NANO = 1_000_000_000
# "No window": a window longer than any gateway's uptime (100 years).
LIFETIME_SECONDS = 100 * 365 * 86400.0


class ModelPrice(PluginConfig):
    """USD per million tokens."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    prompt: float = Field(ge=0)
    """USD per 1M prompt (input) tokens."""
    completion: float = Field(ge=0)
    """USD per 1M completion (output) tokens."""


class AiBudgetConfig(StoreOptions):
    """ai-budget options; `policy` and `redis_*` say where spend is counted."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    prices: dict[str, ModelPrice] = Field(min_length=1)
    """Model → `{prompt, completion}` USD per 1M tokens. A key is a model name as the
    provider gets it (`gpt-4o-mini`), or `provider/model` to price one provider's model
    apart; `*` prices every other model. Requests for unpriced models cost nothing."""
    budget: float | None = Field(None, ge=0)
    """USD each consumer may spend per window, unless `consumers` names its own; requests
    without a consumer share one budget. Without it (and `consumers`), spend is only
    counted."""
    consumers: dict[str, float] = Field(default_factory=dict)
    """Consumer name → its budget in USD (overrides `budget`)."""
    time_window: int | None = Field(None, gt=0)
    """Seconds a budget lasts; it starts with the first request after the previous
    window ended. Without it, a budget is for the gateway's lifetime."""
    group: str | None = Field(None, min_length=1)
    """Routes with the same group share their consumers' spend (one budget over several
    routes); by default each route counts its own."""
    rejected_code: int = Field(429, ge=200, le=599)
    """Status of a request whose consumer's budget is spent."""
    rejected_msg: str | None = None
    """`error.message` of the rejection, instead of the one naming spend and budget."""


@register
class AiBudget(Plugin):
    """Prices each AI request's tokens (`sluicegate_ai_spend_usd_total`, access log
    `ai.cost_usd`) and rejects a consumer's requests once it spent its budget."""

    name = "ai-budget"
    # Checks in `access` (after the auth plugins found the consumer), before ai-proxy
    # serves; next to ai-rate-limiting (1030).
    priority = 1035
    schema = AiBudgetConfig

    def __init__(self, conf: AiBudgetConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.prices = {model: (price.prompt, price.completion)
                       for model, price in conf.prices.items()}
        self.default_price = self.prices.get("*")
        self.budgets = {name: round(usd * NANO) for name, usd in conf.consumers.items()}
        self.default_budget = None if conf.budget is None else round(conf.budget * NANO)
        self.budgeted = self.default_budget is not None or bool(self.budgets)
        self.window = float(conf.time_window) if conf.time_window else LIFETIME_SECONDS
        self.scope = f"group:{conf.group}" if conf.group else None
        self.store: CounterStore = store_for(conf)
        self.store_failure = StoreFailure(self.name, conf, env)
        # Costs are charged after the response (with redis, as tasks of their own).
        self.charges = Charges(self.name, self.store_failure)
        self.rejected_code = conf.rejected_code
        self.rejected_msg = conf.rejected_msg
        self.metrics = env.metrics
        self.state_key = f"{self.name}#{id(self)}"
        self.unpriced: set[str] = set()  # models warned about once

    def _budget_of(self, ctx: RequestContext) -> tuple[str, int] | None:
        """(counter key, budget in nano-USD) of the request's consumer, or None."""
        consumer = ctx.consumer_name or ""
        budget = self.budgets.get(consumer, self.default_budget)
        if budget is None:
            return None
        scope = self.scope
        if scope is None:
            scope = f"route:{ctx.route.id if ctx.route is not None else ''}"
        return f"ai-budget|{scope}|{self.window:g}|{consumer}", budget

    # -- before the request: budget left? ------------------------------------------------
    def access(self, ctx: RequestContext) -> HookResult:
        if ctx.vars is None:
            ctx.vars = {}
        ctx.vars[AI_PRICER_VAR] = self.price_of
        if not self.budgeted:
            return None
        found = self._budget_of(ctx)
        if found is None:
            return None
        key, budget = found
        # Cost 0: a read that also starts the window. Charges fill a window up to exactly
        # its budget, so "remaining 0" is "spent".
        result = self.store.incr(key, budget, self.window, False, 0)
        if type(result) is not tuple:
            return self._decide_later(result, ctx, key, budget)
        return self._decide(result, ctx, key, budget)

    async def _decide_later(self, pending: Awaitable[CountResult], ctx: RequestContext,
                            key: str, budget: int) -> Response | None:
        try:
            result = await pending
        except StoreUnavailable:
            return self.store_failure()
        return self._decide(result, ctx, key, budget)

    def _decide(self, result: CountResult, ctx: RequestContext, key: str, budget: int
                ) -> Response | None:
        allowed, remaining, reset = result
        if allowed and remaining > 0:
            ctx.vars[self.state_key] = (key, budget)  # type: ignore[index]
            return None
        return self._rejection(ctx, budget, reset)

    def _rejection(self, ctx: RequestContext, budget: int, reset: float) -> Response:
        consumer = ctx.consumer_name
        who = f"consumer {consumer!r}" if consumer else "requests without a consumer"
        windowed = self.window < LIFETIME_SECONDS
        message = self.rejected_msg or (
            f"Budget has been exceeded: {who} spent the budget of ${budget / NANO:.6g}"
            + (f" for this {self.window:g} s window (resets in {math.ceil(reset)} s)"
               if windowed else ""))
        body = json.dumps({"error": {"message": message, "type": "insufficient_quota",
                                     "param": None, "code": "insufficient_quota"}})
        headers = [("Content-Type", "application/json")]
        if windowed:
            headers.append(("Retry-After", str(max(math.ceil(reset), 1))))
        return Response(self.rejected_code, body.encode(), headers)

    # -- after the response: price it, charge it --------------------------------------------
    def price_of(self, provider: str, model: str) -> tuple[float, float] | None:
        return self.prices.get(f"{provider}/{model}") or self.prices.get(model) \
            or self.default_price

    def log(self, ctx: RequestContext) -> None:
        record = ctx.vars.get(AI_RECORD_VAR) if ctx.vars else None
        if record is None:
            return
        record.settle()
        usage = record.usage
        if usage is None or not (usage.prompt_tokens or usage.completion_tokens):
            return
        record.pricer = self.price_of
        cost = record.cost()
        if cost is None:
            if record.model not in self.unpriced:
                self.unpriced.add(record.model)
                log.warning("ai-budget: no price for model %r (provider %s): not counted",
                            record.model, record.provider)
            return
        if self.metrics is not None:
            route = ctx.route
            self.metrics.record_ai_spend((route.id if route is not None else "",
                                          ctx.consumer_name or "", record.provider,
                                          record.model), cost)
        state = ctx.vars.get(self.state_key) if ctx.vars else None
        charge = round(cost * NANO)
        if state is None or charge <= 0:
            return
        key, budget = state
        self.charges.charge(self.store, key, budget, self.window, charge)
