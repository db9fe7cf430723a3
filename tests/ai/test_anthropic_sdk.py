"""The real `anthropic` SDK against the gateway's Messages API: translated to a provider
speaking OpenAI's format, and to one speaking Anthropic's own."""

from __future__ import annotations

import anthropic
import pytest

TOOLS = [{"name": "weather", "description": "Weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
MESSAGES = [{"role": "user", "content": "hello gateway world"}]


def client(gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key="client-key", max_retries=0,
                               timeout=30)


def test_anthropic_sdk_message_from_an_openai_provider(openai_gateway, fake_llm):
    message = client(openai_gateway).messages.create(
        model="fake-model", max_tokens=64, system="You echo.", messages=MESSAGES)
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: hello gateway world"
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 4
    sent = fake_llm.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["messages"] == [{"role": "system", "content": "You echo."},
                                     {"role": "user", "content": "hello gateway world"}]
    assert sent.body["max_tokens"] == 64
    # the fake counts 3 + (3 + 2 words) + (3 + 3 words)
    assert message.usage.input_tokens == 14


def test_anthropic_sdk_stream_from_an_openai_provider(openai_gateway):
    with client(openai_gateway).messages.stream(model="fake-model", max_tokens=64,
                                                messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "echo: hello gateway world"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 4
    assert final.usage.input_tokens == 9  # the provider's figure: 3 + (3 + 3 words)


def test_anthropic_sdk_tool_use_from_an_openai_provider(openai_gateway, fake_llm):
    message = client(openai_gateway).messages.create(model="fake-tools", max_tokens=64,
                                                     tools=TOOLS, messages=MESSAGES)
    block = message.content[0]
    assert (block.type, block.name, block.input) == ("tool_use", "weather", {"city": "Paris"})
    assert message.stop_reason == "tool_use"
    assert fake_llm.requests[-1].body["tools"][0]["function"]["name"] == "weather"


def test_anthropic_sdk_streamed_tool_use_from_an_openai_provider(openai_gateway):
    with client(openai_gateway).messages.stream(model="fake-tools", max_tokens=64,
                                                tools=TOOLS, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "tool_use"
    assert final.content[0].input == {"city": "Paris"}
    assert final.stop_reason == "tool_use"


def test_anthropic_sdk_tool_result_reaches_an_openai_provider_as_a_tool_message(
        openai_gateway, fake_llm):
    client(openai_gateway).messages.create(model="fake-model", max_tokens=64, tools=TOOLS,
                                           messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                           "name": "weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "sunny"}]},
    ])
    sent = fake_llm.requests[-1].body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "toolu_1"
    assert sent[2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}


def test_anthropic_sdk_through_the_gateway_to_an_anthropic_provider(anthropic_gateway,
                                                                    fake_llm):
    message = client(anthropic_gateway).messages.create(
        model="claude-fake", max_tokens=64, system="You echo.", messages=MESSAGES)
    assert message.content[0].text == "echo: hello gateway world"
    sent = fake_llm.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.body["system"] == "You echo."
    assert sent.body["max_tokens"] == 64
    with client(anthropic_gateway).messages.stream(model="claude-fake", max_tokens=64,
                                                   messages=MESSAGES) as stream:
        assert "".join(stream.text_stream) == "echo: hello gateway world"


def test_anthropic_sdk_lists_models_in_anthropic_shape(openai_gateway):
    models = client(openai_gateway).models.list()
    assert {model.id for model in models} == {"gpt-4o-mini", "fake-model"}
    assert all(model.type == "model" for model in models)


def test_provider_rate_limit_reaches_the_anthropic_client_in_its_shape(openai_gateway):
    with pytest.raises(anthropic.RateLimitError) as caught:
        client(openai_gateway).messages.create(model="fake-429", max_tokens=8,
                                               messages=MESSAGES)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    assert "Rate limit reached" in caught.value.body["error"]["message"]


def test_unknown_model_is_a_not_found_for_the_anthropic_client(openai_gateway):
    with pytest.raises(anthropic.NotFoundError, match="does not exist"):
        client(openai_gateway).messages.create(model="no-such-model", max_tokens=8,
                                               messages=MESSAGES)


def test_anthropic_sdk_stream_cut_by_the_provider_ends_with_an_error(openai_gateway):
    with pytest.raises(anthropic.APIStatusError), client(openai_gateway).messages.stream(
            model="fake-cut", max_tokens=64, messages=MESSAGES) as stream:
        "".join(stream.text_stream)
