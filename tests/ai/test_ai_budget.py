"""ai-budget: spend in /metrics and the access log, budgets per consumer, the rejection a
client sees, with the real `openai` SDK, the gateway as a process and the fake provider."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from ai.gateways import PROVIDER_KEY, ai_config, ai_route, samples, scrape
from sluicegate.config.load import ConfigError, validate_config

MESSAGES = [{"role": "user", "content": "hello gateway world"}]
# The fake provider's figures for MESSAGES: 9 prompt tokens, 4 completion tokens.
PROMPT_TOKENS, COMPLETION_TOKENS = 9, 4
# One USD a token makes costs easy to read: a request costs 13 USD.
DEAR = {"prompt": 1_000_000, "completion": 1_000_000}


def budget_gateway(start_gateway: Any, fake: Any, budget: dict[str, Any],
                   plugin: dict[str, Any] | None = None, tmp_path: Path | None = None
                   ) -> Any:
    """A route with key-auth (consumers alice, bob), ai-proxy (or `plugin` for
    ai-proxy-multi) and ai-budget."""
    config = ai_config(ai_route("openai", f"{fake.url}/v1"))
    plugins = config["routes"][0]["plugins"]
    if plugin is not None:
        plugins.pop("ai-proxy")
        plugins["ai-proxy-multi"] = plugin
    plugins["key-auth"] = {}
    plugins["ai-budget"] = budget
    config["consumers"] = [{"username": name, "plugins": {"key-auth": {"key": f"{name}-k"}}}
                           for name in ("alice", "bob")]
    if tmp_path is not None:
        config["global_rules"][0]["plugins"]["file-logger"] = {
            "path": str(tmp_path / "access.log")}
    return start_gateway(config)


def client(gateway: Any, who: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="client-key", max_retries=0,
                         timeout=30, default_headers={"apikey": f"{who}-k"})


def ask(gateway: Any, who: str = "alice", **options: Any) -> Any:
    return client(gateway, who).chat.completions.create(model="fake-model",
                                                        messages=MESSAGES, **options)


def spend(gateway: Any) -> dict[tuple[str, str, str, str], float]:
    return {(labels["route"], labels["consumer"], labels["provider"], labels["model"]): value
            for labels, value in samples(scrape(gateway), "sluicegate_ai_spend_usd_total")}


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


# -- spend -----------------------------------------------------------------------------------

def test_spend_is_counted_by_route_consumer_provider_and_model(start_gateway, fake_llm):
    gateway = budget_gateway(start_gateway, fake_llm, {"prices": {
        "fake-model": {"prompt": 2.5, "completion": 10}}})
    answer = ask(gateway)
    list(ask(gateway, "bob", stream=True, stream_options={"include_usage": True}))
    one = (answer.usage.prompt_tokens * 2.5 + answer.usage.completion_tokens * 10) / 1e6
    assert spend(gateway) == {("llm", "alice", "openai", "fake-model"): pytest.approx(one),
                              ("llm", "bob", "openai", "fake-model"): pytest.approx(one)}


def test_provider_specific_and_wildcard_prices(start_gateway, fake_llm):
    gateway = budget_gateway(start_gateway, fake_llm, {"prices": {
        "openai/fake-model": {"prompt": 1, "completion": 0},
        "fake-model": {"prompt": 100, "completion": 100},
        "*": {"prompt": 0, "completion": 1}}})
    ask(gateway)
    client(gateway).chat.completions.create(model="fake-other", messages=MESSAGES)
    assert spend(gateway) == {
        ("llm", "alice", "openai", "fake-model"): pytest.approx(PROMPT_TOKENS / 1e6),
        ("llm", "alice", "openai", "fake-other"): pytest.approx(COMPLETION_TOKENS / 1e6)}


def test_unpriced_model_costs_nothing(start_gateway, fake_llm):
    gateway = budget_gateway(start_gateway, fake_llm, {"prices": {"gpt-4o": DEAR},
                                                       "budget": 1})
    for _ in range(3):
        ask(gateway)
    assert spend(gateway) == {}


def test_cost_is_in_the_access_log(start_gateway, fake_llm, tmp_path: Path):
    gateway = budget_gateway(start_gateway, fake_llm, {"prices": {"fake-model": DEAR}},
                             tmp_path=tmp_path)
    ask(gateway)
    log_path = tmp_path / "access.log"
    assert wait_until(lambda: log_path.exists() and log_path.read_text())
    entry = json.loads(log_path.read_text().splitlines()[-1])
    assert entry["ai"]["cost_usd"] == pytest.approx(PROMPT_TOKENS + COMPLETION_TOKENS)


def test_spend_names_the_instance_that_answered(start_gateway, fake_llms):
    a, b, _ = fake_llms
    a.fault = "500"
    header = {"Authorization": f"Bearer {PROVIDER_KEY}"}
    multi = {"instances": [
        {"name": "main", "provider": "openai", "priority": 1, "auth": {"header": header},
         "options": {"model": "fake-main"}, "override": {"endpoint": f"{a.url}/v1"}},
        {"name": "backup", "provider": "openai", "auth": {"header": header},
         "options": {"model": "fake-backup"}, "override": {"endpoint": f"{b.url}/v1"}}]}
    gateway = budget_gateway(start_gateway, a, {"prices": {"*": DEAR}}, plugin=multi)
    ask(gateway)
    assert spend(gateway) == {("llm", "alice", "openai", "fake-backup"): pytest.approx(13)}


# -- budgets ---------------------------------------------------------------------------------

def test_spent_budget_is_a_429_with_an_openai_error(start_gateway, fake_llm):
    gateway = budget_gateway(start_gateway, fake_llm, {"prices": {"fake-model": DEAR},
                                                       "budget": 20})
    ask(gateway)  # 13 of 20 USD
    ask(gateway)  # admitted with 7 left; spends the rest
    with pytest.raises(openai.RateLimitError) as caught:
        ask(gateway)
    error = caught.value
    assert error.status_code == 429
    assert error.code == "insufficient_quota"
    assert error.type == "insufficient_quota"
    assert error.body["message"].startswith("Budget has been exceeded: consumer 'alice' spent "
                                    "the budget of $20")
    assert "retry-after" not in error.response.headers  # no window: it does not come back
    assert len(fake_llm.requests) == 2
    ask(gateway, "bob")  # another consumer's budget is its own


def test_consumers_have_their_own_budget_over_the_default(start_gateway, fake_llm):
    gateway = budget_gateway(start_gateway, fake_llm, {
        "prices": {"fake-model": DEAR}, "budget": 0, "consumers": {"bob": 100}})
    with pytest.raises(openai.RateLimitError):
        ask(gateway)
    assert ask(gateway, "bob").choices[0].message.content == "echo: hello gateway world"


def test_budget_with_a_window_says_when_it_resets(start_gateway, fake_llm):
    gateway = budget_gateway(start_gateway, fake_llm, {
        "prices": {"fake-model": DEAR}, "budget": 10, "time_window": 3600})
    ask(gateway)
    with pytest.raises(openai.RateLimitError) as caught:
        ask(gateway)
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 3600
    assert "for this 3600 s window (resets in" in caught.value.message


def test_streamed_answers_are_charged_too(start_gateway, fake_llm):
    gateway = budget_gateway(start_gateway, fake_llm, {"prices": {"fake-model": DEAR},
                                                       "budget": 10})
    chunks = list(ask(gateway, stream=True, stream_options={"include_usage": True}))
    assert chunks
    with pytest.raises(openai.RateLimitError):
        ask(gateway, stream=True)


def test_rejection_status_and_message_are_configurable(start_gateway, fake_llm):
    gateway = budget_gateway(start_gateway, fake_llm, {
        "prices": {"fake-model": DEAR}, "budget": 0, "rejected_code": 400,
        "rejected_msg": "Budget has been exceeded! Ask finance."})
    with pytest.raises(openai.BadRequestError) as caught:
        ask(gateway)
    assert caught.value.body["message"] == "Budget has been exceeded! Ask finance."


def test_routes_in_a_group_share_the_budget(start_gateway, fake_llm):
    config = ai_config(ai_route("openai", f"{fake_llm.url}/v1"))
    route = config["routes"][0]
    route["plugins"]["ai-budget"] = {"prices": {"fake-model": DEAR}, "budget": 10,
                                     "group": "team"}
    other = json.loads(json.dumps(route))
    other.update(id="llm2", uri="/v2/*")
    config["routes"].append(other)
    gateway = start_gateway(config)
    openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="k", max_retries=0).chat \
        .completions.create(model="fake-model", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as caught:
        openai.OpenAI(base_url=f"{gateway.url}/v2", api_key="k", max_retries=0).chat \
            .completions.create(model="fake-model", messages=MESSAGES)
    assert "requests without a consumer" in caught.value.message


# -- policy redis: one budget for a cluster of gateways -------------------------------------

@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Any:
    from servers.redis_server import REDIS_SERVER, RedisServerProcess

    if not Path(REDIS_SERVER).exists():
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    server = RedisServerProcess(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


def redis_spend(redis_server: Any) -> float:
    """USD charged in Redis so far (counters hold nano-USD)."""
    redis = redis_server.client()
    return sum(float(redis.hget(key, "c") or 0)
               for key in redis.keys("sluicegate:ai-budget*")) / 1e9


def test_redis_policy_shares_a_consumer_budget_across_gateways(start_gateway, fake_llm,
                                                               redis_server):
    budget = {"prices": {"fake-model": DEAR}, "budget": 20, "policy": "redis",
              "redis_host": "127.0.0.1", "redis_port": redis_server.port}
    first = budget_gateway(start_gateway, fake_llm, budget)
    second = budget_gateway(start_gateway, fake_llm, budget)
    ask(first)  # 13 of 20 USD
    # With redis the charge is sent after the answer, as a task of its own: wait until
    # Redis holds it (this waits for an event, it measures nothing).
    assert wait_until(lambda: redis_spend(redis_server) >= 13), redis_spend(redis_server)
    ask(second)  # admitted with 7 left on the other gateway; spends the rest
    assert wait_until(lambda: redis_spend(redis_server) >= 20), redis_spend(redis_server)
    assert redis_spend(redis_server) == pytest.approx(20)
    for gateway in (first, second):
        with pytest.raises(openai.RateLimitError) as caught:
            ask(gateway)
        assert caught.value.code == "insufficient_quota"
    ask(first, "bob")  # bob's budget is his own, in Redis too
    assert len(fake_llm.requests) == 3


def test_redis_unreachable_rejects_with_503_unless_degradation_is_allowed(start_gateway,
                                                                          fake_llm):
    from harness import free_port

    down = {"prices": {"fake-model": DEAR}, "budget": 20, "policy": "redis",
            "redis_host": "127.0.0.1", "redis_port": free_port(), "redis_timeout": 200}
    strict = budget_gateway(start_gateway, fake_llm, down)
    with pytest.raises(openai.InternalServerError) as caught:
        ask(strict)
    assert caught.value.status_code == 503
    assert caught.value.body == {"error_msg": "failed to ai budget"} or \
        "failed to ai budget" in caught.value.response.text
    assert fake_llm.requests == []
    lenient = budget_gateway(start_gateway, fake_llm, {**down, "allow_degradation": True})
    assert ask(lenient).choices[0].message.content == "echo: hello gateway world"
    text = scrape(lenient)
    assert 'sluicegate_limit_store_errors_total{outcome="allowed",plugin="ai-budget"}' in text


# -- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("plugin", "expected"), [
    ({}, "prices: "),
    ({"prices": {}}, "prices: "),
    ({"prices": {"m": {"prompt": -1, "completion": 1}}}, "prices.m.prompt: "),
    ({"prices": {"m": {"prompt": 1}}}, "prices.m.completion: "),
    ({"prices": {"m": DEAR}, "budget": -5}, "budget: "),
    ({"prices": {"m": DEAR}, "time_window": 0}, "time_window: "),
    ({"prices": {"m": DEAR}, "rejected_code": 99}, "rejected_code: "),
    ({"prices": {"m": DEAR}, "consumers": {"alice": "lots"}}, "consumers.alice: "),
    ({"prices": {"m": DEAR}, "policy": "redis"}, "redis_host: required when policy is redis"),
    ({"prices": {"m": DEAR}, "policy": "cluster"}, "policy: "),
])
def test_bad_ai_budget_config_is_rejected_with_the_field_path(plugin, expected):
    with pytest.raises(ConfigError) as caught:
        validate_config({"routes": [{"id": "llm", "uri": "/v1/*", "plugins": {
            "ai-proxy": {"provider": "openai"}, "ai-budget": plugin}}]})
    prefix = "routes[0].plugins.ai-budget."
    assert any(error.startswith(prefix + expected) for error in caught.value.errors), \
        caught.value.errors
