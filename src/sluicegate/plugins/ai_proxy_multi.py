"""ai-proxy-multi: the route answers AI APIs (as ai-proxy does) from several LLM provider
instances, with load balancing, priorities, fallback and cool-down (APISIX's
ai-proxy-multi option names; fallback and cool-down as LiteLLM's router does them).

For each request an instance is picked within the highest-priority group that has one
not cooling down, by smooth weighted round robin (the upstream balancers', http/balancer/).
When the call fails in a way listed in `fallback_on` (by default a 429, a 5xx, a timeout
or a refused connection), the instance cools down for `cooldown` seconds (longer when a
429's Retry-After says so) and the next instance is tried, up to `max_retries` more. A
stream falls back only while the client has not had a byte: the first bytes of the
provider's answer are read before the answer head goes out.

The answer carries `X-AI-Instance: <name>`, the instance that answered (or the last one
tried, when all failed). Token accounting names that instance's provider and model; the
access log's `ai` entry has `instance` and `failed_attempts`; each fallback is counted in
`sluicegate_ai_fallbacks_total{route, provider, model, reason}` (the instance that failed).

With ai-rate-limiting on the route, an instance whose token budget is spent is skipped
when picking (it is not a failed try: no cool-down, no retry used up); the request is
rejected only when no instance with budget left remains. The hand-over is the
`BUDGET_GATE_VAR` entry of ctx.vars, which ai-rate-limiting sets in `access`.

Cool-down state belongs to a worker process and to a config snapshot (a reload starts
every instance fresh).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol

import aiohttp
from pydantic import ConfigDict, Field, field_validator, model_validator

from sluicegate.ai import provider_client
from sluicegate.ai.accounting import AiRecord
from sluicegate.ai.adapter import AdapterError, JsonObject, openai_error
from sluicegate.ai.serving import (
    JSON_HEADER,
    MAX_REQUEST_BODY,
    AiAuthConfig,
    AiLoggingConfig,
    AiOverrideConfig,
    ProviderEndpoint,
    account,
    api_of,
    checked_options,
    client_request_of,
    endpoint_problems,
    front_of,
    known_provider,
    new_record,
    respond_adapter_error,
)
from sluicegate.http.balancer import Balancer, UpstreamNode, make_balancer
from sluicegate.http.context import RequestContext
from sluicegate.observe.access_log import AI_RECORD_VAR
from sluicegate.plugins.base import (
    LocalHandler,
    Plugin,
    PluginConfig,
    PluginEnv,
    Response,
    register,
)

INSTANCE_HEADER = "X-AI-Instance"
# Failure classes of `fallback_on` besides HTTP statuses (APISIX's `http_429` / `http_5xx`
# spellings are accepted too and mean 429 / 5xx).
FAILURE_CLASSES = ("4xx", "5xx", "timeout", "connect_error")
DEFAULT_FALLBACK_ON: list[int | str] = [429, "5xx", "timeout", "connect_error"]
# APISIX's `fallback_strategy` values, as `fallback_on` lists (its http_5xx covers the
# gateway's own 502/504 for unreachable and silent providers).
APISIX_FALLBACK_STRATEGIES: dict[str, list[int | str]] = {
    "http_429": [429], "http_5xx": ["5xx", "timeout", "connect_error"]}
# A Retry-After longer than this is not believed (a provider asking for a day's pause
# would take an instance out of rotation until a reload); LiteLLM caps it too.
MAX_RETRY_AFTER_SECONDS = 3600.0
# ctx.vars key of the budget gate (ai-rate-limiting puts itself there in `access` when its
# budgets name instances): read once per request, so a route without it pays one dict get.
BUDGET_GATE_VAR = "ai_budget_gate"


class BudgetGate(Protocol):
    """What ai-proxy-multi asks a token budget (plugins/ai_rate_limiting.py)."""

    def admit(self, ctx: RequestContext, instance: str
              ) -> bool | Response | Awaitable[bool | Response]:
        """True: the instance has budget left (the gate notes it as the one to charge);
        False: its budget is spent, pick another; a Response: answer with it at once (the
        budget's store is down)."""
        ...

    def rejection(self, ctx: RequestContext) -> Response:
        """The answer when every instance's budget is spent."""
        ...


class AiInstanceConfig(PluginConfig):
    """One provider instance of ai-proxy-multi."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    name: str = Field(min_length=1, max_length=100)
    """Unique within the plugin; sent back in `X-AI-Instance`."""
    provider: str
    """openai, azure-openai, anthropic, deepseek, mistral, ollama, gemini, wenxin, or
    openai-compatible."""
    weight: int = Field(1, ge=0)
    """Share of requests within its priority group (0: never picked)."""
    priority: int = 0
    """Higher first: a lower group serves only while no higher instance is available."""
    auth: AiAuthConfig = Field(default_factory=AiAuthConfig)
    """Credentials for the provider: `header` and/or `query` name → value."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Request fields set on every request to this instance, e.g. `model`."""
    override: AiOverrideConfig = Field(default_factory=AiOverrideConfig)
    """`endpoint`: where the provider is, when not its public API."""
    timeout: int | None = Field(None, gt=0)
    """Milliseconds, as the plugin's `timeout`, for this instance."""

    @field_validator("provider")
    @classmethod
    def _known(cls, value: str) -> str:
        return known_provider(value)

    @field_validator("options")
    @classmethod
    def _options(cls, value: dict[str, Any]) -> dict[str, Any]:
        return checked_options(value)


class AiProxyMultiConfig(PluginConfig):
    """ai-proxy-multi options."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    instances: list[AiInstanceConfig] = Field(min_length=1)
    """The provider instances (`name`, `provider`, `weight`, `priority`, `auth`,
    `options`, `override`, `timeout`)."""
    timeout: int = Field(30000, gt=0)
    """Milliseconds to connect and then to wait for each read from a provider."""
    max_retries: int | None = Field(None, ge=0)
    """How many other instances to try after the first fails; default: all of them."""
    fallback_on: list[int | str] = Field(default_factory=lambda: list(DEFAULT_FALLBACK_ON))
    """Failures that move on to the next instance (and cool the failed one down):
    statuses (429, 503...), `4xx`, `5xx`, `timeout`, `connect_error` (refused, reset or
    closed before answering). Other failures reach the client at once."""
    cooldown: float = Field(30, ge=0)
    """Seconds a failed instance is skipped (a 429's longer Retry-After wins); 0: never."""
    ssl_verify: bool = True
    """Verify the providers' TLS certificates."""
    logging: AiLoggingConfig = Field(default_factory=AiLoggingConfig)
    """`summaries` and `payloads`, as ai-proxy's."""

    @model_validator(mode="before")
    @classmethod
    def _apisix_fallback_strategy(cls, data: Any) -> Any:
        """APISIX's `fallback_strategy` (a name or a list), read as `fallback_on`."""
        if not isinstance(data, dict) or "fallback_strategy" not in data:
            return data
        data = dict(data)
        strategy = data.pop("fallback_strategy")
        if "fallback_on" in data:
            raise ValueError("fallback_strategy: give fallback_on or fallback_strategy, "
                             "not both")
        names = [strategy] if isinstance(strategy, str) else strategy
        if not isinstance(names, list):
            raise ValueError("fallback_strategy: must be a name or a list of names")
        fallback_on: list[int | str] = []
        for name in names:
            if name not in APISIX_FALLBACK_STRATEGIES:
                raise ValueError(f"fallback_strategy: {name!r} is not supported (supported: "
                                 f"{', '.join(APISIX_FALLBACK_STRATEGIES)}; or use "
                                 "fallback_on)")
            fallback_on += APISIX_FALLBACK_STRATEGIES[name]
        data["fallback_on"] = fallback_on
        return data

    @field_validator("fallback_on")
    @classmethod
    def _failures(cls, value: list[int | str]) -> list[int | str]:
        out: list[int | str] = []
        for index, item in enumerate(value):
            if isinstance(item, str) and item.startswith("http_"):
                item = item[5:]
                if item.isdigit():
                    item = int(item)
            if isinstance(item, int):
                if not 400 <= item <= 599:
                    raise ValueError(f"[{index}]: {item} is not an HTTP error status "
                                     "(400-599)")
            elif item not in FAILURE_CLASSES:
                raise ValueError(f"[{index}]: {item!r} is not a status or one of "
                                 f"{', '.join(FAILURE_CLASSES)}")
            out.append(item)
        return out

    @model_validator(mode="after")
    def _instances(self) -> AiProxyMultiConfig:
        seen: set[str] = set()
        for index, instance in enumerate(self.instances):
            if instance.name in seen:
                raise ValueError(f"instances[{index}].name: {instance.name!r} is listed "
                                 "twice")
            seen.add(instance.name)
        if not any(instance.weight > 0 for instance in self.instances):
            raise ValueError("instances: at least one needs a weight above 0")
        return self


class _Instance:
    """One instance at run time: its endpoint, its balancer node, its cool-down."""

    __slots__ = ("cool_until", "endpoint", "name", "node")

    def __init__(self, name: str, endpoint: ProviderEndpoint, node: UpstreamNode) -> None:
        self.name = name
        self.endpoint = endpoint
        self.node = node
        self.cool_until = 0.0  # time.monotonic() until which it is skipped


class _Failure:
    """A failed try that may be the last: how to answer the client if it is."""

    __slots__ = ("label", "response")

    def __init__(self, label: str, response: Any) -> None:
        self.label = label
        self.response = response  # () -> Response, built only when it is the answer


@register
class AiProxyMulti(Plugin):
    """Answers AI API requests from several provider instances, balancing by weight
    within priority groups, falling back on failures and cooling failed instances down
    (see the module docstring)."""

    name = "ai-proxy-multi"
    priority = 1041  # APISIX's: serves in before_proxy like ai-proxy
    schema = AiProxyMultiConfig
    serves_requests = True

    def __init__(self, conf: AiProxyMultiConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.instances: list[_Instance] = []
        self.by_node: dict[UpstreamNode, _Instance] = {}
        for item in conf.instances:
            endpoint = ProviderEndpoint(item.provider, item.auth, item.override,
                                        item.options, item.timeout or conf.timeout,
                                        conf.ssl_verify, conf.logging.payloads)
            host, _, port = endpoint.provider_addr.rpartition(":")
            # The balancer only needs identity, weight and priority; the address is the
            # provider's, for repr.
            node = UpstreamNode(host or "provider", int(port or 0), item.weight,
                                item.priority)
            instance = _Instance(item.name, endpoint, node)
            self.instances.append(instance)
            self.by_node[node] = instance
        self.balancer: Balancer = make_balancer("roundrobin",
                                                [i.node for i in self.instances])
        self.max_tries = len(self.instances) if conf.max_retries is None else \
            min(conf.max_retries + 1, len(self.instances))
        self.fallback_statuses = {item for item in conf.fallback_on if isinstance(item, int)}
        self.fallback_classes = {item for item in conf.fallback_on if isinstance(item, str)}
        self.cooldown = conf.cooldown
        self.summaries = conf.logging.summaries
        self.metrics = env.metrics

    @classmethod
    def check(cls, conf: AiProxyMultiConfig) -> list[str]:
        problems = []
        for index, item in enumerate(conf.instances):
            problems += endpoint_problems(f"instances[{index}].", item.provider, item.auth,
                                          item.override)
        return problems

    # -- picking ---------------------------------------------------------------------------
    def _pick(self, ctx: RequestContext, excluded: set[UpstreamNode]) -> _Instance | None:
        """The next instance: by priority and weight among those not excluded (tried, or
        out of budget) and not cooling down; when only cooling ones are left, among those
        (a provider may have recovered, and an answer beats an error)."""
        now = time.monotonic()
        cooling = {i.node for i in self.instances if i.cool_until > now}
        node = self.balancer.pick(ctx, excluded | cooling if cooling else excluded)
        if node is None and cooling:
            node = self.balancer.pick(ctx, excluded)
        return self.by_node.get(node) if node is not None else None

    async def _pick_within_budget(self, ctx: RequestContext, excluded: set[UpstreamNode],
                                  gate: BudgetGate) -> _Instance | Response | None:
        """`_pick`, skipping (and adding to `excluded`) instances whose budget is spent;
        a Response when the gate answers instead."""
        while True:
            instance = self._pick(ctx, excluded)
            if instance is None:
                return None
            verdict = gate.admit(ctx, instance.name)
            if type(verdict) is not bool and not isinstance(verdict, Response):
                verdict = await verdict
            if verdict is True:
                return instance
            if verdict is not False:
                return verdict  # type: ignore[return-value]
            excluded.add(instance.node)

    def _falls_back_on_status(self, status: int) -> bool:
        return status in self.fallback_statuses or \
            f"{status // 100}xx" in self.fallback_classes

    def _cool(self, instance: _Instance, retry_after: str | None = None) -> None:
        if self.cooldown <= 0:
            return
        seconds = max(self.cooldown, _retry_after_seconds(retry_after))
        instance.cool_until = time.monotonic() + seconds

    # -- request phase ---------------------------------------------------------------------
    def before_proxy(self, ctx: RequestContext) -> LocalHandler | Response:
        api = api_of(ctx)
        if isinstance(api, Response):
            return api
        return LocalHandler(functools.partial(self.serve, ctx, api[0], api[1]),
                            MAX_REQUEST_BODY)

    async def serve(self, ctx: RequestContext, kind: str, front_name: str, body: bytes,
                    writer: Any) -> None:
        front = front_of(front_name)
        record = new_record(ctx, self.instances[0].endpoint.provider, kind, front_name)
        plugins = writer.chain.plugins
        try:
            client_request = client_request_of(kind, front_name, body, ctx, plugins)
        except AdapterError as exc:
            respond_adapter_error(exc, front, record, writer)
            return
        gate: BudgetGate | None = ctx.vars.get(BUDGET_GATE_VAR)  # type: ignore[union-attr]
        # Instances tried, and (with a gate) those whose budget is spent.
        excluded: set[UpstreamNode] = set()
        failure: _Failure | None = None
        last: _Instance | None = None
        for _ in range(self.max_tries):
            if gate is None:
                instance = self._pick(ctx, excluded)
            else:
                picked = await self._pick_within_budget(ctx, excluded, gate)
                if isinstance(picked, Response):
                    _drop_record(ctx)
                    writer.respond(picked)
                    return
                instance = picked
            if instance is None:
                break
            excluded.add(instance.node)
            if failure is not None:
                _note_attempt(record, failure.label)
            _start_attempt(record, instance)
            last = instance
            failure = await self._try(instance, ctx, kind, client_request, front, record,
                                      writer)
            if failure is None:
                return
        if last is not None and failure is not None:  # the last try's failure is the answer
            ctx.add_response_headers(((INSTANCE_HEADER, last.name),))
            writer.respond(failure.response())
            return
        if gate is not None:  # nothing picked: every instance's budget is spent
            _drop_record(ctx)
            writer.respond(gate.rejection(ctx))
            return
        record.error = "no_instance"
        record.finished = True
        error = openai_error("no AI provider instance is available", "api_error")
        writer.respond(Response(502, front.error_body(502, error), [JSON_HEADER]))

    async def _try(self, instance: _Instance, ctx: RequestContext, kind: str,
                   client_request: JsonObject, front: Any, record: AiRecord, writer: Any
                   ) -> _Failure | None:
        """One instance's try: None when the client got its answer (success, or an error
        that does not fall back), else the failure."""
        endpoint = instance.endpoint
        ctx.upstream_addr = endpoint.provider_addr
        plugins = writer.chain.plugins
        try:
            request = await endpoint.provider_request(kind, client_request, record, ctx,
                                                      plugins)
        except AdapterError as exc:
            if exc.type == "api_error":  # getting the provider's token failed (wenxin)
                label = "timeout" if exc.status == 504 else "connect_error"
                if label in self.fallback_classes:
                    self._cool(instance)
                    return _Failure(label, functools.partial(
                        _adapter_failure, exc, front, record))
            ctx.add_response_headers(((INSTANCE_HEADER, instance.name),))
            respond_adapter_error(exc, front, record, writer)
            return None
        started = time.monotonic()
        try:
            async with endpoint.send(request) as answer:
                ctx.upstream_status = answer.status
                ctx.upstream_latency = time.monotonic() - started
                if answer.status >= 400:
                    error_body = await answer.read()
                    retry_after = answer.headers.get("Retry-After")
                    respond = functools.partial(endpoint.error_response, answer.status,
                                                error_body, retry_after, front, record)
                    if self._falls_back_on_status(answer.status):
                        self._cool(instance, retry_after if answer.status == 429 else None)
                        return _Failure(str(answer.status), respond)
                    ctx.add_response_headers(((INSTANCE_HEADER, instance.name),))
                    writer.respond(respond())
                    return None
                if record.stream:
                    # Nothing reaches the client until the provider sent something: up
                    # to here, falling back is invisible to the client.
                    first = await answer.content.readany()
                    if not first:
                        raise aiohttp.ServerDisconnectedError()
                    ctx.add_response_headers(((INSTANCE_HEADER, instance.name),))
                    await endpoint.relay_stream(ctx, answer, client_request, front, record,
                                                writer, first)
                    return None
                ctx.add_response_headers(((INSTANCE_HEADER, instance.name),))
                await endpoint.relay_answer(kind, answer, front, record, writer)
                return None
        except (aiohttp.ClientError, TimeoutError) as exc:
            if writer.head_sent:  # mid-stream: the stream relay sent its error event
                return None
            label = _failure_class(exc)
            respond = functools.partial(endpoint.failure_response, exc, front, record,
                                        self.name)
            if label in self.fallback_classes:
                self._cool(instance)
                return _Failure(label, respond)
            ctx.add_response_headers(((INSTANCE_HEADER, instance.name),))
            writer.respond(respond())
            return None

    # -- log phase -------------------------------------------------------------------------
    def log(self, ctx: RequestContext) -> None:
        record = account(ctx, self.metrics, self.summaries)
        if record is not None and record.attempts and self.metrics is not None:
            route = ctx.route.id if ctx.route is not None else ""
            for attempt in record.attempts:
                self.metrics.record_ai_fallback(route, attempt["provider"],
                                                attempt["model"],
                                                _fallback_reason(attempt["error"]))


def _start_attempt(record: AiRecord, instance: _Instance) -> None:
    """The record describes the instance being tried (a failed try's figures go)."""
    record.provider = instance.endpoint.provider
    record.instance = instance.name
    record.usage = None
    record.error = None
    record.finished = False
    record.ttft = None
    record.completion_parts = []
    record.request_payload = None


def _note_attempt(record: AiRecord, label: str) -> None:
    if record.attempts is None:
        record.attempts = []
    record.attempts.append({"instance": record.instance or "", "provider": record.provider,
                            "model": record.model, "error": label})


def _fallback_reason(label: str) -> str:
    """The `reason` label of a fallback: 5xx statuses as one class (which 5xx is in the
    access log), other statuses as they are, else timeout / connect_error."""
    return "5xx" if len(label) == 3 and label.startswith("5") and label.isdigit() else label


def _drop_record(ctx: RequestContext) -> None:
    """No instance was called: like a request an access-phase limit rejected, it is no AI
    request in metrics or the access log."""
    if ctx.vars:
        ctx.vars.pop(AI_RECORD_VAR, None)


def _failure_class(exc: BaseException) -> Literal["timeout", "connect_error"]:
    status, _, _ = provider_client.describe_failure(exc)
    return "timeout" if status == 504 else "connect_error"


def _adapter_failure(exc: AdapterError, front: Any, record: AiRecord) -> Response:
    record.error = "connect" if exc.status != 504 else "timeout"
    record.finished = True
    return Response(exc.status, front.error_body(exc.status, exc.as_openai()), [JSON_HEADER])


def _retry_after_seconds(value: str | None) -> float:
    """Retry-After as seconds (a number, or an HTTP date), 0 when absent or unreadable."""
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return 0.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
