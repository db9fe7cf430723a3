"""ai-proxy faults, bad input, token accounting (metrics, access log), secrets and config,
with the real `openai` SDK, the gateway as a process and the fake provider."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from ai.gateways import PROVIDER_KEY, ai_config, ai_route, samples, scrape
from harness import free_port
from sluicegate.config.load import ConfigError, validate_config

MESSAGES = [{"role": "user", "content": "hello gateway world"}]


def client(gateway, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="client-key", max_retries=0,
                         timeout=30, **options)


def post(url: str, body: bytes, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json",
                                                 **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


# -- provider faults -------------------------------------------------------------------------

def test_provider_rate_limit_reaches_the_client_with_retry_after(openai_gateway):
    with pytest.raises(openai.RateLimitError) as caught:
        client(openai_gateway).chat.completions.create(model="fake-429", messages=MESSAGES)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code == "rate_limit_exceeded"
    assert "Rate limit reached" in caught.value.message


def test_provider_server_error_is_a_502_with_the_providers_message(openai_gateway):
    with pytest.raises(openai.APIStatusError) as caught:
        client(openai_gateway).chat.completions.create(model="fake-500", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert "The server had an error" in caught.value.message


def test_anthropic_provider_rate_limit_reaches_the_openai_client(anthropic_gateway):
    with pytest.raises(openai.RateLimitError) as caught:
        client(anthropic_gateway).chat.completions.create(model="fake-429",
                                                          messages=MESSAGES)
    assert caught.value.response.headers["retry-after"] == "7"
    assert "per-minute rate limit" in caught.value.message


def test_unknown_model_is_a_404_from_the_provider(openai_gateway):
    with pytest.raises(openai.NotFoundError) as caught:
        client(openai_gateway).chat.completions.create(model="no-such-model",
                                                       messages=MESSAGES)
    assert caught.value.code == "model_not_found"


def test_provider_that_does_not_answer_in_time_is_a_504(start_gateway, fake_llm):
    gateway = start_gateway(ai_config(ai_route("openai", f"{fake_llm.url}/v1",
                                               timeout=300)))
    with pytest.raises(openai.APIStatusError) as caught:
        client(gateway).chat.completions.create(model="fake-hang", messages=MESSAGES)
    assert caught.value.status_code == 504


def test_unreachable_provider_is_a_502(start_gateway):
    gateway = start_gateway(ai_config(ai_route("openai",
                                               f"http://127.0.0.1:{free_port()}/v1")))
    with pytest.raises(openai.APIStatusError) as caught:
        client(gateway).chat.completions.create(model="fake-model", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert "cannot connect to the provider" in caught.value.message


def test_stream_cut_by_the_provider_ends_the_clients_stream_with_an_error(openai_gateway):
    stream = client(openai_gateway).chat.completions.create(model="fake-cut",
                                                            messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="cut short"):
        list(stream)


def test_client_leaving_mid_stream_cancels_the_provider_request(openai_gateway, fake_llm):
    stream = client(openai_gateway).chat.completions.create(model="fake-slow",
                                                            messages=MESSAGES, stream=True)
    received = []
    for chunk in stream:
        received.append(chunk)
        if len(received) == 3:
            break
    stream.close()
    assert fake_llm.wait_for(lambda: fake_llm.cancelled >= 1)

    def counted() -> bool:
        errors = samples(scrape(openai_gateway), "sluicegate_ai_errors_total")
        return any(labels["type"] == "client_closed" for labels, _ in errors)

    assert wait_until(counted)


# -- bad input -------------------------------------------------------------------------------

def test_malformed_json_is_a_400_naming_the_body(openai_gateway):
    status, body = post(f"{openai_gateway.url}/v1/chat/completions", b'{"model": "fake-')
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "body"


def test_message_of_the_wrong_shape_is_a_400_naming_the_field(openai_gateway, fake_llm):
    with pytest.raises(openai.BadRequestError) as caught:
        client(openai_gateway).chat.completions.create(
            model="fake-model", messages=[{"role": "robot", "content": "beep"}])
    assert caught.value.param == "messages[0].role"
    assert fake_llm.requests == []  # never reached the provider


def test_messages_request_without_max_tokens_is_a_400_in_anthropic_shape(openai_gateway):
    status, body = post(f"{openai_gateway.url}/v1/messages", json.dumps({
        "model": "fake-model", "messages": MESSAGES}).encode(), {"anthropic-version": "1"})
    assert status == 400
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("max_tokens:")


def test_unknown_ai_api_is_a_404(openai_gateway):
    request = urllib.request.Request(f"{openai_gateway.url}/v1/chat/completions")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 404
    assert json.loads(caught.value.read())["error"]["code"] == "unknown_url"


# -- token accounting ------------------------------------------------------------------------

def test_tokens_appear_on_metrics_by_consumer_route_provider_and_model(start_gateway,
                                                                       fake_llm):
    config = ai_config(ai_route("openai", f"{fake_llm.url}/v1"))
    config["routes"][0]["plugins"]["key-auth"] = {}
    config["consumers"] = [{"username": "alice", "plugins": {"key-auth": {"key": "alice-k"}}}]
    gateway = start_gateway(config)
    alice = client(gateway, default_headers={"apikey": "alice-k"})
    answer = alice.chat.completions.create(model="fake-model", messages=MESSAGES)
    chunks = list(alice.chat.completions.create(model="fake-model", messages=MESSAGES,
                                                stream=True))
    assert chunks
    text = scrape(gateway)
    labels = {"route": "llm", "consumer": "alice", "provider": "openai", "model": "fake-model"}
    tokens = {(sample["type"], sample["source"]): value
              for sample, value in samples(text, "sluicegate_ai_tokens_total")
              if all(sample[k] == v for k, v in labels.items())}
    assert tokens[("prompt", "provider")] == 2 * answer.usage.prompt_tokens
    assert tokens[("completion", "provider")] == 2 * answer.usage.completion_tokens
    requests = [value for sample, value in samples(text, "sluicegate_ai_requests_total")
                if sample["code"] == "200" and sample["consumer"] == "alice"]
    assert requests == [2.0]
    ttft = [value for sample, value in
            samples(text, "sluicegate_ai_time_to_first_token_seconds_count")
            if sample["model"] == "fake-model"]
    assert ttft == [1.0]  # streams only
    latency = [value for sample, value in samples(text, "sluicegate_ai_latency_seconds_count")
               if sample["consumer"] == "alice"]
    assert latency == [2.0]


def test_errors_are_counted_by_type(openai_gateway):
    with pytest.raises(openai.RateLimitError):
        client(openai_gateway).chat.completions.create(model="fake-429", messages=MESSAGES)
    errors = {sample["type"]: value
              for sample, value in samples(scrape(openai_gateway), "sluicegate_ai_errors_total")}
    assert errors == {"429": 1.0}


def test_stream_without_usage_counts_estimated_tokens(start_gateway, fake_llm,
                                                      tmp_path: Path):
    log_path = tmp_path / "access.log"
    config = ai_config(ai_route("openai", f"{fake_llm.url}/v1"))
    config["global_rules"][0]["plugins"]["file-logger"] = {"path": str(log_path)}
    gateway = start_gateway(config)
    chunks = list(client(gateway).chat.completions.create(model="fake-no-usage",
                                                          messages=MESSAGES, stream=True))
    assert chunks
    tokens = {(sample["type"], sample["source"]): value
              for sample, value in samples(scrape(gateway), "sluicegate_ai_tokens_total")}
    assert tokens[("prompt", "estimate")] > 0
    assert tokens[("completion", "estimate")] > 0
    assert wait_until(lambda: log_path.exists() and log_path.read_text())
    entry = json.loads(log_path.read_text().splitlines()[-1])
    assert entry["ai"]["tokens_estimated"] is True
    assert entry["ai"]["completion_tokens"] > 0


def test_access_log_entry_carries_the_token_figures(start_gateway, fake_llm, tmp_path: Path):
    log_path = tmp_path / "access.log"
    config = ai_config(ai_route("openai", f"{fake_llm.url}/v1"))
    config["global_rules"][0]["plugins"]["file-logger"] = {"path": str(log_path)}
    gateway = start_gateway(config)
    answer = client(gateway).chat.completions.create(model="fake-model", messages=MESSAGES)
    assert wait_until(lambda: log_path.exists() and log_path.read_text())
    entry = json.loads(log_path.read_text().splitlines()[-1])
    assert entry["status"] == 200
    assert entry["upstream_addr"] == fake_llm.address
    assert entry["ai"] == {
        "provider": "openai", "api": "chat", "model": "fake-model", "stream": False,
        "prompt_tokens": answer.usage.prompt_tokens,
        "completion_tokens": answer.usage.completion_tokens,
        "total_tokens": answer.usage.total_tokens, "tokens_estimated": False,
        "ttft_ms": None, "error": None}


# -- secrets ---------------------------------------------------------------------------------

def test_provider_key_from_the_environment_is_used_and_never_logged(
        start_gateway, fake_llm, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SG_TEST_PROVIDER_KEY", PROVIDER_KEY)
    log_path = tmp_path / "access.log"
    plugin = ai_route("openai", f"{fake_llm.url}/v1",
                      logging={"summaries": True, "payloads": True})
    plugin["auth"] = {"header": {"Authorization": "Bearer $env://SG_TEST_PROVIDER_KEY"}}
    config = ai_config(plugin)
    config["global_rules"][0]["plugins"]["file-logger"] = {"path": str(log_path)}
    gateway = start_gateway(config)
    gpt = client(gateway)
    assert gpt.chat.completions.create(model="fake-model", messages=MESSAGES).choices
    list(gpt.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True))
    for model in ("fake-500", "fake-429", "no-such-model"):
        with pytest.raises(openai.APIStatusError):
            gpt.chat.completions.create(model=model, messages=MESSAGES)
    assert fake_llm.requests[0].headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert wait_until(lambda: log_path.exists() and
                      len(log_path.read_text().splitlines()) == 5)
    metrics = scrape(gateway)
    assert wait_until(lambda: "ai chat provider=openai model=fake-model" in gateway.log())
    for where in (gateway.log(), log_path.read_text(), gateway.config_path.read_text(),
                  metrics):
        assert PROVIDER_KEY not in where
        assert PROVIDER_KEY[3:] not in where


# -- config ----------------------------------------------------------------------------------

def config_errors(plugin: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate_config({"routes": [{"id": "llm", "uri": "/v1/*",
                                     "plugins": {"ai-proxy": plugin}}]})
    return caught.value.errors


@pytest.mark.parametrize(("plugin", "expected"), [
    ({"provider": "skynet"}, "routes[0].plugins.ai-proxy.provider: unknown provider 'skynet'"),
    ({"provider": "azure-openai"},
     "routes[0].plugins.ai-proxy.override.endpoint: required for provider azure-openai"),
    ({"provider": "openai", "override": {"endpoint": "ftp://x"}},
     "routes[0].plugins.ai-proxy.override.endpoint: must be an http:// or https:// URL"),
    ({"provider": "openai", "auth": {"header": {"Authorization": "Bearer $env://SG_NOPE"}}},
     "routes[0].plugins.ai-proxy.auth.header.Authorization: environment variable SG_NOPE "
     "is not set"),
    ({"provider": "openai", "timeout": 0}, "routes[0].plugins.ai-proxy.timeout: "),
    ({"provider": "openai", "options": {"stream": True}},
     "routes[0].plugins.ai-proxy.options.stream: chosen by each request"),
    ({"provider": "openai", "auth": {"header": {"Bad Name": "x"}}},
     "routes[0].plugins.ai-proxy.auth.header: Bad Name: not a valid header name"),
    ({"provider": "openai", "providr": "x"}, "routes[0].plugins.ai-proxy.providr: "),
])
def test_bad_ai_proxy_config_is_rejected_with_the_field_path(plugin, expected):
    errors = config_errors(plugin)
    assert any(error.startswith(expected) for error in errors), errors


def test_ai_proxy_route_needs_no_upstream():
    validate_config({"routes": [{"id": "llm", "uri": "/v1/*",
                                 "plugins": {"ai-proxy": {"provider": "openai"}}}]})
    validate_config({"plugin_configs": [{"id": "ai", "plugins": {"ai-proxy": {
                        "provider": "openai"}}}],
                     "routes": [{"id": "llm", "uri": "/v1/*", "plugin_config_id": "ai"}]})
    with pytest.raises(ConfigError, match=r"routes\[0\]: no upstream"):
        validate_config({"routes": [{"id": "web", "uri": "/*"}]})


def test_chunked_request_body_is_read_whole(openai_gateway):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", openai_gateway.port, timeout=10)
    pieces = [b'{"model": "fake-model", ', b'"messages": [{"role": "user", ',
              b'"content": "sent in chunks"}]}']
    connection.request("POST", "/v1/chat/completions", body=iter(pieces),
                       headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 200
    answer = json.loads(response.read())
    assert answer["choices"][0]["message"]["content"] == "echo: sent in chunks"
    connection.close()


def test_docs_config_example_validates(monkeypatch):
    import re

    import yaml

    text = (Path(__file__).resolve().parents[2] / "docs" / "ai-gateway.md").read_text()
    for name in re.findall(r"\$env://([A-Za-z_][A-Za-z0-9_]*)", text):
        monkeypatch.setenv(name, "sk-docs")
    # Blocks with "..." placeholders (a hashed key left out) are fragments, not configs.
    blocks = [block for block in re.findall(r"```yaml\n(.*?)```", text, re.S)
              if "..." not in block]
    assert blocks
    for block in blocks:
        validate_config(yaml.safe_load(block))


def test_http_1_0_client_gets_the_stream_delimited_by_close(openai_gateway):
    import socket

    body = json.dumps({"model": "fake-model", "messages": MESSAGES, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", openai_gateway.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while chunk := sock.recv(65536):  # the gateway closes after the last event
            received += chunk
    head, _, events = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"text/event-stream" in head and b"chunked" not in head.lower()
    assert events.endswith(b"data: [DONE]\n\n")
    assert b'"content":"echo:"' in events


def test_stopping_the_gateway_closes_the_provider_session_cleanly(openai_gateway):
    """The provider connection pool is closed on SIGTERM: no asyncio "Unclosed client
    session" / "Unclosed connector" errors in the log, exit code 0."""
    answer = client(openai_gateway).chat.completions.create(model="gpt-4o-mini",
                                                            messages=MESSAGES)
    assert answer.choices[0].message.content
    assert openai_gateway.stop() == 0
    log = openai_gateway.log_path.read_text(errors="replace")
    assert "Unclosed" not in log, log
