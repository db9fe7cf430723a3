"""ai-proxy-multi: weighted balancing, priorities, fallback, cool-down, retries, streams and
errors, with the real `openai` SDK, the gateway as a process and three fake providers
(tests/servers/fake_llm.py) whose `fault` a test sets."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from ai.gateways import PROVIDER_KEY, samples, scrape
from harness import free_port
from servers.fake_llm import FakeLLM
from sluicegate.config.load import ConfigError, validate_config

MESSAGES = [{"role": "user", "content": "hello gateway world"}]


def instance(name: str, fake: FakeLLM | str, provider: str = "openai", **options: Any
             ) -> dict[str, Any]:
    """An instance in front of a fake provider (or an endpoint URL)."""
    header = {"x-api-key": PROVIDER_KEY} if provider == "anthropic" else \
        {"Authorization": f"Bearer {PROVIDER_KEY}"}
    url = fake if isinstance(fake, str) else f"{fake.url}/v1"
    return {"name": name, "provider": provider, "auth": {"header": header},
            "override": {"endpoint": url}, **options}


def multi_config(instances: list[dict[str, Any]], **plugin: Any) -> dict[str, Any]:
    return {"routes": [{"id": "llm", "uri": "/v1/*",
                        "plugins": {"ai-proxy-multi": {"instances": instances, **plugin}}}],
            "global_rules": [{"id": "observe", "plugins": {"prometheus": {}}}]}


def client(gateway: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="client-key", max_retries=0,
                         timeout=30)


def chat(gateway: Any, **options: Any) -> tuple[str, Any]:
    """(the X-AI-Instance that answered, the completion)."""
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="fake-model", messages=MESSAGES, **options)
    return raw.headers["x-ai-instance"], raw.parse()


def wait_until(predicate: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


# -- balancing -------------------------------------------------------------------------------

def test_weights_split_traffic_as_configured(start_gateway, fake_llms):
    a, b, _ = fake_llms
    gateway = start_gateway(multi_config([instance("a", a, weight=3),
                                          instance("b", b, weight=1)]))
    served = [chat(gateway)[0] for _ in range(8)]
    assert served.count("a") == 6
    assert served.count("b") == 2
    assert (a.chat_count(), b.chat_count()) == (6, 2)


def test_higher_priority_serves_and_lower_priority_takes_over_when_it_fails(start_gateway,
                                                                         fake_llms):
    a, b, _ = fake_llms
    gateway = start_gateway(multi_config([instance("backup", b, priority=0, weight=5),
                                          instance("main", a, priority=10)]))
    assert [chat(gateway)[0] for _ in range(3)] == ["main"] * 3
    a.fault = "500"
    name, answer = chat(gateway)
    assert name == "backup"
    assert answer.choices[0].message.content == "echo: hello gateway world"


def test_weight_zero_instance_is_never_picked(start_gateway, fake_llms):
    a, b, _ = fake_llms
    gateway = start_gateway(multi_config([instance("a", a), instance("off", b, weight=0)]))
    assert {chat(gateway)[0] for _ in range(3)} == {"a"}
    assert b.chat_count() == 0


# -- fallback --------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["429", "500", "hang", "close"])
def test_failed_instance_falls_back_to_the_next(start_gateway, fake_llms, fault):
    a, b, _ = fake_llms
    a.fault = fault
    gateway = start_gateway(multi_config([instance("a", a, priority=1, timeout=500),
                                          instance("b", b)]))
    name, answer = chat(gateway)
    assert name == "b"
    assert answer.choices[0].message.content == "echo: hello gateway world"
    assert a.chat_count() == 1


def test_refused_connection_falls_back_to_the_next(start_gateway, fake_llms):
    _, b, _ = fake_llms
    gateway = start_gateway(multi_config([
        instance("gone", f"http://127.0.0.1:{free_port()}/v1", priority=1),
        instance("b", b)]))
    assert chat(gateway)[0] == "b"


def test_failure_not_in_fallback_on_reaches_the_client(start_gateway, fake_llms):
    a, b, _ = fake_llms
    a.fault = "429"
    gateway = start_gateway(multi_config([instance("a", a, priority=1), instance("b", b)],
                                         fallback_on=["5xx"]))
    with pytest.raises(openai.RateLimitError) as caught:
        chat(gateway)
    assert caught.value.response.headers["x-ai-instance"] == "a"
    assert b.chat_count() == 0


def test_client_error_does_not_fall_back(start_gateway, fake_llms):
    a, b, _ = fake_llms
    gateway = start_gateway(multi_config([instance("a", a, priority=1), instance("b", b)]))
    with pytest.raises(openai.NotFoundError):
        client(gateway).chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert b.chat_count() == 0


# -- cool-down -------------------------------------------------------------------------------

def test_failed_instance_cools_down_then_serves_again(start_gateway, fake_llms):
    a, b, _ = fake_llms
    gateway = start_gateway(multi_config([instance("a", a, priority=1), instance("b", b)],
                                         cooldown=3))
    a.fault = "500"
    assert chat(gateway)[0] == "b"
    a.fault = None  # recovered, but still cooling down: skipped
    assert chat(gateway)[0] == "b"
    assert a.chat_count() == 1
    assert wait_until(lambda: chat(gateway)[0] == "a")  # tried again once it cooled down


def test_rate_limited_instance_cools_down_for_its_retry_after(start_gateway, fake_llms):
    a, b, _ = fake_llms
    a.fault, a.retry_after = "429", "60"
    gateway = start_gateway(multi_config([instance("a", a, priority=1), instance("b", b)],
                                         cooldown=1))
    assert chat(gateway)[0] == "b"
    a.fault = None
    time.sleep(1.5)  # past `cooldown`, well within Retry-After
    assert chat(gateway)[0] == "b"
    assert a.chat_count() == 1


def test_when_every_instance_cools_down_they_are_tried_anyway(start_gateway, fake_llms):
    a, _, _ = fake_llms
    a.fault = "500"
    gateway = start_gateway(multi_config([instance("a", a)], cooldown=60))
    with pytest.raises(openai.InternalServerError):
        chat(gateway)
    a.fault = None
    assert chat(gateway)[0] == "a"


# -- retries ---------------------------------------------------------------------------------

def test_max_retries_bounds_the_instances_tried(start_gateway, fake_llms):
    for fake in fake_llms:
        fake.fault = "500"
    a, b, c = fake_llms
    gateway = start_gateway(multi_config([instance("a", a, priority=3),
                                          instance("b", b, priority=2),
                                          instance("c", c, priority=1)], max_retries=1))
    with pytest.raises(openai.InternalServerError) as caught:
        chat(gateway)
    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-ai-instance"] == "b"
    assert (a.chat_count(), b.chat_count(), c.chat_count()) == (1, 1, 0)


def test_by_default_every_instance_is_tried(start_gateway, fake_llms):
    a, b, c = fake_llms
    a.fault = b.fault = "500"
    gateway = start_gateway(multi_config([instance("a", a, priority=3),
                                          instance("b", b, priority=2),
                                          instance("c", c, priority=1)]))
    assert chat(gateway)[0] == "c"


# -- streams ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["429", "empty-stream", "hang"])
def test_stream_falls_back_before_the_first_byte(start_gateway, fake_llms, fault):
    a, b, _ = fake_llms
    a.fault = fault
    gateway = start_gateway(multi_config([instance("a", a, priority=1, timeout=500),
                                          instance("b", b)]))
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="fake-model", messages=MESSAGES, stream=True)
    assert raw.headers["x-ai-instance"] == "b"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse()
                   if chunk.choices)
    assert text == "echo: hello gateway world"


def test_stream_cut_after_the_first_byte_does_not_fall_back(start_gateway, fake_llms):
    a, b, _ = fake_llms
    gateway = start_gateway(multi_config([
        instance("a", a, priority=1, options={"model": "fake-cut"}), instance("b", b)]))
    stream = client(gateway).chat.completions.create(model="fake-model", messages=MESSAGES,
                                                     stream=True)
    with pytest.raises(openai.APIError, match="cut short"):
        list(stream)
    assert b.chat_count() == 0


# -- when every instance fails ---------------------------------------------------------------

def test_all_rate_limited_passes_the_last_providers_error_on(start_gateway, fake_llms):
    a, b, _ = fake_llms
    a.fault = b.fault = "429"
    b.retry_after = "9"
    gateway = start_gateway(multi_config([instance("a", a, priority=1), instance("b", b)]))
    with pytest.raises(openai.RateLimitError) as caught:
        chat(gateway)
    error = caught.value
    assert error.code == "rate_limit_exceeded"
    assert "Rate limit reached" in error.message
    assert error.response.headers["retry-after"] == "9"
    assert error.response.headers["x-ai-instance"] == "b"
    assert set(error.body) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(("fault", "status", "message"), [
    ("500", 502, "The server had an error"),
    ("hang", 504, "did not answer in time"),
    ("close", 502, "closed the connection"),
])
def test_all_failing_is_a_gateway_error_with_an_openai_error_body(start_gateway, fake_llms,
                                                                  fault, status, message):
    a, b, _ = fake_llms
    a.fault = b.fault = fault
    gateway = start_gateway(multi_config([instance("a", a, timeout=500),
                                          instance("b", b, timeout=500)]))
    with pytest.raises(openai.APIStatusError) as caught:
        chat(gateway)
    assert caught.value.status_code == status
    assert message in caught.value.message
    assert caught.value.type in ("api_error", "timeout", "server_error")


def test_all_unreachable_is_a_502_naming_no_secret(start_gateway):
    gateway = start_gateway(multi_config([
        instance("x", f"http://127.0.0.1:{free_port()}/v1"),
        instance("y", f"http://127.0.0.1:{free_port()}/v1")]))
    with pytest.raises(openai.APIStatusError) as caught:
        chat(gateway)
    assert caught.value.status_code == 502
    assert "cannot connect to the provider" in caught.value.message
    assert PROVIDER_KEY not in json.dumps(caught.value.body)


# -- accounting ------------------------------------------------------------------------------

def test_metrics_and_access_log_name_the_instance_that_answered(start_gateway, fake_llms,
                                                                tmp_path: Path):
    a, b, _ = fake_llms
    a.fault = "500"
    log_path = tmp_path / "access.log"
    config = multi_config([
        instance("openai-main", a, priority=1, options={"model": "fake-main"}),
        instance("claude-backup", b, provider="anthropic",
                 options={"model": "claude-backup", "max_tokens": 64})])
    config["global_rules"][0]["plugins"]["file-logger"] = {"path": str(log_path)}
    gateway = start_gateway(config)
    name, answer = chat(gateway)
    assert name == "claude-backup"
    tokens = {(labels["type"], labels["provider"], labels["model"]): value
              for labels, value in samples(scrape(gateway), "sluicegate_ai_tokens_total")}
    assert tokens == {("prompt", "anthropic", "claude-backup"): answer.usage.prompt_tokens,
                      ("completion", "anthropic", "claude-backup"):
                          answer.usage.completion_tokens}
    assert wait_until(lambda: log_path.exists() and log_path.read_text())
    entry = json.loads(log_path.read_text().splitlines()[-1])
    assert entry["ai"]["instance"] == "claude-backup"
    assert entry["ai"]["provider"] == "anthropic"
    assert entry["ai"]["failed_attempts"] == [{"instance": "openai-main",
                                               "provider": "openai", "model": "fake-main",
                                               "error": "500"}]


# -- config ----------------------------------------------------------------------------------

def config_errors(plugin: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate_config({"routes": [{"id": "llm", "uri": "/v1/*",
                                     "plugins": {"ai-proxy-multi": plugin}}]})
    return caught.value.errors


PREFIX = "routes[0].plugins.ai-proxy-multi."
ONE = {"name": "a", "provider": "openai"}


@pytest.mark.parametrize(("plugin", "expected"), [
    ({"instances": []}, PREFIX + "instances: "),
    ({}, PREFIX + "instances: "),
    ({"instances": [{**ONE, "weight": -1}]}, PREFIX + "instances[0].weight: "),
    ({"instances": [{**ONE, "weight": "heavy"}]}, PREFIX + "instances[0].weight: "),
    ({"instances": [ONE, {"name": "b", "provider": "skynet"}]},
     PREFIX + "instances[1].provider: unknown provider 'skynet'"),
    ({"instances": [{**ONE, "provider": "azure-openai"}]},
     PREFIX + "instances[0].override.endpoint: required for provider azure-openai"),
    ({"instances": [ONE, ONE]}, PREFIX + "instances[1].name: 'a' is listed twice"),
    ({"instances": [{**ONE, "weight": 0}]},
     PREFIX + "instances: at least one needs a weight above 0"),
    ({"instances": [ONE], "fallback_on": ["teapot"]}, PREFIX + "fallback_on: [0]: 'teapot'"),
    ({"instances": [ONE], "fallback_on": [200]}, PREFIX + "fallback_on: [0]: 200 is not"),
    ({"instances": [ONE], "max_retries": -1}, PREFIX + "max_retries: "),
    ({"instances": [{**ONE, "options": {"stream": True}}]},
     PREFIX + "instances[0].options.stream: chosen by each request"),
])
def test_bad_ai_proxy_multi_config_is_rejected_with_the_field_path(plugin, expected):
    errors = config_errors(plugin)
    assert any(error.startswith(expected) for error in errors), errors


def test_apisix_fallback_spellings_are_accepted():
    validate_config({"routes": [{"id": "llm", "uri": "/v1/*", "plugins": {"ai-proxy-multi": {
        "instances": [ONE], "fallback_on": ["http_429", "http_5xx", 503, "timeout"]}}}]})
    validate_config({"routes": [{"id": "llm", "uri": "/v1/*", "plugins": {"ai-proxy-multi": {
        "instances": [ONE], "fallback_strategy": ["http_429", "http_5xx"]}}}]})
    errors = config_errors({"instances": [ONE], "fallback_strategy": "rate_limiting"})
    assert any("fallback_strategy: 'rate_limiting' is not supported" in error
               for error in errors), errors


def test_apisix_fallback_strategy_falls_back_on_429(start_gateway, fake_llms):
    a, b, _ = fake_llms
    a.fault = "429"
    gateway = start_gateway(multi_config([instance("a", a, priority=1), instance("b", b)],
                                         fallback_strategy="http_429", cooldown=0))
    assert chat(gateway)[0] == "b"
    a.fault = "500"
    b.fault = None
    with pytest.raises(openai.InternalServerError):  # 5xx is not in the strategy
        chat(gateway)
