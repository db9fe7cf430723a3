"""A fake Baidu Qianfan "Wenxin Yiyan" (ERNIE) API speaking its real wire format, for tests:
an aiohttp server on loopback, in a thread of the test process
(`FakeWenxin(api_key, secret_key).start()`) or standalone (`python fake_wenxin.py --port N`).

    POST /oauth/2.0/token?grant_type=client_credentials&client_id=AK&client_secret=SK
         an access token living `token_ttl` seconds (Baidu: 2592000), or 401
         `{"error": "invalid_client", "error_description": "unknown client id"}`
         ("Client authentication failed" for a wrong secret)
    POST /rpc/2.0/ai_custom/v1/wenxinworkshop/chat/{endpoint}?access_token=T
         `{"id", "object", "created", "result", "is_truncated", "need_clear_history",
         "finish_reason", "usage"}`; with `"stream": true`, SSE `data: {...}\\n\\n` events,
         one per word, with `sentence_id` and `is_end`

Errors come with HTTP 200 as `{"error_code", "error_msg"}`, as Baidu sends them (also in
place of a stream): 110 unknown token, 111 expired token, 336003 bad parameter (e.g.
temperature outside (0, 1]), 336006 messages not an odd number of alternating user and
assistant turns, 3 unknown endpoint. Known endpoints: `completions`, `completions_pro`,
`eb-instant`, anything starting with `ernie`.

The answer is `echo: <last user text>`; tokens are words (prompt: every message and
`system`). Knobs in the last user text: `[[error:336501]]` (that error_code), `[[cut]]` (a
stream whose connection is closed after two events). `requests` records the chat requests,
`issued` counts tokens given out, `expire_tokens()` makes every token expired.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

try:  # imported as servers.<module> (tests), or run as a script from tests/servers
    from servers.aiohttp_thread import AppInThread
except ImportError:
    from aiohttp_thread import AppInThread  # type: ignore[no-redef]

KNOB = re.compile(r"\[\[(\w+)(?::(\w+))?\]\]")
ERROR_MESSAGES = {
    3: "Unsupported openapi method",
    110: "Access token invalid or no longer valid",
    111: "Access token expired",
    336002: "Invalid JSON",
    336003: "the temperature is out of range",
    336006: "the length of messages must be an odd number",
    336501: "Rate limit reached for RPM",
    336502: "Rate limit reached for TPM",
}


@dataclass
class Recorded:
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, or None


def baidu_error(code: int, message: str | None = None) -> web.Response:
    # Baidu answers errors with 200: the body says what went wrong.
    return web.json_response({"error_code": code,
                              "error_msg": message or ERROR_MESSAGES.get(code, "error")})


def words(text: str) -> int:
    return len(text.split())


class FakeWenxin(AppInThread):
    thread_name = "fake-wenxin"

    def __init__(self, api_key: str = "wenxin-ak", secret_key: str = "wenxin-sk",
                 token_ttl: int = 2592000, port: int = 0) -> None:
        self.api_key = api_key
        self.secret_key = secret_key
        self.token_ttl = token_ttl
        self.port = port
        self.tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self.issued = 0
        self.requests: list[Recorded] = []

    # -- running ---------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth/2.0/token", self.token)
        app.router.add_post("/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/{endpoint}",
                            self.chat)
        return app


    def expire_tokens(self) -> None:
        """Every token issued so far is expired from now on (error 111)."""
        self.tokens = dict.fromkeys(self.tokens, 0.0)

    # -- the API -----------------------------------------------------------------------------
    async def token(self, request: web.Request) -> web.Response:
        query = request.query
        if query.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type",
                                      "error_description": "The authorization grant type is "
                                                           "not supported"}, status=400)
        if query.get("client_id") != self.api_key:
            return web.json_response({"error": "invalid_client",
                                      "error_description": "unknown client id"}, status=401)
        if query.get("client_secret") != self.secret_key:
            return web.json_response({"error": "invalid_client",
                                      "error_description": "Client authentication failed"},
                                     status=401)
        token = f"24.{secrets.token_hex(16)}.{self.token_ttl}.{int(time.time())}"
        self.tokens[token] = time.monotonic() + self.token_ttl
        self.issued += 1
        return web.json_response({
            "refresh_token": "25." + secrets.token_hex(16), "expires_in": self.token_ttl,
            "session_key": secrets.token_hex(8), "access_token": token,
            "scope": "public brain_all_scope wenxinworkshop_mgr ai_custom_yiyan_com",
            "session_secret": secrets.token_hex(8)})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        endpoint = request.match_info["endpoint"]
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.requests.append(Recorded(request.path, dict(request.query),
                                      {k.lower(): v for k, v in request.headers.items()},
                                      body))
        token = request.query.get("access_token")
        if token is None or token not in self.tokens:
            return baidu_error(110)
        if self.tokens[token] <= time.monotonic():
            return baidu_error(111)
        if not (endpoint in ("completions", "completions_pro", "eb-instant")
                or endpoint.startswith("ernie")):
            return baidu_error(3)
        if not isinstance(body, dict):
            return baidu_error(336002)
        messages = body.get("messages")
        if not isinstance(messages, list) or len(messages) % 2 == 0:
            return baidu_error(336006)
        for index, message in enumerate(messages):
            if message.get("role") != ("user" if index % 2 == 0 else "assistant"):
                return baidu_error(336006, "the role of message with even index in the "
                                           "messages must be user or function")
        temperature = body.get("temperature")
        if temperature is not None and not 0 < temperature <= 1:
            return baidu_error(336003)
        prompt = messages[-1]["content"]
        knobs = dict(KNOB.findall(prompt))
        if "error" in knobs:
            return baidu_error(int(knobs["error"]))
        prompt_tokens = sum(words(m.get("content", "")) for m in messages) + \
            words(body.get("system", ""))
        answer = "echo: " + KNOB.sub("", prompt).strip()
        created = int(time.time())
        answer_id = "as-" + secrets.token_hex(5)
        completion = words(answer)
        if not body.get("stream"):
            return web.json_response({
                "id": answer_id, "object": "chat.completion", "created": created,
                "result": answer, "is_truncated": False, "need_clear_history": False,
                "finish_reason": "normal",
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        pieces = [word + " " for word in answer.split()]
        pieces[-1] = pieces[-1].rstrip()
        for index, piece in enumerate(pieces):
            if "cut" in knobs and index == 2:
                assert request.transport is not None
                request.transport.close()
                return response
            final = index == len(pieces) - 1
            event: dict[str, Any] = {
                "id": answer_id, "object": "chat.completion", "created": created,
                "sentence_id": index, "is_end": final, "is_truncated": False,
                "result": piece, "need_clear_history": False,
                "usage": {"prompt_tokens": prompt_tokens,
                          "completion_tokens": completion if final else 0,
                          "total_tokens": prompt_tokens + (completion if final else 0)}}
            if final:
                event["finish_reason"] = "normal"
            await response.write(b"data: " + json.dumps(event, ensure_ascii=False).encode()
                                 + b"\n\n")
            await asyncio.sleep(0)
        await response.write_eof()
        return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", default="wenxin-ak")
    parser.add_argument("--secret-key", default="wenxin-sk")
    parser.add_argument("--token-ttl", type=int, default=2592000)
    args = parser.parse_args()
    app = FakeWenxin(args.api_key, args.secret_key, args.token_ttl).app()
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
