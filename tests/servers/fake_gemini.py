"""A fake Google Gemini API (Generative Language API v1beta) speaking its real wire format,
for tests: an aiohttp server on loopback, in a thread of the test process
(`FakeGemini(api_key).start()`) or standalone (`python fake_gemini.py --port 8000`).

    POST /v1beta/models/{model}:generateContent         a GenerateContentResponse
    POST /v1beta/models/{model}:streamGenerateContent   with `alt=sse`: one response per
         word as `data: {...}` events ended by CRLF CRLF (Google's line ends), the last
         with finishReason and the final usageMetadata; without alt=sse: the JSON array
    POST /v1beta/models/{model}:batchEmbedContents      `{"embeddings": [{"values"}]}`
    GET  /v1beta/models                                 `{"models": [{"name"...}]}`

The API key must come in `x-goog-api-key` or the `key` query argument: without one, 403
PERMISSION_DENIED; a wrong one, 400 INVALID_ARGUMENT "API key not valid", as Google answers.
A model not starting with `gemini-` is 404 NOT_FOUND. Errors have Google's shape
`{"error": {"code", "message", "status"}}`.

The answer is `echo: <last user text>`; token counts are words (prompt: every text of the
request, systemInstruction included). Knobs in the last user text: `[[status:429]]` (that
error; 429 comes with `Retry-After: 7`), `[[finish:MAX_TOKENS]]` (that finishReason),
`[[cut]]` (a stream whose connection is closed after two events), `[[thoughts:N]]` (N
thought tokens in the usage). Every request is recorded in `requests`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web

try:  # imported as servers.<module> (tests), or run as a script from tests/servers
    from servers.aiohttp_thread import AppInThread
except ImportError:
    from aiohttp_thread import AppInThread  # type: ignore[no-redef]

STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
KNOB = re.compile(r"\[\[(\w+)(?::(\w+))?\]\]")
MODELS = ("gemini-2.0-flash", "gemini-2.5-pro", "text-embedding-004")


@dataclass
class Recorded:
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, or None


def google_error(status: int, message: str, headers: dict[str, str] | None = None
                 ) -> web.Response:
    body = {"error": {"code": status, "message": message,
                      "status": STATUS_NAMES.get(status, "UNKNOWN")}}
    return web.json_response(body, status=status, headers=headers)


def words(text: str) -> int:
    return len(text.split())


def generate_response(text: str, prompt_tokens: int, completion_tokens: int | None,
                      thoughts: int, finish: str | None, version: str) -> dict[str, Any]:
    """One GenerateContentResponse; usage is complete when completion_tokens is given."""
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"},
                                 "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    usage: dict[str, Any] = {"promptTokenCount": prompt_tokens}
    if completion_tokens is not None:
        usage["candidatesTokenCount"] = completion_tokens
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        usage["totalTokenCount"] = prompt_tokens + completion_tokens + thoughts
    else:
        usage["totalTokenCount"] = prompt_tokens
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": version,
            "responseId": "fakegeminiresponse"}


class FakeGemini(AppInThread):
    thread_name = "fake-gemini"

    def __init__(self, api_key: str = "gemini-test-key", port: int = 0) -> None:
        self.api_key = api_key
        self.port = port
        self.requests: list[Recorded] = []

    # -- running ---------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1beta/models", self.models)
        app.router.add_post("/v1beta/models/{target}", self.handle)
        return app


    # -- the API -----------------------------------------------------------------------------
    def _key_problem(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if key is None:
            return google_error(403, "Method doesn't allow unregistered callers (callers "
                                     "without established identity). Please use API Key or "
                                     "other form of API consumer identity to call this API.")
        if key != self.api_key:
            return google_error(400, "API key not valid. Please pass a valid API key.")
        return None

    async def models(self, request: web.Request) -> web.Response:
        self.requests.append(Recorded(request.path, dict(request.query),
                                      {k.lower(): v for k, v in request.headers.items()},
                                      None))
        problem = self._key_problem(request)
        if problem is not None:
            return problem
        return web.json_response({"models": [
            {"name": f"models/{name}", "version": "001", "displayName": name}
            for name in MODELS]})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["target"].partition(":")
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.requests.append(Recorded(request.path, dict(request.query),
                                      {k.lower(): v for k, v in request.headers.items()},
                                      body))
        problem = self._key_problem(request)
        if problem is not None:
            return problem
        if method == "batchEmbedContents":
            return self.embed(body)
        if method not in ("generateContent", "streamGenerateContent"):
            return google_error(404, f"Method not found: {method}")
        if not model.startswith("gemini-"):
            return google_error(404, f"models/{model} is not found for API version v1beta, "
                                     "or is not supported for generateContent. Call "
                                     "ListModels to see the list of available models.")
        if not isinstance(body, dict) or not isinstance(body.get("contents"), list) \
                or not body["contents"]:
            return google_error(400, "* GenerateContentRequest.contents: contents is not "
                                     "specified")
        texts = [part.get("text", "") for content in body["contents"]
                 for part in content.get("parts", [])]
        system = body.get("systemInstruction") or {}
        texts += [part.get("text", "") for part in system.get("parts", [])]
        if body["contents"][-1].get("role") != "user":
            return google_error(400, "Please ensure that multiturn requests end with a user "
                                     "role or a function response.")
        prompt = " ".join(p.get("text", "") for p in body["contents"][-1].get("parts", []))
        knobs = dict(KNOB.findall(prompt))
        if "status" in knobs:
            status = int(knobs["status"])
            headers = {"Retry-After": "7"} if status == 429 else None
            return google_error(status, f"fake gemini was asked to fail with {status}",
                                headers)
        answer = "echo: " + KNOB.sub("", prompt).strip()
        prompt_tokens = sum(words(text) for text in texts)
        thoughts = int(knobs.get("thoughts", 0))
        finish = knobs.get("finish", "STOP")
        version = f"{model}-001"
        if method == "generateContent":
            return web.json_response(generate_response(answer, prompt_tokens, words(answer),
                                                       thoughts, finish, version))
        pieces = [word + " " for word in answer.split()]
        pieces[-1] = pieces[-1].rstrip()
        events = []
        for index, piece in enumerate(pieces):
            final = index == len(pieces) - 1
            events.append(generate_response(
                piece, prompt_tokens, words(answer) if final else None,
                thoughts if final else 0, finish if final else None, version))
        if request.query.get("alt") != "sse":
            return web.json_response(events)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, event in enumerate(events):
            if "cut" in knobs and index == 2:
                # A provider dying mid-stream: the chunked body never ends.
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(b"data: " + json.dumps(event).encode() + b"\r\n\r\n")
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    def embed(self, body: Any) -> web.Response:
        if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
            return google_error(400, "* BatchEmbedContentsRequest.requests: requests is not "
                                     "specified")
        embeddings = []
        for item in body["requests"]:
            text = " ".join(p.get("text", "") for p in item["content"]["parts"])
            size = item.get("outputDimensionality") or 4
            embeddings.append({"values": [float(len(text) % 7 + i) for i in range(size)]})
        return web.json_response({"embeddings": embeddings})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", default="gemini-test-key")
    args = parser.parse_args()
    web.run_app(FakeGemini(args.key).app(), host="127.0.0.1", port=args.port, print=None,
                access_log=None)


if __name__ == "__main__":
    main()
