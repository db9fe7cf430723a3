"""Wenxin (Baidu ERNIE): the adapter's pure functions fed JSON and bytes (streams split at
every byte), the access-token cache, then the real `openai` SDK through the gateway's
ai-proxy to a fake Qianfan API speaking Baidu's wire format, OAuth token endpoint included
(tests/servers/fake_wenxin.py)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from harness import wait_for_port
from servers.fake_wenxin import FakeWenxin
from sluicegate.ai import wenxin
from sluicegate.ai.adapter import (
    AdapterError,
    ProviderRequest,
    StreamError,
    adapter_for,
    target_for,
)
from sluicegate.ai.wenxin import WENXIN, AccessTokenCache, to_chat_request

API_KEY = "wx-api-key-3e9"
SECRET_KEY = "wx-secret-key-b71"
TOKEN_TARGET = target_for("http://wenxin.test", {}, [("access_token", "24.tok")])


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\n\n"
                    for e in events)


def event(sentence: int, text: str, end: bool, completion: int = 0) -> dict[str, Any]:
    data = {"id": "as-abc", "object": "chat.completion", "created": 1700000000,
            "sentence_id": sentence, "is_end": end, "is_truncated": False, "result": text,
            "need_clear_history": False,
            "usage": {"prompt_tokens": 7, "completion_tokens": completion,
                      "total_tokens": 7 + completion}}
    if end:
        data["finish_reason"] = "normal"
    return data


STREAM = sse(event(0, "你好", False), event(1, "世界", False), event(2, "朋友", True, 5))


def chunks_of(data: bytes, *cuts: int) -> tuple[list[dict[str, Any]], Any]:
    translator = WENXIN.stream_translator("ernie-4.0-8k", 1700000000)
    chunks: list[dict[str, Any]] = []
    start = 0
    for cut in (*cuts, len(data)):
        chunks += translator.feed(data[start:cut])
        start = cut
    return chunks, translator


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- requests ---------------------------------------------------------------------------------


def test_wenxin_is_registered_as_a_provider():
    assert adapter_for("wenxin") is WENXIN


def test_wenxin_request_goes_to_the_model_endpoint_with_the_token():
    request = WENXIN.chat_request({"model": "ERNIE-Bot-4", "stream": True,
                                   "messages": [{"role": "user", "content": "hi"}]},
                                  TOKEN_TARGET)
    assert request.url == ("http://wenxin.test/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/"
                           "completions_pro?access_token=24.tok")
    assert request.body == {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    plain = WENXIN.chat_request({"model": "ernie-speed-128k",
                                 "messages": [{"role": "user", "content": "hi"}]},
                                TOKEN_TARGET)
    assert plain.url.split("?")[0].endswith("/chat/ernie-speed-128k")


def test_wenxin_request_moves_system_out_merges_turns_and_maps_options():
    body = to_chat_request({
        "temperature": 0, "top_p": 0.5, "max_tokens": 100, "stop": "##", "user": "u-1",
        "response_format": {"type": "json_object"},
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "a"},
                     {"role": "user", "content": [{"type": "text", "text": "b"}]},
                     {"role": "assistant", "content": "c"},
                     {"role": "user", "content": "d"}]})
    assert body == {
        "messages": [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"},
                     {"role": "user", "content": "d"}],
        "system": "Be brief.",
        # Baidu takes temperature in (0, 1]: 0 becomes its smallest value
        "temperature": 0.01, "top_p": 0.5, "max_output_tokens": 100, "stop": ["##"],
        "user_id": "u-1", "response_format": "json_object"}
    assert to_chat_request({"temperature": 1.7,
                            "messages": [{"role": "user", "content": "x"}]})["temperature"] == 1.0


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "ernie-4.0-8k", "messages": [{"role": "assistant", "content": "x"}]},
     "messages[0].role"),
    ({"model": "ernie-4.0-8k", "messages": [{"role": "user", "content": "x"},
                                            {"role": "assistant", "content": "y"}]},
     "messages"),
    ({"model": "ernie-4.0-8k", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]},
     "messages[0].content[0]"),
    ({"model": "ernie-4.0-8k", "tools": [{"type": "function"}],
      "messages": [{"role": "user", "content": "x"}]}, "tools"),
])
def test_wenxin_request_it_cannot_take_is_a_400_naming_the_field(body, param):
    with pytest.raises(AdapterError) as caught:
        WENXIN.chat_request(body, TOKEN_TARGET)
    assert caught.value.status == 400
    assert caught.value.param == param


def test_wenxin_request_never_puts_the_key_pair_in_the_chat_url():
    target = target_for("http://wenxin.test", {},
                        [("client_id", API_KEY), ("client_secret", SECRET_KEY)])
    request = WENXIN.chat_request({"model": "ernie-4.0-8k",
                                   "messages": [{"role": "user", "content": "x"}]}, target)
    assert API_KEY not in request.url and SECRET_KEY not in request.url


# -- answers and errors ---------------------------------------------------------------------


def test_wenxin_answer_becomes_a_chat_completion_with_usage():
    answer = WENXIN.chat_response({
        "id": "as-1", "object": "chat.completion", "created": 1700000001, "result": "好的",
        "is_truncated": False, "need_clear_history": False, "finish_reason": "normal",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}, 0)
    assert answer["id"] == "chatcmpl-as-1"
    assert answer["created"] == 1700000001
    assert answer["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "好的"}}]
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    truncated = WENXIN.chat_response({"result": "x", "is_truncated": True}, 0)
    assert truncated["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("code", "status"), [
    (336501, 429), (18, 429), (336003, 400), (336006, 400), (336100, 503), (6, 403),
    (110, 502), (111, 502), (999999, 502)])
def test_wenxin_error_code_in_a_200_answer_becomes_an_error_status(code, status):
    with pytest.raises(AdapterError) as caught:
        WENXIN.chat_response({"error_code": code, "error_msg": "something"}, 0)
    assert caught.value.status == status
    assert caught.value.code == str(code)
    assert caught.value.as_openai()["error"]["message"] == "wenxin: something"


def test_wenxin_http_error_bodies_become_openai_errors():
    body = json.dumps({"error_code": 336501, "error_msg": "Rate limit reached for RPM"})
    assert WENXIN.error(200, body.encode())["error"]["type"] == "rate_limit_error"
    assert WENXIN.error(503, b"Service Unavailable")["error"] == {
        "message": "Service Unavailable", "type": "api_error", "param": None, "code": None}


# -- access tokens ----------------------------------------------------------------------------


def test_token_cache_keeps_a_token_until_a_day_before_it_expires():
    clock = FakeClock()
    cache = AccessTokenCache(clock)
    cache.put(("u", "k"), "24.t", 2592000)
    clock.now += 2592000 - 86400 - 1
    assert cache.get(("u", "k")) == "24.t"
    clock.now += 1
    assert cache.get(("u", "k")) is None
    cache.put(("u", "k"), "24.short", 60)  # short-lived: kept half its life
    clock.now += 29
    assert cache.get(("u", "k")) == "24.short"
    clock.now += 1
    assert cache.get(("u", "k")) is None


def test_token_response_is_read_and_a_refusal_is_a_502_without_the_secret():
    body = json.dumps({"access_token": "24.abc", "expires_in": 2592000}).encode()
    assert wenxin.parse_token_response(200, body) == ("24.abc", 2592000.0)
    refused = json.dumps({"error": "invalid_client",
                          "error_description": "Client authentication failed"}).encode()
    with pytest.raises(AdapterError) as caught:
        wenxin.parse_token_response(401, refused)
    assert caught.value.status == 502
    assert "Client authentication failed" in caught.value.message


def test_authorize_fetches_a_token_once_and_reuses_it():
    wenxin.TOKENS.clear()
    calls: list[ProviderRequest] = []

    async def send(request: ProviderRequest) -> tuple[int, bytes]:
        calls.append(request)
        return 200, json.dumps({"access_token": f"24.t{len(calls)}",
                                "expires_in": 2592000}).encode()

    target = target_for("http://wenxin.test", {},
                        [("client_id", API_KEY), ("client_secret", SECRET_KEY)])
    first = asyncio.run(WENXIN.authorize(target, send))
    second = asyncio.run(WENXIN.authorize(target, send))
    assert first.query == second.query == [("access_token", "24.t1")]
    assert len(calls) == 1
    assert calls[0].method == "POST"
    assert calls[0].url == ("http://wenxin.test/oauth/2.0/token?grant_type=client_credentials"
                            f"&client_id={API_KEY}&client_secret={SECRET_KEY}")
    # A refused token (error 110/111) empties the cache: the next request gets a new one.
    with pytest.raises(AdapterError):
        WENXIN.chat_response({"error_code": 111, "error_msg": "Access token expired"}, 0)
    assert asyncio.run(WENXIN.authorize(target, send)).query == [("access_token", "24.t2")]
    wenxin.TOKENS.clear()


# -- streams ----------------------------------------------------------------------------------


def test_wenxin_stream_becomes_chunks_then_a_usage_chunk():
    chunks, translator = chunks_of(STREAM)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert deltas[0] == {"role": "assistant", "content": "你好"}
    assert "".join(delta.get("content", "") for delta in deltas) == "你好世界朋友"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == \
        [None, None, "stop"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 5,
                                   "total_tokens": 12}
    assert chunks[0]["id"] == "chatcmpl-as-abc"
    assert translator.done


def test_wenxin_stream_split_at_every_byte_gives_the_same_chunks():
    whole, _ = chunks_of(STREAM)
    for cut in range(len(STREAM) + 1):
        assert chunks_of(STREAM, cut)[0] == whole, cut


def test_wenxin_stream_fed_byte_by_byte_gives_the_same_chunks():
    whole, _ = chunks_of(STREAM)
    assert chunks_of(STREAM, *range(1, len(STREAM)))[0] == whole


def test_wenxin_error_body_in_place_of_a_stream_raises_however_split():
    body = json.dumps({"error_code": 336501, "error_msg": "Rate limit reached for RPM"},
                      indent=1).encode()
    for cut in range(len(body) + 1):
        translator = WENXIN.stream_translator("ernie-4.0-8k", 0)
        with pytest.raises(StreamError) as caught:
            translator.feed(body[:cut])
            translator.feed(body[cut:])
        assert caught.value.error["error"]["code"] == "336501", cut


def test_wenxin_stream_cut_before_is_end_is_not_done():
    _, translator = chunks_of(STREAM[:STREAM.index(b'"is_end": true')])
    assert not translator.done


# -- through the gateway ----------------------------------------------------------------------


@pytest.fixture
def fake_wenxin() -> Iterator[FakeWenxin]:
    fake = FakeWenxin(api_key=API_KEY, secret_key=SECRET_KEY).start()
    yield fake
    fake.stop()


def wenxin_config(fake: FakeWenxin, query: dict[str, str] | None = None,
                  model: str | None = "ernie-4.0-8k") -> dict[str, Any]:
    plugin: dict[str, Any] = {
        "provider": "wenxin", "override": {"endpoint": fake.url},
        "auth": {"query": query or {"client_id": API_KEY, "client_secret": SECRET_KEY}}}
    if model:
        plugin["options"] = {"model": model}
    return {"routes": [{"id": "ernie", "uri": "/v1/*", "plugins": {"ai-proxy": plugin}}],
            "global_rules": [{"id": "observe", "plugins": {"prometheus": {}}}]}


def client(gateway: Any) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="client-key", max_retries=0,
                         timeout=30)


MESSAGES = [{"role": "system", "content": "You echo."},
            {"role": "user", "content": "hello ernie world"}]


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
                    sample.labels.get("provider") == "wenxin":
                found[sample.labels["type"]] = found.get(sample.labels["type"], 0) + \
                    sample.value
    return found


def test_openai_sdk_chat_through_the_gateway_to_wenxin(start_gateway, fake_wenxin):
    gateway = start_gateway(wenxin_config(fake_wenxin))
    sdk = client(gateway)
    for _ in range(3):
        answer = sdk.chat.completions.create(model="ignored", messages=MESSAGES,
                                             temperature=0)
        assert answer.choices[0].message.content == "echo: hello ernie world"
        assert answer.choices[0].finish_reason == "stop"
        # prompt: "hello ernie world" + system "You echo." = 5 words; answer: 4
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 4)
    assert fake_wenxin.issued == 1  # one token, cached for the next requests
    sent = fake_wenxin.requests[-1]
    assert sent.path == "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/ernie-4.0-8k"
    assert set(sent.query) == {"access_token"}  # the key pair never reaches the chat API
    assert sent.body == {"messages": [{"role": "user", "content": "hello ernie world"}],
                         "system": "You echo.", "temperature": 0.01}
    assert token_samples(gateway) == {"prompt": 15, "completion": 12}


def test_openai_sdk_stream_through_the_gateway_to_wenxin(start_gateway, fake_wenxin):
    gateway = start_gateway(wenxin_config(fake_wenxin))
    chunks = list(client(gateway).chat.completions.create(
        model="ignored", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "echo: hello ernie world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == 9
    assert fake_wenxin.requests[-1].body["stream"] is True
    assert token_samples(gateway) == {"prompt": 5, "completion": 4}


def test_wenxin_error_codes_reach_the_sdk_as_http_statuses(start_gateway, fake_wenxin):
    import openai

    gateway = start_gateway(wenxin_config(fake_wenxin))
    with pytest.raises(openai.RateLimitError) as limited:
        client(gateway).chat.completions.create(
            model="ignored", messages=[{"role": "user", "content": "[[error:336501]]"}])
    assert "Rate limit reached for RPM" in limited.value.message
    unknown = start_gateway(wenxin_config(fake_wenxin, model="no-such-model"))
    with pytest.raises(openai.APIStatusError) as failed:
        client(unknown).chat.completions.create(model="x", messages=MESSAGES)
    assert failed.value.status_code == 502
    assert "Unsupported openapi method" in failed.value.message


def test_wenxin_expired_token_fails_once_then_a_new_one_is_fetched(start_gateway,
                                                                   fake_wenxin):
    import openai

    gateway = start_gateway(wenxin_config(fake_wenxin))
    sdk = client(gateway)
    sdk.chat.completions.create(model="x", messages=MESSAGES)
    fake_wenxin.expire_tokens()
    with pytest.raises(openai.APIStatusError) as expired:
        sdk.chat.completions.create(model="x", messages=MESSAGES)
    assert expired.value.status_code == 502
    assert "Access token expired" in expired.value.message
    assert sdk.chat.completions.create(model="x", messages=MESSAGES).choices[0] \
        .message.content == "echo: hello ernie world"
    assert fake_wenxin.issued == 2


def test_wenxin_wrong_secret_is_a_502_naming_baidus_reason(start_gateway, fake_wenxin):
    import openai

    gateway = start_gateway(wenxin_config(
        fake_wenxin, {"client_id": API_KEY, "client_secret": "wrong-secret"}))
    with pytest.raises(openai.APIStatusError) as failed:
        client(gateway).chat.completions.create(model="x", messages=MESSAGES)
    assert failed.value.status_code == 502
    assert "Client authentication failed" in failed.value.message
    assert "wrong-secret" not in failed.value.message
    assert "wrong-secret" not in gateway.log()


def test_wenxin_static_access_token_is_used_as_given(start_gateway, fake_wenxin):
    import openai

    gateway = start_gateway(wenxin_config(fake_wenxin, {"access_token": "24.not-issued"}))
    with pytest.raises(openai.APIStatusError) as failed:
        client(gateway).chat.completions.create(model="x", messages=MESSAGES)
    assert "Access token invalid" in failed.value.message
    assert fake_wenxin.requests[-1].query == {"access_token": "24.not-issued"}
    assert fake_wenxin.issued == 0


def test_wenxin_stream_cut_mid_way_ends_with_an_error_event(start_gateway, fake_wenxin):
    import openai

    gateway = start_gateway(wenxin_config(fake_wenxin))
    stream = client(gateway).chat.completions.create(
        model="x", stream=True,
        messages=[{"role": "user", "content": "one two three four five [[cut]]"}])
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk)
    assert received
