"""ai-rate-limiting with ai-proxy-multi: budgets named by instance, spent instances skipped
when picking, rejection once none has budget left, charges on the instance that answered,
the route-wide budget shared by the instances; and the fallback counter in /metrics. The
real `openai` SDK against a running gateway and three fake providers
(tests/servers/fake_llm.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import pytest

from ai.gateways import PROVIDER_KEY, samples, scrape
from servers.fake_llm import FakeLLM
from sluicegate.ai.accounting import AiRecord
from sluicegate.ai.adapter import Usage
from sluicegate.http.context import RequestContext
from sluicegate.limits.counters import InProcessStore
from sluicegate.observe.access_log import AI_RECORD_VAR
from sluicegate.plugins.ai_rate_limiting import AiRateLimiting
from sluicegate.plugins.base import PluginEnv, validate_plugin

MESSAGES = [{"role": "user", "content": "hello gateway world"}]


def instance(name: str, fake: FakeLLM, **options: Any) -> dict[str, Any]:
    return {"name": name, "provider": "openai",
            "auth": {"header": {"Authorization": f"Bearer {PROVIDER_KEY}"}},
            "override": {"endpoint": f"{fake.url}/v1"}, **options}


def config(instances: list[dict[str, Any]], limit: dict[str, Any], **multi: Any
           ) -> dict[str, Any]:
    return {"routes": [{"id": "llm", "uri": "/v1/*", "plugins": {
                "ai-proxy-multi": {"instances": instances, **multi},
                "ai-rate-limiting": limit}}],
            "global_rules": [{"id": "observe", "plugins": {"prometheus": {}}}]}


def chat(gateway: Any) -> Any:
    """The raw response (headers, and `.parse()` for the completion)."""
    sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="client-key", max_retries=0,
                        timeout=30)
    return sdk.chat.completions.with_raw_response.create(model="fake-model",
                                                         messages=MESSAGES)


def tokens_of(raw: Any) -> int:
    return raw.parse().usage.total_tokens


def budgets(**limits: int) -> list[dict[str, Any]]:
    return [{"name": name, "limit": limit, "time_window": 3600}
            for name, limit in limits.items()]


# -- the gate's hooks (a clock we move) ---------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gate(clock: FakeClock, **conf: Any) -> AiRateLimiting:
    model, _, errors = validate_plugin("ai-rate-limiting", conf, "ai-rate-limiting")
    assert errors == []
    limit = AiRateLimiting(model, PluginEnv())
    limit.store = InProcessStore(clock)
    return limit


def make_ctx() -> RequestContext:
    ctx = RequestContext("POST", "/v1/chat/completions", "", [(b"Host", b"gw")], "gw",
                         ("192.0.2.7", 40000), ("10.0.0.1", 9080), "1.1")
    ctx.vars = {}
    return ctx


def serve(limit: AiRateLimiting, ctx: RequestContext, instance: str, tokens: int) -> None:
    """The instance answered with `tokens` tokens (as ai-proxy-multi records it)."""
    record = AiRecord("openai", "chat")
    record.instance = instance
    record.usage = Usage(tokens, 0)
    ctx.vars[AI_RECORD_VAR] = record  # type: ignore[index]
    limit.log(ctx)


def test_rejection_waits_for_the_budget_that_frees_up_first():
    clock = FakeClock()
    limit = gate(clock, instances=[{"name": "a", "limit": 5, "time_window": 600},
                                   {"name": "b", "limit": 5, "time_window": 60}])
    for name in ("a", "b"):
        ctx = make_ctx()
        assert limit.admit(ctx, name) is True
        serve(limit, ctx, name, 10)
    clock.now += 30
    ctx = make_ctx()
    assert limit.admit(ctx, "a") is False
    assert limit.admit(ctx, "b") is False
    rejected = limit.rejection(ctx)
    assert rejected.status == 429
    assert dict(rejected.headers)["Retry-After"] == "30"  # b's window ends first
    ctx.response_headers = []
    limit.header_filter(ctx)
    assert ctx.response_headers == [("X-AI-RateLimit-Limit-b", "5"),
                                    ("X-AI-RateLimit-Remaining-b", "0"),
                                    ("X-AI-RateLimit-Reset-b", "30")]
    clock.now += 30
    assert limit.admit(make_ctx(), "b") is True


def test_the_last_instance_admitted_is_the_one_charged():
    clock = FakeClock()
    limit = gate(clock, instances=[{"name": "a", "limit": 100, "time_window": 60}],
                 limit=100, time_window=60)
    ctx = make_ctx()
    assert limit.admit(ctx, "a") is True  # tried, failed
    assert limit.admit(ctx, "b") is True  # answered: on the route-wide budget
    serve(limit, ctx, "b", 40)
    ctx = make_ctx()
    assert limit.admit(ctx, "a") is True
    ctx.response_headers = []
    limit.header_filter(ctx)
    assert ("X-AI-RateLimit-Remaining-a", "100") in ctx.response_headers
    assert limit.admit(ctx, "c") is True
    ctx.response_headers = []
    limit.header_filter(ctx)
    assert ("X-AI-RateLimit-Remaining-c", "60") in ctx.response_headers


# -- through the gateway ----------------------------------------------------------------------


def test_instance_whose_budget_is_spent_is_skipped(start_gateway, fake_llms):
    a, b, _ = fake_llms
    gateway = start_gateway(config([instance("a", a, priority=1), instance("b", b)],
                                   {"instances": budgets(a=5, b=1000)}))
    first = chat(gateway)
    assert first.headers["x-ai-instance"] == "a"
    assert first.headers["x-ai-ratelimit-limit-a"] == "5"
    assert tokens_of(first) > 5  # a's budget is spent
    second = chat(gateway)
    assert second.headers["x-ai-instance"] == "b"
    assert second.headers["x-ai-ratelimit-limit-b"] == "1000"
    assert second.headers["x-ai-ratelimit-remaining-b"] == "1000"
    assert "x-ai-ratelimit-limit-a" not in second.headers
    assert (a.chat_count(), b.chat_count()) == (1, 1)


def test_every_instance_spent_rejects_with_429_and_retry_after(start_gateway, fake_llms):
    a, b, _ = fake_llms
    gateway = start_gateway(config([instance("a", a, priority=1), instance("b", b)],
                                   {"instances": budgets(a=5, b=5),
                                    "rejected_msg": "no tokens left"}))
    assert [chat(gateway).headers["x-ai-instance"] for _ in range(2)] == ["a", "b"]
    with pytest.raises(openai.RateLimitError) as limited:
        chat(gateway)
    response = limited.value.response
    assert 1 <= int(response.headers["retry-after"]) <= 3600
    assert limited.value.body["code"] == "rate_limit_exceeded"
    assert limited.value.body["message"] == "no tokens left"
    assert "x-ai-instance" not in response.headers  # no instance was called
    assert (a.chat_count(), b.chat_count()) == (1, 1)


def test_tokens_are_charged_to_the_instance_that_answered(start_gateway, fake_llms):
    a, b, _ = fake_llms
    gateway = start_gateway(config([instance("a", a, priority=1), instance("b", b)],
                                   {"instances": budgets(a=100, b=100)}, cooldown=0))
    a.fault = "500"  # a is admitted, fails, and b answers
    first = chat(gateway)
    assert first.headers["x-ai-instance"] == "b"
    assert first.headers["x-ai-ratelimit-remaining-b"] == "100"
    a.fault = None
    second = chat(gateway)
    assert second.headers["x-ai-instance"] == "a"
    assert second.headers["x-ai-ratelimit-remaining-a"] == "100"  # a's failure cost nothing
    a.fault = "500"
    third = chat(gateway)
    assert third.headers["x-ai-instance"] == "b"
    assert third.headers["x-ai-ratelimit-remaining-b"] == str(100 - tokens_of(first))


def test_route_wide_budget_is_shared_by_the_instances(start_gateway, fake_llms):
    a, b, _ = fake_llms
    gateway = start_gateway(config([instance("a", a), instance("b", b)],
                                   {"limit": 15, "time_window": 3600}))
    first = chat(gateway)
    second = chat(gateway)
    # Round robin over both; the headers name the instance that answered.
    assert {first.headers["x-ai-instance"], second.headers["x-ai-instance"]} == {"a", "b"}
    name = second.headers["x-ai-instance"]
    assert second.headers[f"x-ai-ratelimit-limit-{name}"] == "15"
    assert second.headers[f"x-ai-ratelimit-remaining-{name}"] == str(15 - tokens_of(first))
    assert tokens_of(first) + tokens_of(second) >= 15
    with pytest.raises(openai.RateLimitError) as limited:
        chat(gateway)
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert a.chat_count() + b.chat_count() == 2


def test_instance_without_its_own_budget_uses_the_route_wide_one(start_gateway, fake_llms):
    a, b, _ = fake_llms
    gateway = start_gateway(config([instance("a", a, priority=1), instance("b", b)],
                                   {"limit": 1000, "time_window": 3600,
                                    "instances": budgets(a=5)}))
    assert chat(gateway).headers["x-ai-instance"] == "a"  # spends a's own budget
    second = chat(gateway)
    assert second.headers["x-ai-instance"] == "b"
    assert second.headers["x-ai-ratelimit-limit-b"] == "1000"
    assert second.headers["x-ai-ratelimit-remaining-b"] == "1000"  # a's tokens not here


def test_fallbacks_are_counted_in_metrics(start_gateway, fake_llms):
    a, b, _ = fake_llms
    gateway = start_gateway(config([instance("a", a, priority=1), instance("b", b)],
                                   {"limit": 100000, "time_window": 3600}, cooldown=0))
    a.fault = "429"
    assert chat(gateway).headers["x-ai-instance"] == "b"
    a.fault = "500"
    assert chat(gateway).headers["x-ai-instance"] == "b"
    a.fault = None
    assert chat(gateway).headers["x-ai-instance"] == "a"  # no fallback: not counted
    fallbacks = {(labels["route"], labels["provider"], labels["model"], labels["reason"]):
                 value for labels, value in samples(scrape(gateway),
                                                    "sluicegate_ai_fallbacks_total")}
    assert fallbacks == {("llm", "openai", "fake-model", "429"): 1,
                         ("llm", "openai", "fake-model", "5xx"): 1}


def test_redis_budget_spent_on_one_instance_moves_to_the_next(start_gateway, fake_llms,
                                                             tmp_path: Path):
    from servers.redis_server import REDIS_SERVER, RedisServerProcess

    if not Path(REDIS_SERVER).exists():
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    a, b, _ = fake_llms
    redis_server = RedisServerProcess(tmp_path / "redis")
    try:
        gateway = start_gateway(config(
            [instance("a", a, priority=1), instance("b", b)],
            {"instances": budgets(a=5, b=5), "policy": "redis",
             "redis_host": "127.0.0.1", "redis_port": redis_server.port}))
        first = chat(gateway)
        assert first.headers["x-ai-instance"] == "a"
        # The charge goes to Redis after the answer, as a task of its own: wait until
        # Redis holds it (this waits for an event, it measures nothing).
        redis = redis_server.client()
        deadline = time.monotonic() + 10
        charged = 0.0
        while time.monotonic() < deadline:
            charged = sum(float(redis.hget(key, "c") or 0)
                          for key in redis.keys("sluicegate:ai-rate-limiting*"))
            if charged >= 5:
                break
            time.sleep(0.01)
        assert charged == 5  # a's window filled up to its limit
        assert chat(gateway).headers["x-ai-instance"] == "b"
    finally:
        redis_server.stop()


# -- config ----------------------------------------------------------------------------------

def test_an_instance_budget_naming_nothing_that_serves_is_a_config_error():
    from sluicegate.config.load import ConfigError, validate_config

    def route(plugins: dict[str, Any]) -> dict[str, Any]:
        return {"routes": [{"id": "llm", "uri": "/v1/*", "plugins": plugins}]}

    multi = {"instances": [
        {"name": "a", "provider": "openai", "weight": 1, "options": {"model": "m"}},
        {"name": "b", "provider": "openai", "weight": 1, "options": {"model": "m"}}]}
    budgets = {"instances": [{"name": "a", "limit": 5, "time_window": 60},
                             {"name": "gpt-4o", "limit": 5, "time_window": 60}]}
    with pytest.raises(ConfigError) as caught:
        validate_config(route({"ai-proxy-multi": multi, "ai-rate-limiting": budgets}))
    assert caught.value.errors == [
        "routes[0].plugins.ai-rate-limiting.instances[1].name: 'gpt-4o' is no "
        "ai-proxy-multi instance configured with it (its instances: 'a', 'b'); no request "
        "would be charged to this budget"]
    with pytest.raises(ConfigError) as caught:
        validate_config(route({"ai-proxy": {"provider": "openai"},
                               "ai-rate-limiting": budgets}))
    assert [e for e in caught.value.errors if "instances[0]" in e] == [
        "routes[0].plugins.ai-rate-limiting.instances[0].name: 'a' is not the provider of "
        "ai-proxy configured with it (provider: 'openai'); no request would be charged to "
        "this budget"]
    # Names that match are fine, and so is a budget next to no AI plugin (a service's or a
    # global rule's may serve the route).
    budgets["instances"][1]["name"] = "b"
    validate_config(route({"ai-proxy-multi": multi, "ai-rate-limiting": budgets}))
    validate_config({"routes": [{"id": "llm", "uri": "/v1/*", "upstream": {
        "nodes": {"127.0.0.1:1": 1}}, "plugins": {"ai-rate-limiting": budgets}}]})
