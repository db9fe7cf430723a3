"""The provider adapter contract, shared shapes, and the provider registry.

The gateway's internal form of every AI request and response is OpenAI's chat completions,
embeddings and models API (the de-facto lingua franca). A provider adapter translates
between that form and one provider's wire format, in pure functions: no sockets, no clock,
no config reading. The ai-proxy plugin (plugins/ai_proxy.py) does the I/O and the
client-facing formats (ai/front.py: OpenAI or Anthropic).

An adapter is an object with these attributes (see `ProviderAdapter`):

- `name`, `default_endpoint` (base URL including the API version prefix, e.g.
  `https://api.openai.com/v1`; None when the user must give `override.endpoint`),
  `kinds` (what it serves: "chat", "embeddings", "models");
- `chat_request(body, target) -> ProviderRequest`: an OpenAI chat request (with the route's
  `options` already merged in) to the provider's HTTP request. Raise `AdapterError` for a
  request the provider cannot take (it becomes a 400 naming `param`). When
  `body["stream"]` is true and the provider can report usage on streams only when asked,
  ask (OpenAI: `stream_options.include_usage`);
- `chat_response(data, created) -> dict`: the provider's JSON answer to an OpenAI
  `chat.completion` object, with `usage` when the provider reported it (`created`: the
  Unix time to use where the provider gives none);
- `stream_translator(model, created) -> StreamTranslator`: an object fed the provider's raw
  response bytes as they arrive (any split), returning OpenAI `chat.completion.chunk`
  dicts; a final chunk with `"choices": []` carries `usage`. It keeps `usage` (a `Usage`
  or None) and `done` (the provider ended the stream properly), raises `StreamError` for
  an error event in the stream;
- `embeddings_request/embeddings_response`, `models_request/models_response`: the same
  for `POST /embeddings` and `GET /models` (raise `AdapterError` when not served);
- `error(status, body) -> dict`: the provider's error body to an OpenAI error object
  `{"error": {"message", "type", "param", "code"}}`.

To add a provider: write `ai/NAME.py` with an adapter object and add one line to
`ADAPTERS` below ("name": "module:attribute"). The plugin's `provider` option accepts every
name in `ADAPTERS`; unit tests feed the adapter bytes and JSON.
"""

from __future__ import annotations

import importlib
import json
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

from sluicegate.proto.sse import SseError

if TYPE_CHECKING:
    from sluicegate.proto.sse import SseEvent, SseParser

# provider name -> "module:attribute" of its adapter object (imported on first use).
ADAPTERS: dict[str, str] = {
    "openai": "sluicegate.ai.openai:OPENAI",
    "azure-openai": "sluicegate.ai.openai:AZURE_OPENAI",
    "deepseek": "sluicegate.ai.openai:DEEPSEEK",
    "mistral": "sluicegate.ai.openai:MISTRAL",
    "ollama": "sluicegate.ai.openai:OLLAMA",
    "openai-compatible": "sluicegate.ai.openai:OPENAI_COMPATIBLE",
    "anthropic": "sluicegate.ai.anthropic:ANTHROPIC",
    "gemini": "sluicegate.ai.gemini:GEMINI",
    "wenxin": "sluicegate.ai.wenxin:WENXIN",
}

# API paths a full endpoint URL may end with (APISIX users give the chat URL itself as
# `override.endpoint`); they are cut off to get the base URL the other APIs hang from.
API_SUFFIXES = ("/chat/completions", "/embeddings", "/models", "/messages")

JsonObject = dict[str, Any]


class Usage:
    """Token figures of one request; `estimated` when counted by the gateway because the
    provider reported none."""

    __slots__ = ("completion_tokens", "estimated", "prompt_tokens", "total_tokens")

    def __init__(self, prompt_tokens: int = 0, completion_tokens: int = 0,
                 total_tokens: int | None = None, estimated: bool = False) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.total_tokens = prompt_tokens + completion_tokens if total_tokens is None \
            else total_tokens
        self.estimated = estimated

    def as_openai(self) -> JsonObject:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}

    def __repr__(self) -> str:
        return (f"Usage({self.prompt_tokens}, {self.completion_tokens}, {self.total_tokens}"
                f"{', estimated' if self.estimated else ''})")


class ProviderTarget:
    """Where and how to call a provider, resolved once from the plugin config: `base_url`
    (no trailing slash), `query` (pairs appended to every URL: auth keys, Azure's
    api-version), `headers` (auth)."""

    __slots__ = ("base_url", "headers", "query")

    def __init__(self, base_url: str, headers: dict[str, str] | None = None,
                 query: list[tuple[str, str]] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = headers or {}
        self.query = query or []

    def url(self, path: str) -> str:
        url = self.base_url + path
        return f"{url}?{urlencode(self.query)}" if self.query else url


def target_for(endpoint: str, headers: dict[str, str] | None = None,
               query: list[tuple[str, str]] | None = None) -> ProviderTarget:
    """A target from an endpoint URL: a base URL, or a full API URL whose API path is cut
    off; the endpoint's own query (e.g. `api-version=...`) is kept."""
    parts = urlsplit(endpoint)
    path = parts.path.rstrip("/")
    for suffix in API_SUFFIXES:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    base = f"{parts.scheme}://{parts.netloc}{path}"
    pairs = parse_qsl(parts.query, keep_blank_values=True) + list(query or [])
    return ProviderTarget(base, headers, pairs)


class ProviderRequest:
    """An HTTP request to a provider: `body` is JSON (None for GET)."""

    __slots__ = ("body", "headers", "method", "url")

    def __init__(self, method: str, url: str, headers: dict[str, str],
                 body: JsonObject | None = None) -> None:
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body


class AdapterError(Exception):
    """A request that cannot be served as asked: answered with `status` and an error
    object naming `param` (the request field at fault)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code

    def as_openai(self) -> JsonObject:
        return openai_error(self.message, self.type, self.param, self.code)


class StreamError(Exception):
    """The provider reported an error inside a stream (`error` is an OpenAI error object)."""

    def __init__(self, error: JsonObject) -> None:
        super().__init__(error.get("error", {}).get("message", "stream error"))
        self.error = error


class StreamTranslator(Protocol):
    usage: Usage | None
    done: bool

    def feed(self, data: bytes) -> list[JsonObject]: ...


class ProviderAdapter(Protocol):
    name: str
    default_endpoint: str | None
    kinds: frozenset[str]

    def chat_request(self, body: JsonObject, target: ProviderTarget) -> ProviderRequest: ...
    def chat_response(self, data: JsonObject, created: int) -> JsonObject: ...
    def stream_translator(self, model: str, created: int) -> StreamTranslator: ...
    def embeddings_request(self, body: JsonObject, target: ProviderTarget
                           ) -> ProviderRequest: ...
    def embeddings_response(self, data: JsonObject) -> JsonObject: ...
    def models_request(self, target: ProviderTarget) -> ProviderRequest: ...
    def models_response(self, data: JsonObject) -> JsonObject: ...
    def error(self, status: int, body: bytes) -> JsonObject: ...


_loaded: dict[str, ProviderAdapter] = {}


def adapter_for(name: str) -> ProviderAdapter:
    """The adapter registered as `name` (KeyError when there is none)."""
    adapter = _loaded.get(name)
    if adapter is None:
        module_name, _, attribute = ADAPTERS[name].partition(":")
        adapter = _loaded[name] = getattr(importlib.import_module(module_name), attribute)
    return adapter


# -- shapes shared by adapters ---------------------------------------------------------------

def openai_error(message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None) -> JsonObject:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Error `type` by HTTP status, for errors that come without one (OpenAI's names).
STATUS_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                      403: "permission_error", 404: "not_found_error", 408: "timeout",
                      413: "invalid_request_error", 422: "invalid_request_error",
                      429: "rate_limit_error"}

# Provider error text passed on to clients is cut here: enough for any real message, and a
# provider (or a proxy in front of it) answering with an HTML page does not flood clients.
MAX_ERROR_MESSAGE = 2000


def joined_text_parts(content: Any, param: str, *, joiner: str, parts_only: str,
                      shape: str = "content must be a string or a list of parts") -> str:
    """The text of message content given as a string or as a list of text parts, joined
    with `joiner`; any other part is refused (AdapterError naming `param[i]`, with the
    provider's reason `parts_only`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise AdapterError(parts_only, param=f"{param}[{index}]")
            texts.append(part["text"])
        return joiner.join(texts)
    raise AdapterError(shape, param=param)


def error_type_for(status: int) -> str:
    return STATUS_ERROR_TYPES.get(status, "api_error" if status >= 500 else
                                  "invalid_request_error")


def plain_error_text(body: bytes) -> str:
    """A provider body that is not the expected JSON, as safe text for an error message."""
    text = body.decode("utf-8", "replace").strip()
    return text[:MAX_ERROR_MESSAGE] if text else "no error message"


def usage_from_openai(usage: Any) -> Usage | None:
    """`usage` of an OpenAI-shaped response or chunk, when present."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    if not isinstance(prompt, int):
        return None
    completion = completion if isinstance(completion, int) else 0
    total = usage.get("total_tokens")
    return Usage(prompt, completion, total if isinstance(total, int) else None)


def chunk_template(id: str, model: str, created: int) -> JsonObject:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model}


def json_events(parser: SseParser, data: bytes) -> list[tuple[SseEvent, JsonObject]]:
    """The complete SSE events in `data` (with what the parser held back), each with its
    `data:` parsed as a JSON object. A broken stream or an event that is not a JSON object
    ends the stream: StreamError."""
    try:
        events = parser.feed(data)
    except SseError as exc:
        raise StreamError(openai_error(f"provider stream: {exc}", "api_error")) from None
    parsed: list[tuple[SseEvent, JsonObject]] = []
    for event in events:
        try:
            payload = json.loads(event.data)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise StreamError(openai_error("provider sent a malformed stream event",
                                           "api_error"))
        parsed.append((event, payload))
    return parsed
