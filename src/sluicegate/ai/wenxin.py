"""Baidu ERNIE, the "Wenxin Yiyan" chat API of Qianfan (the classic wenxinworkshop API), as
a provider: OpenAI chat requests to ERNIE chat requests, and answers, errors and SSE
streams back.

Wire format (cloud.baidu.com/doc/WENXINWORKSHOP):

- an access token comes from the OAuth endpoint, for the application's API key and secret
  key: `POST {base}/oauth/2.0/token?grant_type=client_credentials&client_id=AK&
  client_secret=SK` answers `{"access_token", "expires_in": 2592000, ...}` (30 days) or
  `{"error": "invalid_client", "error_description"}`;
- chat is `POST {base}/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/{endpoint}?access_token=T`,
  the endpoint naming the model (`completions` is ERNIE-Bot, `completions_pro` ERNIE 4.0,
  `ernie-3.5-8k`, `ernie-speed-128k`...);
- the body: `messages` (user and assistant turns, alternating, an odd number, starting and
  ending with the user), `system`, `temperature` in (0, 1], `top_p`, `stop`,
  `max_output_tokens`, `user_id`, `stream`;
- the answer: `{"id", "created", "result", "is_truncated", "finish_reason", "usage":
  {"prompt_tokens", "completion_tokens", "total_tokens"}}`;
- a stream is SSE, `data: {...}` events with the new text in `result`, `sentence_id`, and
  `is_end: true` on the last, which carries the final usage; no `[DONE]`;
- errors come with HTTP status 200, as `{"error_code": 110, "error_msg": "..."}`, also in
  place of a stream: the status the client gets is derived from the code.

Configuring ai-proxy: `auth.query: {client_id: AK, client_secret: SK}` (the gateway gets
and caches the access token, renewing it before it expires), or `auth.query:
{access_token: T}` for a token obtained elsewhere. `options.model` (or the request's
`model`) is the endpoint name; a few console names are mapped (`ERNIE-Bot` ->
`completions`...).

Pure translation, plus `authorize`, which decides when a token is needed and reads the
OAuth answer while the caller (plugins/ai_proxy.py) does the HTTP call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from sluicegate.ai.adapter import (
    MAX_ERROR_MESSAGE,
    AdapterError,
    JsonObject,
    ProviderRequest,
    ProviderTarget,
    StreamError,
    Usage,
    chunk_template,
    error_type_for,
    joined_text_parts,
    json_events,
    openai_error,
    plain_error_text,
)
from sluicegate.proto.sse import SseParser

TOKEN_PATH = "/oauth/2.0/token"
CHAT_PATH = "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/"
# Baidu's token lifetime when an answer does not say (its documented 30 days).
DEFAULT_TOKEN_SECONDS = 2592000.0
# A cached token is renewed this long before Baidu says it expires, so no request carries
# a token that dies on the way; tokens living less than twice this are kept half their life.
TOKEN_RENEW_MARGIN_SECONDS = 86400.0
# The most key pairs whose tokens one process keeps (one per configured wenxin route,
# typically): a bound, so a config churning keys cannot grow the cache without limit.
MAX_CACHED_TOKENS = 1024
# A stream answered with a JSON error body instead of SSE is read up to this size.
MAX_ERROR_BODY = 64 * 1024

# Model names from Baidu's console and older SDKs -> the endpoint path segment. Any other
# name is the endpoint itself (lower-cased, as Baidu spells endpoints).
MODEL_ENDPOINTS = {
    "ernie-bot": "completions",
    "ernie-bot-4": "completions_pro",
    "ernie-4.0": "completions_pro",
    "ernie-bot-turbo": "eb-instant",
    "ernie-bot-8k": "ernie_bot_8k",
}

# finish_reason: `normal` is Baidu's word for a natural end.
FINISH_REASONS = {"normal": "stop", "stop": "stop", "length": "length",
                  "content_filter": "content_filter", "function_call": "tool_calls",
                  "tool_calls": "tool_calls"}

# error_code -> HTTP status for the client (Baidu answers every error with 200), from
# Baidu's error code table; codes not listed are the provider failing: 502.
ERROR_STATUSES: dict[int, int] = {
    4: 429,       # cluster request limit reached
    6: 403,       # no permission for this API
    13: 401,      # no token
    14: 401,      # IAM certification failed
    15: 403,      # app does not exist
    17: 429,      # daily request limit reached
    18: 429,      # QPS limit reached
    19: 429,      # total request limit reached
    100: 401,     # invalid token parameter
    110: 401,     # access token invalid
    111: 401,     # access token expired
    336001: 400,  # invalid argument
    336002: 400,  # invalid JSON
    336003: 400,  # parameter check failed
    336006: 400,  # bad message count or order
    336007: 400,  # message too long
    336100: 503,  # internal error, try again
    336501: 429,  # RPM limit reached
    336502: 429,  # TPM limit reached
    336503: 429,  # total token limit reached
}
# Codes saying the access token is no good: it is dropped from the cache, so the next
# request gets a new one.
TOKEN_ERRORS = frozenset({13, 100, 110, 111})


def _fail(message: str, param: str) -> AdapterError:
    return AdapterError(message, param=param)


# -- access tokens ---------------------------------------------------------------------------

class AccessTokenCache:
    """Access tokens by (token URL, API key), kept until shortly before they expire. One per
    process; a token is a bearer credential: never logged, never in an error message."""

    __slots__ = ("_clock", "_tokens")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}

    def get(self, key: tuple[str, str]) -> str | None:
        entry = self._tokens.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._tokens[key]
            return None
        return entry[0]

    def put(self, key: tuple[str, str], token: str, lifetime: float) -> None:
        if len(self._tokens) >= MAX_CACHED_TOKENS and key not in self._tokens:
            self._tokens.clear()
        margin = min(TOKEN_RENEW_MARGIN_SECONDS, lifetime / 2.0)
        self._tokens[key] = (token, self._clock() + lifetime - margin)

    def clear(self) -> None:
        self._tokens.clear()


TOKENS = AccessTokenCache()


def token_request(target: ProviderTarget, api_key: str, secret_key: str) -> ProviderRequest:
    """The OAuth call for one key pair (to the chat endpoint's scheme and host)."""
    parts = urlsplit(target.base_url)
    query = urlencode({"grant_type": "client_credentials", "client_id": api_key,
                       "client_secret": secret_key})
    return ProviderRequest("POST", f"{parts.scheme}://{parts.netloc}{TOKEN_PATH}?{query}",
                           {"Content-Type": "application/json",
                            "Accept": "application/json"}, {})


def parse_token_response(status: int, body: bytes) -> tuple[str, float]:
    """(access token, seconds it lives) from the OAuth endpoint's answer; AdapterError 502
    when it refused (a wrong key pair is the gateway's misconfiguration, not the client's
    fault; Baidu's reason never echoes the secret)."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        token = data.get("access_token")
        if status == 200 and isinstance(token, str) and token:
            expires = data.get("expires_in")
            return token, float(expires) if isinstance(expires, int | float) and expires > 0 \
                else DEFAULT_TOKEN_SECONDS
        reason = data.get("error_description") or data.get("error")
    else:
        reason = None
    reason = str(reason)[:MAX_ERROR_MESSAGE] if reason else f"status {status}"
    raise AdapterError(f"wenxin refused the gateway's API key: {reason}", status=502,
                       type="api_error", code="provider_auth")


Send = Callable[[ProviderRequest], Awaitable[tuple[int, bytes]]]


async def authorize(target: ProviderTarget, send: Send) -> ProviderTarget:
    """The target with `access_token` in its query. `client_id` / `client_secret` in the
    configured query are exchanged for a token (cached per key pair until shortly before it
    expires; `send` does the HTTP call); a configured `access_token` is used as it is."""
    pairs = dict(target.query)
    api_key, secret_key = pairs.get("client_id"), pairs.get("client_secret")
    if api_key is None or secret_key is None:
        return target
    key = (target.base_url, api_key)
    token = TOKENS.get(key)
    if token is None:
        status, body = await send(token_request(target, api_key, secret_key))
        token, lifetime = parse_token_response(status, body)
        TOKENS.put(key, token, lifetime)
    query = [(name, value) for name, value in target.query
             if name not in ("client_id", "client_secret", "access_token")]
    return ProviderTarget(target.base_url, target.headers, [*query, ("access_token", token)])


# -- chat ------------------------------------------------------------------------------------

def model_endpoint(model: str) -> str:
    name = model.strip().lower()
    return MODEL_ENDPOINTS.get(name, name)


def _text(content: Any, param: str) -> str:
    return joined_text_parts(content, param, joiner="", parts_only="wenxin takes text content only",
                             shape="content must be a string or a list of text parts")


def to_chat_request(body: JsonObject) -> JsonObject:
    """An ERNIE chat body for an OpenAI chat completions request (whose shape
    front.check_chat_request has checked)."""
    system: list[str] = []
    turns: list[JsonObject] = []
    for index, message in enumerate(body["messages"]):
        param = f"messages[{index}]"
        role = message["role"]
        if role in ("system", "developer"):
            system.append(_text(message.get("content"), f"{param}.content"))
            continue
        if role not in ("user", "assistant"):
            raise _fail(f"role {role!r} is not supported by wenxin (no tool calling)",
                        f"{param}.role")
        if message.get("content") is None:
            raise _fail("content is required", f"{param}.content")
        text = _text(message["content"], f"{param}.content")
        # Baidu wants strictly alternating turns: consecutive ones of a role become one.
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n" + text
        elif not turns and role != "user":
            raise _fail("wenxin needs the conversation to start with a user message",
                        f"{param}.role")
        else:
            turns.append({"role": role, "content": text})
    if not turns or turns[-1]["role"] != "user":
        raise _fail("wenxin needs the last message to be the user's", "messages")
    for name in ("tools", "functions"):
        if body.get(name):
            raise _fail("tool calling is not supported by wenxin", name)
    request: JsonObject = {"messages": turns}
    if system:
        request["system"] = "\n".join(system)
    temperature = body.get("temperature")
    if isinstance(temperature, int | float):
        # Baidu takes (0, 1], OpenAI 0..2: 0 asks for the most deterministic answer, which
        # is Baidu's smallest value; above 1 is as random as Baidu goes.
        request["temperature"] = min(max(float(temperature), 0.01), 1.0)
    top_p = body.get("top_p")
    if isinstance(top_p, int | float):
        request["top_p"] = min(max(float(top_p), 0.0), 1.0)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None:
        request["max_output_tokens"] = max_tokens
    stop = body.get("stop")
    if stop:
        request["stop"] = [stop] if isinstance(stop, str) else list(stop)
    user = body.get("user")
    if isinstance(user, str) and user:
        request["user_id"] = user
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_object":
        request["response_format"] = "json_object"
    if body.get("stream"):
        request["stream"] = True
    return request


def usage_of(data: JsonObject) -> Usage | None:
    usage = data.get("usage")
    if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
        return None
    completion = usage.get("completion_tokens")
    total = usage.get("total_tokens")
    return Usage(usage["prompt_tokens"], completion if isinstance(completion, int) else 0,
                 total if isinstance(total, int) else None)


def error_code_of(data: Any) -> AdapterError | None:
    """An `{"error_code", "error_msg"}` answer as the AdapterError the client gets (its
    status from the code), else None. A token Baidu refused is dropped from the cache."""
    if not isinstance(data, dict):
        return None
    code = data.get("error_code")
    if not isinstance(code, int) or isinstance(code, bool) or code == 0:
        return None
    status = ERROR_STATUSES.get(code, 502)
    message = data.get("error_msg")
    message = message[:MAX_ERROR_MESSAGE] if isinstance(message, str) and message \
        else f"wenxin error {code}"
    if code in TOKEN_ERRORS:
        # The answer does not say which token failed: drop them all (it costs one OAuth
        # call per key pair, and a refused token is rare: they are renewed a day early).
        TOKENS.clear()
        # The client's key is fine: it is the gateway's credential that failed.
        status = 502
    kind = error_type_for(status)
    return AdapterError(f"wenxin: {message}", status=status, type=kind, code=str(code))


def error_object(status: int, body: bytes) -> JsonObject:
    """An error answer (an HTTP error from Baidu's front or a proxy, or an error_code
    body) as an OpenAI error object."""
    try:
        data = json.loads(body)
    except ValueError:
        return openai_error(plain_error_text(body), error_type_for(status))
    found = error_code_of(data)
    if found is not None:
        return found.as_openai()
    if isinstance(data, dict) and isinstance(data.get("error_msg"), str):
        return openai_error(data["error_msg"][:MAX_ERROR_MESSAGE], error_type_for(status))
    return openai_error(plain_error_text(body), error_type_for(status))


class WenxinStream:
    """ERNIE SSE events to OpenAI chunks. The `is_end` event ends the answer: its chunk,
    then a usage-only chunk. An `error_code` event, or a JSON error body sent in place of
    the stream, raises StreamError."""

    __slots__ = ("created", "done", "id", "model", "parser", "plain", "role_sent", "usage")

    def __init__(self, model: str, created: int) -> None:
        self.parser = SseParser()
        self.model = model
        self.created = created
        self.id = "chatcmpl-wenxin"
        self.role_sent = False
        self.usage: Usage | None = None
        self.done = False
        # Bytes of a body that is plain JSON, not SSE (Baidu's errors); None once the body
        # is known to be SSE.
        self.plain: bytes | None = b""

    def _chunk(self, choices: list[JsonObject]) -> JsonObject:
        chunk = chunk_template(self.id, self.model, self.created)
        chunk["choices"] = choices
        return chunk

    def feed(self, data: bytes) -> list[JsonObject]:
        if self.plain is not None:
            body = self.plain + data
            start = body.lstrip()[:1]
            if start == b"{":  # not SSE: an error body, complete once it parses
                if len(body) > MAX_ERROR_BODY:
                    raise StreamError(openai_error("wenxin sent an oversized error body",
                                                   "api_error"))
                self.plain = body
                try:
                    payload = json.loads(body)
                except ValueError:
                    return []
                self._raise_for(payload)
                raise StreamError(openai_error("wenxin answered JSON instead of a stream",
                                               "api_error"))
            if not start:
                self.plain = body
                return []
            self.plain = None
            data = body
        chunks: list[JsonObject] = []
        for _, payload in json_events(self.parser, data):
            self._raise_for(payload)
            chunks += self._event(payload)
        return chunks

    @staticmethod
    def _raise_for(payload: Any) -> None:
        error = error_code_of(payload)
        if error is not None:
            raise StreamError(error.as_openai())

    def _event(self, payload: JsonObject) -> list[JsonObject]:
        if not self.role_sent and isinstance(payload.get("id"), str):
            self.id = f"chatcmpl-{payload['id']}"
        usage = usage_of(payload)
        if usage is not None:
            self.usage = usage
        delta: JsonObject = {}
        if not self.role_sent:
            self.role_sent = True
            delta["role"] = "assistant"
        result = payload.get("result")
        if isinstance(result, str) and result:
            delta["content"] = result
        reason = None
        if payload.get("is_end"):
            self.done = True
            raw = payload.get("finish_reason")
            reason = FINISH_REASONS.get(raw, "stop") if isinstance(raw, str) else "stop"
        out = []
        if delta or reason is not None:
            out.append(self._chunk([{"index": 0, "delta": delta, "finish_reason": reason}]))
        if self.done and self.usage is not None:
            usage_chunk = self._chunk([])
            usage_chunk["usage"] = self.usage.as_openai()
            out.append(usage_chunk)
        return out


class WenxinAdapter:
    name = "wenxin"
    default_endpoint = "https://aip.baidubce.com"
    kinds = frozenset({"chat"})

    async def authorize(self, target: ProviderTarget, send: Send) -> ProviderTarget:
        return await authorize(target, send)

    def chat_request(self, body: JsonObject, target: ProviderTarget) -> ProviderRequest:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _fail("wenxin needs a model (the endpoint name, e.g. ernie-4.0-8k, in the "
                        "request or the route's options.model)", "model")
        path = CHAT_PATH + quote(model_endpoint(model), safe="-._~")
        # An API key pair not exchanged (no authorize step ran) must not reach Baidu's
        # chat endpoint in a URL: only the token goes there.
        query = [(name, value) for name, value in target.query
                 if name not in ("client_id", "client_secret")]
        url = target.base_url + path
        if query:
            url += "?" + urlencode(query)
        headers = {"Content-Type": "application/json", **target.headers}
        if body.get("stream"):
            headers["Accept"] = "text/event-stream"
        return ProviderRequest("POST", url, headers, to_chat_request(body))

    def chat_response(self, data: JsonObject, created: int) -> JsonObject:
        error = error_code_of(data)
        if error is not None:
            raise error
        reason = data.get("finish_reason")
        finish = FINISH_REASONS.get(reason, "stop") if isinstance(reason, str) else \
            "length" if data.get("is_truncated") else "stop"
        result = data.get("result")
        answer: JsonObject = {
            "id": f"chatcmpl-{data.get('id') or 'wenxin'}", "object": "chat.completion",
            "created": data.get("created") if isinstance(data.get("created"), int)
            else created,
            "model": "",
            "choices": [{"index": 0, "logprobs": None, "finish_reason": finish,
                         "message": {"role": "assistant",
                                     "content": result if isinstance(result, str) else ""}}],
        }
        usage = usage_of(data)
        if usage is not None:
            answer["usage"] = usage.as_openai()
        return answer

    def stream_translator(self, model: str, created: int) -> WenxinStream:
        return WenxinStream(model, created)

    def embeddings_request(self, body: JsonObject, target: ProviderTarget) -> ProviderRequest:
        raise AdapterError("provider wenxin has no embeddings API here", status=404,
                           code="unsupported_api")

    def embeddings_response(self, data: JsonObject) -> JsonObject:
        raise AdapterError("provider wenxin has no embeddings API here", status=404)

    def models_request(self, target: ProviderTarget) -> ProviderRequest:
        raise AdapterError("provider wenxin has no models API", status=404,
                           code="unsupported_api")

    def models_response(self, data: JsonObject) -> JsonObject:
        raise AdapterError("provider wenxin has no models API", status=404)

    def error(self, status: int, body: bytes) -> JsonObject:
        return error_object(status, body)


WENXIN = WenxinAdapter()
