"""The real `openai` SDK against the gateway's ai-proxy, in front of a fake provider speaking
OpenAI's wire format, and one speaking Anthropic's (translation)."""

from __future__ import annotations

import json

import openai
import pytest

from ai.gateways import PROVIDER_KEY, ai_config, ai_route

MESSAGES = [{"role": "system", "content": "You echo."},
            {"role": "user", "content": "hello gateway world"}]


def client(gateway) -> openai.OpenAI:
    # The client's own key is not the provider's: the gateway holds that one.
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="client-key", max_retries=0,
                         timeout=30)


def test_openai_sdk_chat_completion_through_the_gateway(openai_gateway, fake_llm):
    answer = client(openai_gateway).chat.completions.create(model="fake-model",
                                                            messages=MESSAGES)
    assert answer.choices[0].message.content == "echo: hello gateway world"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == 4
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 4
    sent = fake_llm.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert sent.body["messages"] == MESSAGES


def test_openai_sdk_stream_arrives_chunk_by_chunk_with_usage(openai_gateway, fake_llm):
    stream = client(openai_gateway).chat.completions.create(
        model="fake-model", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "echo: hello gateway world"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_openai_stream_without_include_usage_gets_no_usage_chunk(openai_gateway, fake_llm):
    chunks = list(client(openai_gateway).chat.completions.create(
        model="fake-model", messages=MESSAGES, stream=True))
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    # ...while the gateway asked the provider for usage, to count tokens
    assert fake_llm.requests[-1].body["stream_options"] == {"include_usage": True}


def test_openai_sdk_embeddings_through_the_gateway(openai_gateway, fake_llm):
    answer = client(openai_gateway).embeddings.create(model="fake-embed",
                                                      input=["two words", "three more words"])
    assert [item.index for item in answer.data] == [0, 1]
    assert len(answer.data[0].embedding) == 3
    assert answer.usage.prompt_tokens == 5
    assert fake_llm.requests[-1].path == "/v1/embeddings"


def test_openai_sdk_lists_the_providers_models(openai_gateway):
    models = client(openai_gateway).models.list()
    assert {model.id for model in models} == {"gpt-4o-mini", "fake-model"}


def test_route_options_model_overrides_the_clients(start_gateway, fake_llm):
    gateway = start_gateway(ai_config(ai_route("openai", f"{fake_llm.url}/v1",
                                               options={"model": "fake-pinned",
                                                        "temperature": 0.2})))
    answer = client(gateway).chat.completions.create(model="gpt-whatever", messages=MESSAGES)
    assert answer.model == "fake-pinned"
    assert fake_llm.requests[-1].body["temperature"] == 0.2


def test_openai_sdk_tool_call_through_the_gateway(openai_gateway):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    answer = client(openai_gateway).chat.completions.create(model="fake-tools",
                                                            messages=MESSAGES, tools=tools)
    call = answer.choices[0].message.tool_calls[0]
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


# -- translated: an Anthropic provider behind the OpenAI API ---------------------------------

def test_openai_sdk_to_anthropic_provider(anthropic_gateway, fake_llm):
    answer = client(anthropic_gateway).chat.completions.create(model="claude-fake",
                                                               messages=MESSAGES)
    assert answer.choices[0].message.content == "echo: hello gateway world"
    assert answer.choices[0].finish_reason == "stop"
    sent = fake_llm.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == PROVIDER_KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    assert sent.body["system"] == "You echo."
    assert sent.body["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "hello gateway world"}]}]
    # Anthropic's usage, as OpenAI's
    assert answer.usage.completion_tokens == 4
    assert answer.usage.prompt_tokens == sent_prompt_tokens(sent.body)


def sent_prompt_tokens(body) -> int:
    # what the fake provider counts (tests/servers/fake_llm.py _prompt_tokens)
    total = 3 + len(body.get("system", "").split())
    for message in body["messages"]:
        content = message["content"]
        total += 3 + len((content if isinstance(content, str) else json.dumps(content)).split())
    return total


def test_openai_sdk_stream_from_anthropic_provider(anthropic_gateway, fake_llm):
    chunks = list(client(anthropic_gateway).chat.completions.create(
        model="claude-fake", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "echo: hello gateway world"
    assert chunks[-1].usage.completion_tokens == 4
    assert fake_llm.requests[-1].body["stream"] is True


def test_openai_sdk_tool_call_from_anthropic_provider(anthropic_gateway):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    stream = client(anthropic_gateway).chat.completions.create(
        model="fake-tools", messages=MESSAGES, tools=tools, stream=True)
    calls = [call for chunk in stream if chunk.choices
             for call in chunk.choices[0].delta.tool_calls or ()]
    assert calls[0].function.name == "weather"
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {"city": "Paris"}


def test_openai_sdk_lists_anthropic_models_in_openai_shape(anthropic_gateway):
    assert [model.id for model in client(anthropic_gateway).models.list()] == ["claude-fake-1"]


def test_anthropic_provider_error_event_mid_stream_reaches_the_openai_client(
        anthropic_gateway):
    stream = client(anthropic_gateway).chat.completions.create(
        model="fake-stream-error", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="Overloaded"):
        list(stream)
