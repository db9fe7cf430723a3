"""A fake LLM provider speaking OpenAI's and Anthropic's real wire formats, for tests and
benchmarks: an aiohttp server on loopback (in a thread of the test process, or standalone:
`python tests/servers/fake_llm.py --port 8000`).

    POST /v1/chat/completions   OpenAI chat (JSON, or SSE with `stream: true`: a role chunk,
                                one chunk per word, a finish chunk, a usage chunk when
                                `stream_options.include_usage`, then `data: [DONE]`)
    POST /v1/embeddings         OpenAI embeddings
    POST /v1/messages           Anthropic Messages (JSON, or SSE: message_start,
                                content_block_start, ping, content_block_delta per word,
                                content_block_stop, message_delta, message_stop)
    GET  /v1/models             OpenAI's list, or Anthropic's with an anthropic-version header

The answer is `echo: <last user text>`. The model name picks a behaviour:
    fake-429        429 with Retry-After: 7 and the provider's rate-limit error body
    fake-500        500 with the provider's server error body
    fake-slow       a stream of 200 words, one every 50 ms (to leave in the middle)
    fake-hang       waits 60 s before answering (timeouts)
    fake-cut        a stream whose connection is cut after three words
    fake-stream-error  (Anthropic) an `error` event (overloaded_error) after three words
    fake-no-usage   streams and answers without usage figures
    fake-tools      answers with a call of the first tool, arguments {"city": "Paris"}
    any other name starting with fake-, gpt- or claude-: the normal answer;
    anything else   404 model not found, in the provider's shape.
A test may also set `fault` to make every chat request (OpenAI or Anthropic path) fail,
whatever the model: "429" (with `Retry-After: <retry_after>`), "500", "hang" (60 s before
answering), "close" (the connection is closed before any answer), "empty-stream" (a stream
head, then the connection is closed before any event). `None` (the default) restores the
normal behaviour.
With `api_key`, OpenAI paths need `Authorization: Bearer KEY`, Anthropic paths `x-api-key`.
Every request is recorded (`requests`); streams the reader left are counted (`cancelled`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

try:  # imported as servers.<module> (tests), or run as a script from tests/servers
    from servers.aiohttp_thread import AppInThread
except ImportError:
    from aiohttp_thread import AppInThread  # type: ignore[no-redef]

SLOW_WORDS = 200
SLOW_DELAY = 0.05


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, or None


def _words(text: str) -> list[str]:
    return text.split() or ["..."]


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(part.get("text", "") for part in content
                                if isinstance(part, dict) and part.get("type") == "text")
    return ""


def _prompt_tokens(messages: list[Any], system: Any = None) -> int:
    """A deterministic count: words of every message + 3 per message + 3."""
    total = 3 + (len(str(system).split()) if system else 0)
    for message in messages or []:
        content = message.get("content") if isinstance(message, dict) else ""
        text = content if isinstance(content, str) else json.dumps(content)
        total += 3 + len(text.split())
    return total


class FakeLLM(AppInThread):
    thread_name = "fake-llm"
    shutdown_timeout = 1.0  # a test ends with no reason to wait for a hanging answer

    def __init__(self, api_key: str | None = None, port: int = 0, host: str = "127.0.0.1"
                 ) -> None:
        self.api_key = api_key
        self.host = host
        self.port = port
        self.requests: list[Recorded] = []
        self.cancelled = 0  # streams whose reader went away before the end
        self.fault: str | None = None  # see the module docstring
        self.retry_after = "7"
        self._lock = threading.Lock()

    # -- running -----------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_get("/v1/models", self.models)
        return app


    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> bool:
        """Poll until predicate() is true (bounded); True when it became true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return bool(predicate())

    # -- helpers -----------------------------------------------------------------------------
    async def _record(self, request: web.Request) -> Any:
        body = None
        if request.can_read_body:
            raw = await request.read()
            with contextlib.suppress(ValueError):
                body = json.loads(raw)
        with self._lock:
            self.requests.append(Recorded(request.path, {k.lower(): v for k, v in
                                                         request.headers.items()}, body))
        return body

    def _openai_auth(self, request: web.Request) -> web.Response | None:
        if self.api_key is None or \
                request.headers.get("Authorization") == f"Bearer {self.api_key}":
            return None
        return web.json_response({"error": {
            "message": "Incorrect API key provided. You can find your API key at "
                       "https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}},
            status=401)

    def _anthropic_auth(self, request: web.Request) -> web.Response | None:
        if self.api_key is None or request.headers.get("x-api-key") == self.api_key:
            return None
        return web.json_response({"type": "error", "error": {
            "type": "authentication_error", "message": "invalid x-api-key"}}, status=401)

    @staticmethod
    def _known(model: Any) -> bool:
        return isinstance(model, str) and model.startswith(("fake-", "gpt-", "claude-"))

    async def _stream_out(self, request: web.Request, events: Any, cut_after: int | None = None
                          ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        sent = 0
        try:
            async for event, delay in events:
                if delay:
                    await asyncio.sleep(delay)
                await response.write(event)
                sent += 1
                if cut_after is not None and sent >= cut_after:
                    # The provider dies mid-stream: the chunked body never ends.
                    assert request.transport is not None
                    request.transport.abort()
                    return response
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            with self._lock:
                self.cancelled += 1
            raise
        return response

    def chat_count(self) -> int:
        """Chat requests received (OpenAI and Anthropic paths)."""
        with self._lock:
            return sum(1 for r in self.requests
                       if r.path in ("/v1/chat/completions", "/v1/messages"))

    async def _fault(self, request: web.Request) -> web.StreamResponse | None:
        """The answer of the test-set `fault`, None without one."""
        fault = self.fault
        if fault is None:
            return None
        if fault == "429":
            return web.json_response({"error": {
                "message": "Rate limit reached (fault injected)", "type": "requests",
                "param": None, "code": "rate_limit_exceeded"}},
                status=429, headers={"Retry-After": self.retry_after})
        if fault == "500":
            return web.json_response({"error": {
                "message": "The server had an error (fault injected)", "type": "server_error",
                "param": None, "code": None}}, status=500)
        if fault == "hang":
            await asyncio.sleep(60)
            return web.json_response({"error": {"message": "too late"}}, status=500)
        if fault == "empty-stream":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
        assert request.transport is not None  # "close", "empty-stream"
        request.transport.abort()
        return web.Response()

    # -- OpenAI ------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        denied = self._openai_auth(request)
        if denied is not None:
            return denied
        faulty = await self._fault(request)
        if faulty is not None:
            return faulty
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return web.json_response({"error": {
                "message": "'messages' is a required property", "type": "invalid_request_error",
                "param": "messages", "code": None}}, status=400)
        model = body.get("model")
        if not self._known(model):
            return web.json_response({"error": {
                "message": f"The model `{model}` does not exist or you do not have access "
                           "to it.", "type": "invalid_request_error", "param": None,
                "code": "model_not_found"}}, status=404)
        if model == "fake-429":
            return web.json_response({"error": {
                "message": "Rate limit reached for fake-429 in organization org-fake on "
                           "requests per min (RPM): Limit 3, Used 3, Requested 1.",
                "type": "requests", "param": None, "code": "rate_limit_exceeded"}},
                status=429, headers={"Retry-After": "7"})
        if model == "fake-500":
            return web.json_response({"error": {
                "message": "The server had an error while processing your request. Sorry "
                           "about that!", "type": "server_error", "param": None,
                "code": None}}, status=500)
        if model == "fake-hang":
            await asyncio.sleep(60)
        words = _words("echo: " + _last_user_text(body["messages"]))
        if model == "fake-slow":
            words = [f"w{i}" for i in range(SLOW_WORDS)]
        prompt = _prompt_tokens(body["messages"])
        usage = {"prompt_tokens": prompt, "completion_tokens": len(words),
                 "total_tokens": prompt + len(words),
                 "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}}
        created = int(time.time())
        ident = f"chatcmpl-fake{len(self.requests)}"
        tool = None
        if model == "fake-tools" and body.get("tools"):
            tool = body["tools"][0]["function"]["name"]
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": " ".join(words),
                                       "refusal": None}
            finish = "stop"
            if tool:
                message["content"] = None
                message["tool_calls"] = [{"id": "call_fake1", "type": "function", "function": {
                    "name": tool, "arguments": json.dumps({"city": "Paris"})}}]
                finish = "tool_calls"
            answer: dict[str, Any] = {
                "id": ident, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": finish}]}
            if model != "fake-no-usage":
                answer["usage"] = usage
            return web.json_response(answer)
        options = body.get("stream_options") or {}
        include_usage = options.get("include_usage") is True and model != "fake-no-usage"

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data: dict[str, Any] = {
                "id": ident, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]}
            if include_usage:
                data["usage"] = None
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        async def events() -> Any:
            delay = SLOW_DELAY if model == "fake-slow" else 0
            yield chunk({"role": "assistant", "content": "", "refusal": None}), 0
            if tool:
                yield chunk({"tool_calls": [{"index": 0, "id": "call_fake1",
                                             "type": "function", "function": {
                                                 "name": tool, "arguments": ""}}]}), 0
                for piece in ('{"city": ', '"Paris"}'):
                    yield chunk({"tool_calls": [{"index": 0, "function": {
                        "arguments": piece}}]}), 0
                yield chunk({}, "tool_calls"), 0
            else:
                for index, word in enumerate(words):
                    yield chunk({"content": word if index == 0 else " " + word}), delay
                yield chunk({}, "stop"), 0
            if include_usage:
                data = {"id": ident, "object": "chat.completion.chunk", "created": created,
                        "model": model, "system_fingerprint": "fp_fake", "choices": [],
                        "usage": usage}
                yield b"data: " + json.dumps(data).encode() + b"\n\n", 0
            yield b"data: [DONE]\n\n", 0

        return await self._stream_out(request, events(),
                                      cut_after=4 if model == "fake-cut" else None)

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        denied = self._openai_auth(request)
        if denied is not None:
            return denied
        inputs = body.get("input") if isinstance(body, dict) else None
        if not inputs:
            return web.json_response({"error": {
                "message": "'input' is a required property", "type": "invalid_request_error",
                "param": "input", "code": None}}, status=400)
        items = [inputs] if isinstance(inputs, str) else inputs
        tokens = sum(len(str(item).split()) for item in items)
        return web.json_response({
            "object": "list", "model": body.get("model"),
            "data": [{"object": "embedding", "index": index,
                      "embedding": [0.1 * (index + 1), 0.2, -0.3]}
                     for index, _ in enumerate(items)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def models(self, request: web.Request) -> web.Response:
        await self._record(request)
        if request.headers.get("anthropic-version"):
            denied = self._anthropic_auth(request)
            if denied is not None:
                return denied
            data = [{"type": "model", "id": "claude-fake-1", "display_name": "Claude Fake 1",
                     "created_at": "2025-02-19T00:00:00Z"}]
            return web.json_response({"data": data, "has_more": False,
                                      "first_id": "claude-fake-1", "last_id": "claude-fake-1"})
        denied = self._openai_auth(request)
        if denied is not None:
            return denied
        return web.json_response({"object": "list", "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": 1721172741,
             "owned_by": "system"},
            {"id": "fake-model", "object": "model", "created": 1700000000,
             "owned_by": "fake"}]})

    # -- Anthropic ---------------------------------------------------------------------------
    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        denied = self._anthropic_auth(request)
        if denied is not None:
            return denied
        faulty = await self._fault(request)
        if faulty is not None:
            return faulty

        def invalid(message: str, status: int = 400, kind: str = "invalid_request_error",
                    headers: dict[str, str] | None = None) -> web.Response:
            return web.json_response({"type": "error", "error": {"type": kind,
                                                                 "message": message}},
                                     status=status, headers=headers)

        if not request.headers.get("anthropic-version"):
            return invalid("anthropic-version: header is required")
        if not isinstance(body, dict):
            return invalid("Invalid JSON body")
        if not isinstance(body.get("max_tokens"), int):
            return invalid("max_tokens: Field required")
        if not isinstance(body.get("messages"), list):
            return invalid("messages: Field required")
        for index, message in enumerate(body["messages"]):
            if message.get("role") not in ("user", "assistant"):
                return invalid(f"messages.{index}.role: Input should be 'user' or 'assistant'")
        model = body.get("model")
        if not self._known(model):
            return invalid(f"model: {model}", 404, "not_found_error")
        if model == "fake-429":
            return invalid("Number of request tokens has exceeded your per-minute rate limit",
                           429, "rate_limit_error", {"retry-after": "7"})
        if model == "fake-500":
            return invalid("Internal server error", 500, "api_error")
        if model == "fake-hang":
            await asyncio.sleep(60)
        words = _words("echo: " + _last_user_text(body["messages"]))
        if model == "fake-slow":
            words = [f"w{i}" for i in range(SLOW_WORDS)]
        prompt = _prompt_tokens(body["messages"], body.get("system"))
        ident = f"msg_fake{len(self.requests)}"
        tool = body["tools"][0]["name"] if model == "fake-tools" and body.get("tools") else None
        usage = {"input_tokens": prompt, "output_tokens": len(words),
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        if not body.get("stream"):
            content: list[dict[str, Any]] = [{"type": "text", "text": " ".join(words)}]
            stop = "end_turn"
            if tool:
                content = [{"type": "tool_use", "id": "toolu_fake1", "name": tool,
                            "input": {"city": "Paris"}}]
                stop = "tool_use"
            answer = {"id": ident, "type": "message", "role": "assistant", "model": model,
                      "content": content, "stop_reason": stop, "stop_sequence": None,
                      "usage": usage}
            return web.json_response(answer)

        def event(kind: str, data: dict[str, Any]) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

        async def events() -> Any:
            delay = SLOW_DELAY if model == "fake-slow" else 0
            yield event("message_start", {"message": {
                "id": ident, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": prompt, "output_tokens": 1,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}), 0
            if tool:
                yield event("content_block_start", {"index": 0, "content_block": {
                    "type": "tool_use", "id": "toolu_fake1", "name": tool, "input": {}}}), 0
                for piece in ('{"city": ', '"Paris"}'):
                    yield event("content_block_delta", {"index": 0, "delta": {
                        "type": "input_json_delta", "partial_json": piece}}), 0
                yield event("content_block_stop", {"index": 0}), 0
                stop = "tool_use"
            else:
                yield event("content_block_start", {"index": 0, "content_block": {
                    "type": "text", "text": ""}}), 0
                yield event("ping", {}), 0
                for index, word in enumerate(words):
                    if model == "fake-stream-error" and index == 3:
                        yield event("error", {"error": {"type": "overloaded_error",
                                                        "message": "Overloaded"}}), 0
                        return
                    yield event("content_block_delta", {"index": 0, "delta": {
                        "type": "text_delta", "text": word if index == 0 else " " + word}}), \
                        delay
                yield event("content_block_stop", {"index": 0}), 0
                stop = "end_turn"
            delta_usage = {"output_tokens": len(words)}
            if model == "fake-no-usage":
                delta_usage = {}
            yield event("message_delta", {"delta": {"stop_reason": stop,
                                                    "stop_sequence": None},
                                          "usage": delta_usage}), 0
            yield event("message_stop", {}), 0

        return await self._stream_out(request, events(),
                                      cut_after=5 if model == "fake-cut" else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--api-key")
    args = parser.parse_args()
    fake = FakeLLM(args.api_key, args.port, args.host)

    async def serve() -> None:
        await fake.start_async()
        print(f"fake LLM on {fake.url}", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
