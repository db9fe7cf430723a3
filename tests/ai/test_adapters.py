"""The pure adapter functions (ai/): requests, answers, errors and streams translated
between OpenAI's form and the providers', fed JSON and bytes."""

from __future__ import annotations

import json

import pytest

from sluicegate.ai.adapter import (
    ADAPTERS,
    AdapterError,
    StreamError,
    adapter_for,
    target_for,
)
from sluicegate.ai.anthropic import ANTHROPIC, DEFAULT_MAX_TOKENS, to_messages_request
from sluicegate.ai.front import (
    AnthropicStreamEncoder,
    OpenAIStreamEncoder,
    chat_to_message,
    check_chat_request,
    messages_to_chat,
)
from sluicegate.ai.openai import OPENAI, error_object
from sluicegate.ai.tokens import estimate_prompt_tokens, estimate_tokens
from sluicegate.proto.sse import SseParser

TARGET = target_for("http://llm.test/v1", {"Authorization": "Bearer k"})


def openai_sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + \
        b"data: [DONE]\n\n"


def anthropic_sse(*events: dict) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


ANTHROPIC_TEXT_STREAM = anthropic_sse(
    {"type": "message_start", "message": {"id": "msg_1", "model": "claude-x", "usage": {
        "input_tokens": 10, "cache_read_input_tokens": 2, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta",
                                                         "partial_json": '{"city":'}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta",
                                                         "partial_json": '"Oslo"}'}},
    {"type": "content_block_stop", "index": 1},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {
        "output_tokens": 7}},
    {"type": "message_stop"},
)


def test_registry_names_every_provider_and_loads_its_adapter():
    for name in ("openai", "azure-openai", "deepseek", "mistral", "ollama",
                 "openai-compatible", "anthropic"):
        assert name in ADAPTERS
        assert adapter_for(name).name == name


def test_endpoint_given_as_full_api_url_keeps_its_query():
    target = target_for("https://x.openai.azure.com/openai/deployments/d/chat/completions"
                        "?api-version=2024-10-21", {"api-key": "k"})
    assert target.url("/embeddings") == ("https://x.openai.azure.com/openai/deployments/d/"
                                         "embeddings?api-version=2024-10-21")


def test_openai_stream_request_asks_for_usage_without_touching_the_original():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    request = OPENAI.chat_request(body, TARGET)
    assert request.url == "http://llm.test/v1/chat/completions"
    assert request.body["stream_options"] == {"include_usage": True}
    assert "stream_options" not in body
    assert request.headers["Authorization"] == "Bearer k"


def test_openai_stream_split_anywhere_gives_the_same_chunks_and_usage():
    data = openai_sse(
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]},
        {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1,
                                             "total_tokens": 4}})
    for cut in range(len(data) + 1):
        stream = OPENAI.stream_translator("m", 0)
        chunks = stream.feed(data[:cut]) + stream.feed(data[cut:])
        assert len(chunks) == 3 and stream.done
        assert (stream.usage.prompt_tokens, stream.usage.completion_tokens) == (3, 1)


def test_openai_error_inside_a_stream_raises():
    stream = OPENAI.stream_translator("m", 0)
    with pytest.raises(StreamError) as caught:
        stream.feed(b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')
    assert caught.value.error["error"]["message"] == "overloaded"


@pytest.mark.parametrize(("body", "message", "kind"), [
    (b'{"error": {"message": "bad model", "type": "invalid_request_error", "param": "model",'
     b' "code": "model_not_found"}}', "bad model", "invalid_request_error"),
    (b'{"error": "model \\"x\\" not found"}', 'model "x" not found', "not_found_error"),
    (b'{"object": "error", "message": "Invalid model", "type": "invalid_model"}',
     "Invalid model", "invalid_model"),
    (b'{"detail": "Not Found"}', "Not Found", "not_found_error"),
    (b"<html>404</html>", "<html>404</html>", "not_found_error"),
])
def test_openai_family_error_shapes_become_openai_error_objects(body, message, kind):
    error = OPENAI.error(404, body)["error"]
    assert (error["message"], error["type"]) == (message, kind)


def test_openai_error_object_keeps_param_and_code():
    error = error_object({"error": {"message": "m", "param": "model", "code": "x"}}, 400)
    assert error["error"]["param"] == "model" and error["error"]["code"] == "x"


# -- Anthropic as a provider -----------------------------------------------------------------

def test_openai_request_becomes_a_messages_request():
    body = {
        "model": "claude-x", "stream": True, "stop": "END", "user": "u1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "look", "arguments": '{"x": 1}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
        ],
        "tools": [{"type": "function", "function": {"name": "look", "parameters": {
            "type": "object"}}}],
        "tool_choice": "required",
    }
    request = to_messages_request(body)
    assert request["system"] == "Be brief."
    assert request["max_tokens"] == DEFAULT_MAX_TOKENS
    assert request["stop_sequences"] == ["END"]
    assert request["metadata"] == {"user_id": "u1"}
    user, assistant, tool = request["messages"]
    assert user["content"][1] == {"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "AAAA"}}
    assert assistant["content"] == [{"type": "tool_use", "id": "call_1", "name": "look",
                                     "input": {"x": 1}}]
    assert tool == {"role": "user", "content": [{"type": "tool_result",
                                                 "tool_use_id": "call_1",
                                                 "content": "a cat"}]}
    assert request["tools"] == [{"name": "look", "input_schema": {"type": "object"}}]
    assert request["tool_choice"] == {"type": "any"}
    http = ANTHROPIC.chat_request(body, TARGET)
    assert http.url == "http://llm.test/v1/messages"
    assert http.headers["anthropic-version"] == "2023-06-01"


def test_messages_request_refuses_what_anthropic_cannot_do_naming_the_field():
    with pytest.raises(AdapterError) as caught:
        to_messages_request({"model": "c", "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]})
    assert caught.value.param == "messages[0].content[0].type"
    with pytest.raises(AdapterError) as caught:
        to_messages_request({"model": "c", "n": 2, "messages": [{"role": "user",
                                                                 "content": "x"}]})
    assert caught.value.param == "n"


def test_messages_answer_becomes_a_chat_completion():
    answer = ANTHROPIC.chat_response({
        "id": "msg_1", "type": "message", "model": "claude-x", "stop_reason": "max_tokens",
        "content": [{"type": "text", "text": "Hi"},
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}],
        "usage": {"input_tokens": 4, "output_tokens": 2, "cache_creation_input_tokens": 3}},
        created=123)
    choice = answer["choices"][0]
    assert choice["message"]["content"] == "Hi"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "f",
                                                              "arguments": '{"a": 1}'}
    assert choice["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert answer["created"] == 123


def test_anthropic_stream_split_anywhere_gives_the_same_chunks():
    expected = None
    for cut in range(len(ANTHROPIC_TEXT_STREAM) + 1):
        stream = ANTHROPIC.stream_translator("claude-x", 5)
        chunks = stream.feed(ANTHROPIC_TEXT_STREAM[:cut]) + \
            stream.feed(ANTHROPIC_TEXT_STREAM[cut:])
        if expected is None:
            expected = chunks
        assert chunks == expected and stream.done
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in expected
                   if c["choices"])
    assert text == "Hello"
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in expected
             if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert calls[0]["id"] == "toolu_1" and calls[0]["function"]["name"] == "weather"
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city":"Oslo"}'
    finish = [c["choices"][0]["finish_reason"] for c in expected if c["choices"]]
    assert finish[-1] == "tool_calls"
    assert expected[-1]["choices"] == []
    assert expected[-1]["usage"] == {"prompt_tokens": 12, "completion_tokens": 7,
                                     "total_tokens": 19}


def test_anthropic_error_event_raises_with_its_message():
    stream = ANTHROPIC.stream_translator("c", 0)
    with pytest.raises(StreamError) as caught:
        stream.feed(anthropic_sse({"type": "error", "error": {"type": "overloaded_error",
                                                              "message": "Overloaded"}}))
    assert caught.value.error["error"] == {"message": "Overloaded", "type": "overloaded_error",
                                           "param": None, "code": None}


def test_anthropic_error_body_becomes_an_openai_error():
    error = ANTHROPIC.error(429, b'{"type":"error","error":{"type":"rate_limit_error",'
                                 b'"message":"slow down"}}')["error"]
    assert (error["message"], error["type"]) == ("slow down", "rate_limit_error")


def test_anthropic_has_no_embeddings():
    with pytest.raises(AdapterError):
        ANTHROPIC.embeddings_request({"input": "x"}, TARGET)


# -- the Anthropic front ---------------------------------------------------------------------

def test_messages_request_becomes_an_openai_chat_request():
    chat = messages_to_chat({
        "model": "m", "max_tokens": 50, "system": [{"type": "text", "text": "Sys"}],
        "stop_sequences": ["X"], "metadata": {"user_id": "u"}, "stream": True,
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "f"},
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                               "input": {"q": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": "42"},
                                         {"type": "text", "text": "thanks"}]},
        ]})
    assert chat["messages"] == [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "t1", "type": "function", "function": {"name": "f",
                                                         "arguments": '{"q": 1}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "42"},
        {"role": "user", "content": "thanks"},
    ]
    assert chat["max_tokens"] == 50 and chat["stop"] == ["X"] and chat["user"] == "u"
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    check_chat_request(chat)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
     "messages[0].role"),
])
def test_malformed_messages_request_names_the_field(body, param):
    with pytest.raises(AdapterError) as caught:
        messages_to_chat(body)
    assert caught.value.param == param


@pytest.mark.parametrize(("body", "param"), [
    ([], "body"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": ["hi"]}, "messages[0]"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
])
def test_malformed_chat_request_names_the_field(body, param):
    with pytest.raises(AdapterError) as caught:
        check_chat_request(body)
    assert caught.value.param == param


def test_chat_completion_becomes_a_messages_answer():
    message = chat_to_message({
        "id": "c1", "model": "m", "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        "choices": [{"message": {"content": "Hi", "tool_calls": [{
            "id": "t", "function": {"name": "f", "arguments": '{"a":1}'}}]},
            "finish_reason": "tool_calls"}]})
    assert message["content"] == [{"type": "text", "text": "Hi"},
                                  {"type": "tool_use", "id": "t", "name": "f",
                                   "input": {"a": 1}}]
    assert message["stop_reason"] == "tool_use"
    assert message["usage"] == {"input_tokens": 3, "output_tokens": 4}


def test_openai_chunks_become_the_messages_event_sequence():
    encoder = AnthropicStreamEncoder("m", input_tokens=9)
    chunks = [
        {"id": "c", "model": "m", "choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"id": "c", "choices": [{"delta": {"content": "Hi"}}]},
        {"id": "c", "choices": [{"delta": {"tool_calls": [{"index": 0, "id": "t", "function": {
            "name": "f", "arguments": ""}}]}}]},
        {"id": "c", "choices": [{"delta": {"tool_calls": [{"index": 0, "function": {
            "arguments": "{}"}}]}}]},
        {"id": "c", "choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
    ]
    data = b"".join(encoder.chunk(chunk) for chunk in chunks)
    from sluicegate.ai.adapter import Usage

    data += encoder.end(Usage(9, 5))
    events = SseParser().feed(data)
    kinds = [event.event for event in events]
    assert kinds == ["message_start", "content_block_start", "content_block_delta",
                     "content_block_stop", "content_block_start", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]
    delta = json.loads(events[-2].data)
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"] == {"output_tokens": 5, "input_tokens": 9}
    start = json.loads(events[0].data)
    assert start["message"]["usage"]["input_tokens"] == 9


def test_openai_encoder_hides_the_usage_chunk_the_client_did_not_ask_for():
    encoder = OpenAIStreamEncoder(include_usage=False)
    assert encoder.chunk({"choices": [], "usage": {"prompt_tokens": 1}}) == b""
    assert b"usage" not in encoder.chunk({"choices": [{"delta": {}}], "usage": None})
    assert OpenAIStreamEncoder(include_usage=True).chunk(
        {"choices": [], "usage": {"prompt_tokens": 1}}).startswith(b"data: {")


def test_token_estimate_counts_words_and_wide_characters():
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcdefgh") >= 1
    assert estimate_tokens("你好世界") >= 2
    body = {"messages": [{"role": "user", "content": "hello there"}]}
    assert estimate_prompt_tokens(body) > estimate_tokens("hello there")
