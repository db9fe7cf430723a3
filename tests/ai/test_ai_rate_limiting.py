"""ai-rate-limiting: config checks, the plugin's hooks over a request context (a clock we
move, so windows end without waiting), then the real `openai` SDK through a running gateway
whose ai-proxy calls the fake Gemini API (tokens are words there: each request below costs
5 prompt + 4 completion = 9 tokens)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from servers.fake_gemini import FakeGemini
from sluicegate.ai.accounting import AiRecord
from sluicegate.ai.adapter import Usage
from sluicegate.http.context import RequestContext
from sluicegate.limits.counters import InProcessStore
from sluicegate.observe.access_log import AI_RECORD_VAR
from sluicegate.plugins.ai_rate_limiting import AiRateLimiting
from sluicegate.plugins.base import PluginEnv, validate_plugin

PATH = "routes[0].plugins.ai-rate-limiting"
KEY = "gemini-key-rl"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def errors_of(conf: dict[str, Any]) -> list[str]:
    return validate_plugin("ai-rate-limiting", conf, PATH)[2]


def plugin(clock: FakeClock, **conf: Any) -> AiRateLimiting:
    model, _, errors = validate_plugin("ai-rate-limiting", conf, PATH)
    assert errors == []
    instance = AiRateLimiting(model, PluginEnv())
    instance.store = InProcessStore(clock)
    return instance


def make_ctx(consumer: str | None = None) -> RequestContext:
    ctx = RequestContext("POST", "/v1/chat/completions", "", [(b"Host", b"gw")], "gw",
                         ("192.0.2.7", 40000), ("10.0.0.1", 9080), "1.1")
    ctx.consumer_name = consumer
    return ctx


def served(limit: AiRateLimiting, ctx: RequestContext, prompt: int, completion: int
           ) -> int:
    """One request through the plugin's hooks: its status (200 when admitted, then
    answered with that usage, as ai-proxy records it)."""
    rejected = limit.access(ctx)
    if rejected is not None:
        return rejected.status
    record = AiRecord("gemini", "chat")
    record.usage = Usage(prompt, completion)
    ctx.vars[AI_RECORD_VAR] = record  # type: ignore[index]
    limit.log(ctx)
    return 200


# -- config -------------------------------------------------------------------------------------


def test_ai_rate_limiting_config_errors_name_the_field():
    assert errors_of({"limit": 100}) == [f"{PATH}.time_window: required with limit"]
    assert errors_of({"time_window": 60}) == [f"{PATH}.limit: required with time_window"]
    assert errors_of({}) == [f"{PATH}.limit: required (with time_window) unless instances "
                             "are given"]
    assert errors_of({"limit": 0, "time_window": 60}) == [f"{PATH}.limit: must be > 0"]
    assert errors_of({"limit": 10, "time_window": 60, "limit_strategy": "words"})[0] \
        .startswith(f"{PATH}.limit_strategy: ")
    assert errors_of({"instances": [{"name": "a", "limit": 1, "time_window": 1},
                                    {"name": "a", "limit": 2, "time_window": 1}]}) == [
        f"{PATH}.instances[1].name: 'a' is listed twice"]
    assert errors_of({"limit": 10, "time_window": 60, "key_type": "var",
                      "key": "$consumer_name"})[0].startswith(f"{PATH}.key: ")
    assert errors_of({"limit": 10, "time_window": 60, "key_type": "var"}) == [
        f"{PATH}.key: required with key_type var (e.g. consumer_name)"]
    assert errors_of({"limit": 10, "time_window": 60, "rejected_code": 600}) == [
        f"{PATH}.rejected_code: must be between 200 and 599"]


# -- hooks ----------------------------------------------------------------------------------------


def test_budget_spent_by_an_answer_rejects_the_next_request_until_the_window_ends():
    clock = FakeClock()
    limit = plugin(clock, limit=20, time_window=60)
    assert served(limit, make_ctx(), 5, 4) == 200   # 9 used
    assert served(limit, make_ctx(), 5, 4) == 200   # 18 used
    assert served(limit, make_ctx(), 50, 50) == 200  # admitted with 2 left; spends it all
    ctx = make_ctx()
    rejected = limit.access(ctx)
    assert rejected is not None and rejected.status == 429
    assert dict(rejected.headers)["Retry-After"] == "60"
    clock.now += 59
    assert dict(limit.access(make_ctx()).headers)["Retry-After"] == "1"  # type: ignore[union-attr]
    clock.now += 1
    assert served(limit, make_ctx(), 5, 4) == 200


def test_limit_strategy_picks_which_tokens_count():
    clock = FakeClock()
    limit = plugin(clock, limit=10, time_window=60, limit_strategy="completion_tokens")
    assert [served(limit, make_ctx(), 1000, 4) for _ in range(4)] == [200, 200, 200, 429]
    limit = plugin(clock, limit=10, time_window=60, limit_strategy="prompt_tokens")
    assert [served(limit, make_ctx(), 5, 1000) for _ in range(3)] == [200, 200, 429]


def test_answers_without_usage_cost_nothing():
    clock = FakeClock()
    limit = plugin(clock, limit=1, time_window=60)
    for _ in range(3):
        assert limit.access(make_ctx()) is None  # ai-proxy failed: no record, no usage
        ctx = make_ctx()
        limit.access(ctx)
        ctx.vars[AI_RECORD_VAR] = AiRecord("gemini", "chat")  # type: ignore[index]
        limit.log(ctx)
    assert served(limit, make_ctx(), 1, 0) == 200
    assert served(limit, make_ctx(), 1, 0) == 429


def test_budgets_per_consumer_are_separate():
    clock = FakeClock()
    limit = plugin(clock, limit=9, time_window=60, key_type="var", key="consumer_name")
    assert served(limit, make_ctx("alice"), 5, 4) == 200
    assert served(limit, make_ctx("alice"), 5, 4) == 429
    assert served(limit, make_ctx("bob"), 5, 4) == 200


def test_quota_headers_show_the_budget_left_at_admission():
    clock = FakeClock()
    limit = plugin(clock, limit=20, time_window=60)
    served(limit, make_ctx(), 5, 4)
    ctx = make_ctx()
    assert limit.access(ctx) is None
    ctx.response_headers = [("Content-Type", "application/json")]
    limit.header_filter(ctx)
    assert ctx.response_headers[1:] == [("X-AI-RateLimit-Limit-ai-proxy", "20"),
                                        ("X-AI-RateLimit-Remaining-ai-proxy", "11"),
                                        ("X-AI-RateLimit-Reset-ai-proxy", "60")]


# -- through the gateway ----------------------------------------------------------------------


@pytest.fixture
def fake_gemini() -> Iterator[FakeGemini]:
    fake = FakeGemini(api_key=KEY).start()
    yield fake
    fake.stop()


def ai_proxy(fake: FakeGemini) -> dict[str, Any]:
    return {"provider": "gemini", "auth": {"header": {"x-goog-api-key": KEY}},
            "override": {"endpoint": f"{fake.url}/v1beta"},
            "options": {"model": "gemini-2.0-flash"}}


def gateway_config(fake: FakeGemini, limit: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"routes": [{"id": "llm", "uri": "/v1/*",
                        "plugins": {"ai-proxy": ai_proxy(fake), "ai-rate-limiting": limit,
                                    **extra.pop("plugins", {})}}], **extra}


def client(gateway: Any, key: str = "client-key") -> Any:
    import openai

    # key-auth reads `apikey`; the SDK's bearer key is the same, whichever is looked at.
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0,
                         timeout=30, default_headers={"apikey": key})


MESSAGES = [{"role": "system", "content": "You echo."},
            {"role": "user", "content": "hello gemini world"}]


def test_gateway_rejects_with_429_and_retry_after_once_tokens_are_spent(start_gateway,
                                                                       fake_gemini):
    import openai

    gateway = start_gateway(gateway_config(fake_gemini, {"limit": 10, "time_window": 3600}))
    sdk = client(gateway)
    first = sdk.chat.completions.with_raw_response.create(model="x", messages=MESSAGES)
    assert first.headers["X-AI-RateLimit-Remaining-ai-proxy"] == "10"
    second = sdk.chat.completions.with_raw_response.create(model="x", messages=MESSAGES)
    assert second.headers["X-AI-RateLimit-Remaining-ai-proxy"] == "1"  # 9 spent
    assert second.parse().choices[0].message.content == "echo: hello gemini world"
    calls = len(fake_gemini.requests)
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.chat.completions.create(model="x", messages=MESSAGES)
    retry_after = int(limited.value.response.headers["Retry-After"])
    assert 1 <= retry_after <= 3600
    assert limited.value.body["code"] == "rate_limit_exceeded"
    assert limited.value.response.headers["X-AI-RateLimit-Remaining-ai-proxy"] == "0"
    assert len(fake_gemini.requests) == calls  # the provider was not called


def test_gateway_charges_streamed_answers_too(start_gateway, fake_gemini):
    import openai

    gateway = start_gateway(gateway_config(fake_gemini, {"limit": 9, "time_window": 3600,
                                                         "rejected_msg": "tokens spent"}))
    sdk = client(gateway)
    # The client does not ask for usage; the gateway still counts the tokens.
    chunks = list(sdk.chat.completions.create(model="x", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "echo: hello gemini world"
    with pytest.raises(openai.RateLimitError) as limited:
        list(sdk.chat.completions.create(model="x", messages=MESSAGES, stream=True))
    assert limited.value.body["message"] == "tokens spent"


def test_gateway_budgets_per_consumer(start_gateway, fake_gemini):
    import openai

    config = gateway_config(
        fake_gemini, {"limit": 9, "time_window": 3600, "key_type": "var",
                      "key": "consumer_name"},
        plugins={"key-auth": {}},
        consumers=[{"username": "alice", "plugins": {"key-auth": {"key": "alice-key"}}},
                   {"username": "bob", "plugins": {"key-auth": {"key": "bob-key"}}}])
    gateway = start_gateway(config)
    alice, bob = client(gateway, "alice-key"), client(gateway, "bob-key")
    alice.chat.completions.create(model="x", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):
        alice.chat.completions.create(model="x", messages=MESSAGES)
    assert bob.chat.completions.create(model="x", messages=MESSAGES).usage.total_tokens == 9
    with pytest.raises(openai.RateLimitError):
        bob.chat.completions.create(model="x", messages=MESSAGES)


def test_gateway_instance_budget_applies_to_its_provider(start_gateway, fake_gemini):
    import openai

    gateway = start_gateway(gateway_config(fake_gemini, {
        "limit": 1000, "time_window": 3600,
        "instances": [{"name": "gemini", "limit": 5, "time_window": 3600}]}))
    sdk = client(gateway)
    first = sdk.chat.completions.with_raw_response.create(model="x", messages=MESSAGES)
    assert first.headers["X-AI-RateLimit-Limit-gemini"] == "5"
    with pytest.raises(openai.RateLimitError):
        sdk.chat.completions.create(model="x", messages=MESSAGES)


def test_gateway_budget_holds_across_workers(start_gateway, fake_gemini):
    import openai

    gateway = start_gateway(gateway_config(fake_gemini, {"limit": 20, "time_window": 3600}),
                            workers=2)
    admitted = 0
    for _ in range(6):
        # A new client per request: new connections, spread over both workers.
        try:
            client(gateway).chat.completions.create(model="x", messages=MESSAGES)
            admitted += 1
        except openai.RateLimitError:
            pass
    assert admitted == 3  # 0, 9, 18 used when admitted; the third spends the rest


def test_redis_policy_shares_a_budget_across_gateways(start_gateway, fake_gemini, tmp_path):
    import time

    import openai

    from servers.redis_server import REDIS_SERVER, RedisServerProcess

    if not Path(REDIS_SERVER).exists():
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    redis_server = RedisServerProcess(tmp_path / "redis")
    try:
        limit = {"limit": 9, "time_window": 3600, "policy": "redis",
                 "redis_host": "127.0.0.1", "redis_port": redis_server.port}
        first = start_gateway(gateway_config(fake_gemini, limit))
        second = start_gateway(gateway_config(fake_gemini, limit))
        client(first).chat.completions.create(model="x", messages=MESSAGES)
        # With redis the charge is sent after the answer, as a task of its own: wait until
        # Redis holds it (this waits for an event, it measures nothing).
        redis = redis_server.client()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            counts = [float(redis.hget(key, "c") or 0)
                      for key in redis.keys("sluicegate:ai-rate-limiting*")]
            if sum(counts) >= 9:
                break
            time.sleep(0.01)
        assert sum(counts) == 9
        with pytest.raises(openai.RateLimitError):
            client(second).chat.completions.create(model="x", messages=MESSAGES)
    finally:
        redis_server.stop()
