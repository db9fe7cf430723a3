"""ai-model-acl: per-consumer model allow-lists, checked on the request ai-proxy is about to
send; then through a running gateway (key-auth consumers, the real `openai` SDK, the fake
Gemini API)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from servers.fake_gemini import FakeGemini
from sluicegate.ai.adapter import AdapterError
from sluicegate.http.context import RequestContext
from sluicegate.plugins.ai_model_acl import AiModelAcl
from sluicegate.plugins.base import PluginEnv, validate_plugin

PATH = "consumers[0].plugins.ai-model-acl"
KEY = "gemini-key-acl"
MESSAGES = [{"role": "user", "content": "hello models"}]


def errors_of(conf: dict[str, Any]) -> list[str]:
    return validate_plugin("ai-model-acl", conf, PATH)[2]


def acl(**conf: Any) -> AiModelAcl:
    model, _, errors = validate_plugin("ai-model-acl", conf, PATH)
    assert errors == []
    return AiModelAcl(model, PluginEnv())


def ctx_of(consumer: str | None) -> RequestContext:
    ctx = RequestContext("POST", "/v1/chat/completions", "", [(b"Host", b"gw")], "gw",
                         ("192.0.2.1", 1), ("10.0.0.1", 9080), "1.1")
    ctx.consumer_name = consumer
    return ctx


def refused(plugin: AiModelAcl, model: Any, consumer: str | None = "alice") -> str | None:
    """The refusal's message, or None when the model may be used."""
    try:
        plugin.ai_request(ctx_of(consumer), {"model": model, "messages": MESSAGES})
    except AdapterError as exc:
        assert (exc.status, exc.param, exc.type, exc.code) == \
            (403, "model", "permission_error", "model_not_allowed")
        return exc.message
    return None


def test_model_acl_config_errors_name_the_field():
    assert errors_of({}) == [f"{PATH}.allow: give allow, deny or both"]
    assert errors_of({"allow": []})[0].startswith(f"{PATH}.allow: ")
    assert errors_of({"allow": ["gpt-4o", " "]}) == [f"{PATH}.allow[1]: must not be empty"]
    assert errors_of({"deny": ["x"], "rejected_code": 500})[0].startswith(
        f"{PATH}.rejected_code: ")


def test_model_acl_allows_listed_models_and_patterns_only():
    plugin = acl(allow=["gemini-2.0-flash", "gpt-4o-mini*"])
    assert refused(plugin, "gemini-2.0-flash") is None
    assert refused(plugin, "gpt-4o-mini-2024-07-18") is None
    assert refused(plugin, "gemini-2.0-flash-lite") == \
        "model 'gemini-2.0-flash-lite' is not allowed for consumer 'alice'"
    assert refused(plugin, "GEMINI-2.0-FLASH") is not None  # model names are exact
    assert refused(plugin, None, consumer=None) == \
        "a request naming no model is not allowed for this route"


def test_model_acl_deny_wins_over_allow():
    plugin = acl(allow=["gemini-*"], deny=["gemini-2.5-pro*"])
    assert refused(plugin, "gemini-2.0-flash") is None
    assert refused(plugin, "gemini-2.5-pro-preview") is not None
    deny_only = acl(deny=["gpt-4o"])
    assert refused(deny_only, "gpt-4o") is not None
    assert refused(deny_only, "gpt-4o-mini") is None


# -- through the gateway ----------------------------------------------------------------------


@pytest.fixture
def fake_gemini() -> Iterator[FakeGemini]:
    fake = FakeGemini(api_key=KEY).start()
    yield fake
    fake.stop()


def acl_gateway(start_gateway: Any, fake: FakeGemini, options: dict[str, Any] | None = None
                ) -> Any:
    ai_proxy = {"provider": "gemini", "auth": {"header": {"x-goog-api-key": KEY}},
                "override": {"endpoint": f"{fake.url}/v1beta"}, "options": options or {}}
    return start_gateway({
        "consumer_groups": [{"id": "interns",
                             "plugins": {"ai-model-acl": {"allow": ["gemini-2.0-*"]}}}],
        "consumers": [
            {"username": "alice", "plugins": {"key-auth": {"key": "alice-key"},
                                              "ai-model-acl": {"allow": ["gemini-2.0-*"]}}},
            {"username": "bob", "plugins": {"key-auth": {"key": "bob-key"},
                                            "ai-model-acl": {"deny": ["gemini-2.5-pro"]}}},
            {"username": "carol", "group_id": "interns",
             "plugins": {"key-auth": {"key": "carol-key"}}},
            {"username": "dave", "plugins": {"key-auth": {"key": "dave-key"}}}],
        "routes": [{"id": "llm", "uri": "/v1/*",
                    "plugins": {"key-auth": {}, "ai-proxy": ai_proxy}}]})


def client(gateway: Any, key: str) -> Any:
    import openai

    # key-auth reads `apikey`; the SDK's bearer key is the same, whichever is looked at.
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0,
                         timeout=30, default_headers={"apikey": key})


def test_consumers_get_403_naming_a_model_they_may_not_use(start_gateway, fake_gemini):
    import openai

    gateway = acl_gateway(start_gateway, fake_gemini)
    alice, bob = client(gateway, "alice-key"), client(gateway, "bob-key")
    carol, dave = client(gateway, "carol-key"), client(gateway, "dave-key")
    assert alice.chat.completions.create(model="gemini-2.0-flash", messages=MESSAGES) \
        .choices[0].message.content == "echo: hello models"
    calls = len(fake_gemini.requests)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        alice.chat.completions.create(model="gemini-2.5-pro", messages=MESSAGES)
    assert denied.value.body == {"message": "model 'gemini-2.5-pro' is not allowed for "
                                            "consumer 'alice'",
                                 "type": "permission_error", "param": "model",
                                 "code": "model_not_allowed"}
    assert len(fake_gemini.requests) == calls  # refused before the provider
    with pytest.raises(openai.PermissionDeniedError):
        bob.chat.completions.create(model="gemini-2.5-pro", messages=MESSAGES)
    assert bob.chat.completions.create(model="gemini-2.0-flash", messages=MESSAGES).usage
    # a group's allow-list applies to its members; a consumer without one is not limited
    with pytest.raises(openai.PermissionDeniedError):
        list(carol.chat.completions.create(model="gemini-2.5-pro", messages=MESSAGES,
                                           stream=True))
    assert dave.chat.completions.create(model="gemini-2.5-pro", messages=MESSAGES).usage


def test_the_model_checked_is_the_one_the_route_sends(start_gateway, fake_gemini):
    import openai

    gateway = acl_gateway(start_gateway, fake_gemini, options={"model": "gemini-2.5-pro"})
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client(gateway, "alice-key").chat.completions.create(model="gemini-2.0-flash",
                                                             messages=MESSAGES)
    assert "'gemini-2.5-pro'" in denied.value.message
