"""Gemini: the adapter's pure functions fed JSON and bytes (streams split at every byte),
then the real `openai` SDK through the gateway's ai-proxy to a fake Gemini API speaking
Google's wire format (tests/servers/fake_gemini.py)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from harness import wait_for_port
from servers.fake_gemini import FakeGemini, generate_response
from sluicegate.ai.adapter import AdapterError, StreamError, adapter_for, target_for
from sluicegate.ai.gemini import GEMINI, to_generate_request

KEY = "gemini-key-7a1f"
HEADER_TARGET = target_for("http://gemini.test/v1beta", {"x-goog-api-key": KEY})
QUERY_TARGET = target_for("http://gemini.test/v1beta", {}, [("key", KEY)])


def sse(*responses: dict[str, Any]) -> bytes:
    """A streamGenerateContent?alt=sse body, with Google's CRLF line ends."""
    return b"".join(b"data: " + json.dumps(r).encode() + b"\r\n\r\n" for r in responses)


STREAM = sse(
    generate_response("Bon", 9, None, 0, None, "gemini-2.0-flash-001"),
    generate_response("jour é", 9, None, 0, None, "gemini-2.0-flash-001"),
    generate_response("t\u00e9!", 9, 4, 2, "STOP", "gemini-2.0-flash-001"),
)


def chunks_of(data: bytes, *cuts: int) -> tuple[list[dict[str, Any]], Any]:
    translator = GEMINI.stream_translator("gemini-2.0-flash", 1700000000)
    chunks: list[dict[str, Any]] = []
    start = 0
    for cut in (*cuts, len(data)):
        chunks += translator.feed(data[start:cut])
        start = cut
    return chunks, translator


# -- requests ---------------------------------------------------------------------------------


def test_gemini_is_registered_as_a_provider():
    assert adapter_for("gemini") is GEMINI


def test_gemini_request_maps_roles_system_and_generation_options():
    request = GEMINI.chat_request({
        "model": "gemini-2.0-flash", "temperature": 0.3, "top_p": 0.9, "max_tokens": 50,
        "stop": "END", "n": 1, "seed": 7,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "developer", "content": "Use French."},
                     {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "salut"},
                     {"role": "user", "content": [{"type": "text", "text": "again"}]},
                     {"role": "user", "content": "and again"}]}, HEADER_TARGET)
    assert request.method == "POST"
    assert request.url == "http://gemini.test/v1beta/models/gemini-2.0-flash:generateContent"
    assert request.headers["x-goog-api-key"] == KEY
    assert request.body == {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]},
                     {"role": "model", "parts": [{"text": "salut"}]},
                     # consecutive user turns become one: Gemini wants them alternating
                     {"role": "user", "parts": [{"text": "again"}, {"text": "and again"}]}],
        "systemInstruction": {"parts": [{"text": "Be brief.\nUse French."}]},
        "generationConfig": {"temperature": 0.3, "topP": 0.9, "candidateCount": 1,
                             "seed": 7, "maxOutputTokens": 50, "stopSequences": ["END"]}}


def test_gemini_stream_request_asks_for_sse_and_keeps_the_query_key():
    request = GEMINI.chat_request({"model": "models/gemini-2.5-pro", "stream": True,
                                   "messages": [{"role": "user", "content": "x"}]},
                                  QUERY_TARGET)
    assert request.url == ("http://gemini.test/v1beta/models/gemini-2.5-pro:"
                           f"streamGenerateContent?alt=sse&key={KEY}")
    assert request.headers["Accept"] == "text/event-stream"


def test_gemini_request_takes_inline_images_and_json_mode():
    body = to_generate_request({
        "response_format": {"type": "json_object"},
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is it?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}]}]})
    assert body["contents"][0]["parts"][1] == {"inlineData": {"mimeType": "image/png",
                                                              "data": "iVBORw0K"}}
    assert body["generationConfig"] == {"responseMimeType": "application/json"}


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "gemini-2.0-flash", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"model": "gemini-2.0-flash", "messages": [{"role": "tool", "content": "42"}]},
     "messages[0].role"),
    ({"model": "gemini-2.0-flash", "messages": [{"role": "system", "content": "only"}]},
     "messages"),
    ({"model": "gemini-2.0-flash", "tools": [{"type": "function"}],
      "messages": [{"role": "user", "content": "x"}]}, "tools"),
])
def test_gemini_request_it_cannot_take_is_a_400_naming_the_field(body, param):
    with pytest.raises(AdapterError) as caught:
        GEMINI.chat_request(body, HEADER_TARGET)
    assert caught.value.status == 400
    assert caught.value.param == param


# -- answers and errors ---------------------------------------------------------------------


def test_gemini_answer_becomes_a_chat_completion_with_usage():
    data = generate_response("Hello there", 6, 2, 3, "STOP", "gemini-2.0-flash-001")
    answer = GEMINI.chat_response(data, 1700000000)
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "gemini-2.0-flash-001"
    assert answer["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "Hello there"}}]
    # thoughts are billed as output: completion = candidates + thoughts
    assert answer["usage"] == {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}


@pytest.mark.parametrize(("reason", "expected"), [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"),
    ("RECITATION", "content_filter"), ("OTHER", "stop"), ("SOMETHING_NEW", "stop")])
def test_gemini_finish_reasons_map_to_openai(reason, expected):
    data = generate_response("x", 1, 1, 0, reason, "v")
    assert GEMINI.chat_response(data, 0)["choices"][0]["finish_reason"] == expected


def test_gemini_blocked_prompt_is_an_empty_filtered_answer():
    answer = GEMINI.chat_response({"promptFeedback": {"blockReason": "SAFETY"},
                                   "usageMetadata": {"promptTokenCount": 3,
                                                     "totalTokenCount": 3}}, 0)
    assert answer["choices"][0]["finish_reason"] == "content_filter"
    assert answer["choices"][0]["message"]["content"] == ""
    assert answer["usage"]["prompt_tokens"] == 3


def test_gemini_error_body_becomes_an_openai_error():
    body = json.dumps({"error": {"code": 429, "message": "Quota exceeded",
                                 "status": "RESOURCE_EXHAUSTED"}}).encode()
    assert GEMINI.error(429, body) == {"error": {
        "message": "Quota exceeded", "type": "rate_limit_error", "param": None,
        "code": "resource_exhausted"}}
    key = json.dumps({"error": {"code": 400, "message": "API key not valid.",
                                "status": "INVALID_ARGUMENT"}}).encode()
    assert GEMINI.error(400, key)["error"]["type"] == "invalid_request_error"
    html = GEMINI.error(502, b"<html>bad gateway</html>")
    assert html["error"]["message"] == "<html>bad gateway</html>"
    assert html["error"]["type"] == "api_error"


def test_gemini_models_and_embeddings_translate():
    models = GEMINI.models_response({"models": [{"name": "models/gemini-2.0-flash"}]})
    assert models == {"object": "list", "data": [{"id": "gemini-2.0-flash", "object": "model",
                                                  "created": 0, "owned_by": "google"}]}
    request = GEMINI.embeddings_request({"model": "text-embedding-004", "input": ["a", "b"]},
                                        HEADER_TARGET)
    assert request.url.endswith("/models/text-embedding-004:batchEmbedContents")
    assert request.body["requests"][1] == {"model": "models/text-embedding-004",
                                           "content": {"parts": [{"text": "b"}]}}
    answer = GEMINI.embeddings_response({"embeddings": [{"values": [0.5]}, {"values": [1.0]}]})
    assert [item["embedding"] for item in answer["data"]] == [[0.5], [1.0]]


# -- streams ----------------------------------------------------------------------------------


def test_gemini_stream_becomes_chunks_then_a_usage_chunk():
    chunks, translator = chunks_of(STREAM)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert deltas[0] == {"role": "assistant", "content": "Bon"}
    assert "".join(delta.get("content", "") for delta in deltas) == "Bonjour été!"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == \
        [None, None, "stop"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 6,
                                   "total_tokens": 15}
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert translator.done
    assert translator.usage.total_tokens == 15


def test_gemini_stream_split_at_every_byte_gives_the_same_chunks():
    whole, _ = chunks_of(STREAM)
    for cut in range(len(STREAM) + 1):
        assert chunks_of(STREAM, cut)[0] == whole, cut


def test_gemini_stream_fed_byte_by_byte_gives_the_same_chunks():
    whole, _ = chunks_of(STREAM)
    assert chunks_of(STREAM, *range(1, len(STREAM)))[0] == whole


def test_gemini_stream_cut_before_the_finish_is_not_done():
    _, translator = chunks_of(STREAM[:STREAM.index(b"STOP")])
    assert not translator.done


def test_gemini_stream_error_event_raises():
    error = sse({"error": {"code": 503, "message": "The model is overloaded.",
                           "status": "UNAVAILABLE"}})
    translator = GEMINI.stream_translator("gemini-2.0-flash", 0)
    with pytest.raises(StreamError) as caught:
        translator.feed(error)
    assert caught.value.error["error"]["message"] == "The model is overloaded."


# -- through the gateway ----------------------------------------------------------------------


@pytest.fixture
def fake_gemini() -> Iterator[FakeGemini]:
    fake = FakeGemini(api_key=KEY).start()
    yield fake
    fake.stop()


def gemini_config(fake: FakeGemini, auth: dict[str, Any] | None = None) -> dict[str, Any]:
    plugin = {"provider": "gemini", "auth": auth or {"header": {"x-goog-api-key": KEY}},
              "override": {"endpoint": f"{fake.url}/v1beta"}}
    return {"routes": [{"id": "gemini", "uri": "/v1/*", "plugins": {"ai-proxy": plugin}}],
            "global_rules": [{"id": "observe", "plugins": {"prometheus": {}}}]}


def client(gateway: Any) -> Any:
    import openai

    # The client's key is not Google's: the gateway holds that one.
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="client-key", max_retries=0,
                         timeout=30)


MESSAGES = [{"role": "system", "content": "You echo."},
            {"role": "user", "content": "hello gemini world"}]


def token_samples(gateway: Any) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    wait_for_port(gateway.metrics_port, process=gateway.process)
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics",
                                timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sluicegate_ai_tokens_total" and \
                    sample.labels.get("provider") == "gemini":
                kind = sample.labels["type"]
                found[kind] = found.get(kind, 0) + sample.value
    return found


def test_openai_sdk_chat_through_the_gateway_to_gemini(start_gateway, fake_gemini):
    gateway = start_gateway(gemini_config(fake_gemini))
    answer = client(gateway).chat.completions.create(model="gemini-2.0-flash",
                                                     messages=MESSAGES, temperature=0.5)
    assert answer.choices[0].message.content == "echo: hello gemini world"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.model == "gemini-2.0-flash-001"
    # prompt: "You echo." + "hello gemini world" = 5 words; answer: 4 words
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens,
            answer.usage.total_tokens) == (5, 4, 9)
    sent = fake_gemini.requests[-1]
    assert sent.path == "/v1beta/models/gemini-2.0-flash:generateContent"
    assert sent.headers["x-goog-api-key"] == KEY
    assert "authorization" not in sent.headers  # the client's key stays at the gateway
    assert sent.body["systemInstruction"] == {"parts": [{"text": "You echo."}]}
    assert sent.body["generationConfig"] == {"temperature": 0.5}
    assert token_samples(gateway) == {"prompt": 5, "completion": 4}


def test_openai_sdk_stream_through_the_gateway_to_gemini(start_gateway, fake_gemini):
    gateway = start_gateway(gemini_config(fake_gemini, {"query": {"key": KEY}}))
    chunks = list(client(gateway).chat.completions.create(
        model="gemini-2.0-flash", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "echo: hello gemini world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == 9
    sent = fake_gemini.requests[-1]
    assert sent.path.endswith(":streamGenerateContent")
    assert sent.query == {"alt": "sse", "key": KEY}
    assert token_samples(gateway) == {"prompt": 5, "completion": 4}


def test_gemini_errors_reach_the_sdk_with_their_status_and_message(start_gateway,
                                                                   fake_gemini):
    import openai

    gateway = start_gateway(gemini_config(fake_gemini))
    sdk = client(gateway)
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.chat.completions.create(model="gemini-2.0-flash",
                                    messages=[{"role": "user", "content": "[[status:429]]"}])
    assert "asked to fail with 429" in limited.value.message
    assert limited.value.response.headers["retry-after"] == "7"
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="palm-2", messages=MESSAGES)
    assert "models/palm-2 is not found" in missing.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model="gemini-2.0-flash",
                                    messages=[{"role": "tool", "content": "42",
                                               "tool_call_id": "t1"}])
    assert bad.value.body["param"] == "messages[0].role"
    wrong_key = start_gateway(gemini_config(fake_gemini, {"header": {"x-goog-api-key": "x"}}))
    with pytest.raises(openai.BadRequestError) as refused:
        client(wrong_key).chat.completions.create(model="gemini-2.0-flash", messages=MESSAGES)
    assert "API key not valid" in refused.value.message


def test_gemini_stream_cut_mid_way_ends_with_an_error_event(start_gateway, fake_gemini):
    import openai

    gateway = start_gateway(gemini_config(fake_gemini))
    stream = client(gateway).chat.completions.create(
        model="gemini-2.0-flash", stream=True,
        messages=[{"role": "user", "content": "one two three four five [[cut]]"}])
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk)
    assert received  # the words before the cut arrived
