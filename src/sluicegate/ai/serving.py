"""Serving one AI API request from one provider: what ai-proxy does, and what ai-proxy-multi
does for each instance it tries. Config pieces (auth, endpoint override, logging), the API a
request path asks for, reading the client's request, calling the provider and relaying its
answer, error or stream, and the log-phase accounting.

`ProviderEndpoint` is one configured provider; its `relay_*` methods write to the exchange
(plugins/base.py LocalHandler's writer). Provider API keys never reach logs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from pydantic import ConfigDict, Field, field_validator

from sluicegate.ai import provider_client
from sluicegate.ai.accounting import AI_PRICER_VAR, AiRecord
from sluicegate.ai.adapter import (
    ADAPTERS,
    AdapterError,
    JsonObject,
    ProviderAdapter,
    ProviderRequest,
    StreamError,
    Usage,
    adapter_for,
    openai_error,
    target_for,
    usage_from_openai,
)
from sluicegate.ai.front import (
    ANTHROPIC_FRONT,
    OPENAI_FRONT,
    check_chat_request,
    check_embeddings_request,
    messages_to_chat,
)
from sluicegate.ai.tokens import estimate_prompt_tokens
from sluicegate.http.context import RequestContext
from sluicegate.observe.access_log import AI_RECORD_VAR
from sluicegate.plugins.base import Plugin, PluginConfig, Response

log = logging.getLogger("sluicegate.ai")

# Request bodies are read whole before the provider is called. Vision requests carry images
# inline as base64 (OpenAI accepts images up to 20 MB); 32 MiB leaves room for that.
MAX_REQUEST_BODY = 32 * 1024 * 1024
# `$env://NAME` (APISIX's form of a secret reference), anywhere in a value.
ENV_REFERENCE = re.compile(r"\$env://([A-Za-z_][A-Za-z0-9_]*)")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
JSON_HEADER = ("Content-Type", "application/json")
SSE_HEADERS = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
               ("X-Accel-Buffering", "no")]


def resolve_secret(value: str) -> str:
    """The value with each `$env://NAME` replaced by the environment variable NAME."""
    if "$env://" not in value:
        return value
    return ENV_REFERENCE.sub(lambda match: os.environ.get(match.group(1), "").strip(), value)


class AiAuthConfig(PluginConfig):
    """Credentials sent to the provider. `$env://NAME` in a value stands for the gateway's
    environment variable NAME, read when the config is applied (`Bearer $env://OPENAI_KEY`);
    the config then holds no key."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    header: dict[str, str] = Field(default_factory=dict, repr=False)
    """Request headers: `{Authorization: "Bearer $env://OPENAI_API_KEY"}` for OpenAI and
    most others; Anthropic takes `x-api-key`, Azure `api-key`."""
    query: dict[str, str] = Field(default_factory=dict, repr=False)
    """Query arguments, e.g. `{key: $env://GEMINI_KEY}`."""

    @field_validator("header")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _TOKEN.match(name):
                raise ValueError(f"{name}: not a valid header name")
            if any(c in text for c in "\r\n\x00"):
                raise ValueError(f"{name}: header values cannot hold CR, LF or NUL")
        return value


class AiOverrideConfig(PluginConfig):
    """Where the provider is."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    endpoint: str | None = None
    """The provider's base URL (e.g. `http://127.0.0.1:8000/v1`), or a full API URL such as
    `https://api.openai.com/v1/chat/completions` whose API path is cut off; a query string
    (Azure's `api-version=...`) is kept. Required for azure-openai and openai-compatible."""

    @field_validator("endpoint")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http:// or https:// URL with a host")
        return value


class AiLoggingConfig(PluginConfig):
    """What the AI plugin adds to logs (token figures always reach the access log)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    summaries: bool = False
    """One line per request in the gateway's own log (logger `sluicegate.ai`): provider,
    model, status, tokens, latency and time to first token."""
    payloads: bool = False
    """Put the request sent to the provider and the answer's text in the access log
    entry (`ai.request`, `ai.response`, 8 KiB each at most)."""


def known_provider(value: str) -> str:
    """Validator body of a `provider` option."""
    if value not in ADAPTERS:
        raise ValueError(f"unknown provider {value!r} (known: {', '.join(ADAPTERS)})")
    return value


def checked_options(value: dict[str, Any]) -> dict[str, Any]:
    """Validator body of an `options` option (request fields forced by the route)."""
    model = value.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ValueError("model: must be a non-empty string")
    if "stream" in value:
        raise ValueError("stream: chosen by each request, not by the route")
    return value


def endpoint_problems(prefix: str, provider: str, auth: AiAuthConfig,
                      override: AiOverrideConfig) -> list[str]:
    """Semantic checks of one provider's config; `prefix` is its field path (`` or
    `instances[0].`)."""
    problems = []
    if adapter_for(provider).default_endpoint is None and not override.endpoint:
        problems.append(f"{prefix}override.endpoint: required for provider {provider}")
    for section, values in (("header", auth.header), ("query", auth.query)):
        for name, value in values.items():
            for variable in ENV_REFERENCE.findall(value):
                if variable not in os.environ:
                    problems.append(f"{prefix}auth.{section}.{name}: environment variable "
                                    f"{variable} is not set")
    return problems


def api_of(ctx: RequestContext) -> tuple[str, str] | Response:
    """(kind: chat | embeddings | models, front: openai | anthropic) the request asks for,
    or the 404 answer."""
    uri = ctx.uri.rstrip("/")
    method = ctx.method
    api: tuple[str, str] | None
    if uri.endswith("/models"):
        front = "anthropic" if ctx.get_header("anthropic-version") else "openai"
        api = ("models", front) if method == "GET" else None
    elif method != "POST":
        api = None
    elif uri.endswith("/embeddings"):
        api = ("embeddings", "openai")
    elif uri.endswith("/messages"):
        api = ("chat", "anthropic")
    else:
        api = ("chat", "openai")
    if api is None:
        error = openai_error(f"no AI API answers {method} {ctx.uri}", code="unknown_url")
        return Response(404, json.dumps(error).encode(), [JSON_HEADER])
    return api


def front_of(front_name: str) -> Any:
    return ANTHROPIC_FRONT if front_name == "anthropic" else OPENAI_FRONT


def new_record(ctx: RequestContext, provider: str, kind: str, front_name: str) -> AiRecord:
    """The request's AiRecord, put where the log hooks and the access log find it."""
    record = AiRecord(provider, kind if front_name == "openai" else f"{kind}:{front_name}")
    if ctx.vars is None:
        ctx.vars = {}
    ctx.vars[AI_RECORD_VAR] = record
    record.pricer = ctx.vars.get(AI_PRICER_VAR)
    return record


def respond_adapter_error(exc: AdapterError, front: Any, record: AiRecord, writer: Any,
                          label: str = "bad_request") -> None:
    record.error = label
    record.finished = True
    writer.respond(Response(exc.status, front.error_body(exc.status, exc.as_openai()),
                            [JSON_HEADER]))


def client_request_of(kind: str, front_name: str, body: bytes, ctx: RequestContext,
                      plugins: list[Plugin]) -> JsonObject:
    """The client's request in OpenAI form, checked. Plugins of the chain may take part:
    `ai_body(ctx, body)` returns the request made from the parsed body
    (ai-prompt-template). Raises AdapterError."""
    if kind == "models":
        return {}
    try:
        client_request = json.loads(body)
    except ValueError as exc:
        raise AdapterError(f"the request body is not valid JSON: {exc}", "body") from None
    for plugin in plugins:
        if hasattr(plugin, "ai_body"):
            client_request = plugin.ai_body(ctx, client_request)
    if front_name == "anthropic":
        client_request = messages_to_chat(client_request)
    if kind == "embeddings":
        check_embeddings_request(client_request)
    else:
        check_chat_request(client_request)
    return client_request


class ProviderEndpoint:
    """One configured provider: its adapter, where it is (credentials resolved), the
    request fields the route forces, and timeouts. Calls it and relays its answers."""

    __slots__ = ("adapter", "authorize", "options", "payloads", "provider", "provider_addr",
                 "ssl_verify", "target", "timeout")

    def __init__(self, provider: str, auth: AiAuthConfig, override: AiOverrideConfig,
                 options: dict[str, Any], timeout_ms: int, ssl_verify: bool = True,
                 payloads: bool = False) -> None:
        self.provider = provider
        self.adapter: ProviderAdapter = adapter_for(provider)
        endpoint = override.endpoint or self.adapter.default_endpoint or ""
        headers = {name: resolve_secret(value) for name, value in auth.header.items()}
        query = [(name, resolve_secret(value)) for name, value in auth.query.items()]
        self.target = target_for(endpoint, headers, query)
        parts = urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self.provider_addr = f"{parts.hostname}:{port}"  # upstream_addr in logs
        self.options = dict(options)
        seconds = timeout_ms / 1000
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=seconds,
                                             sock_read=seconds)
        self.ssl_verify = ssl_verify
        self.payloads = payloads
        # Providers whose credential is exchanged for a token first (wenxin's OAuth).
        self.authorize = getattr(self.adapter, "authorize", None)

    async def provider_request(self, kind: str, client_request: JsonObject,
                               record: AiRecord, ctx: RequestContext, plugins: list[Plugin]
                               ) -> ProviderRequest:
        """The request to this provider. `ai_request(ctx, request)` hooks of the chain may
        refuse it by raising AdapterError (ai-model-acl)."""
        target = self.target
        if self.authorize is not None:
            target = await self.authorize(target, self._fetch)
        if kind == "models":
            return self.adapter.models_request(target)
        request = {**client_request, **self.options} if self.options else client_request
        model = request.get("model")
        if not model and self.provider != "azure-openai":  # Azure: the deployment's model
            raise AdapterError("model is required (in the request or the route's "
                               "options.model)", "model")
        record.model = str(model or "")[:200]
        for plugin in plugins:
            if hasattr(plugin, "ai_request"):
                plugin.ai_request(ctx, request)
        if kind == "embeddings":
            request_out = self.adapter.embeddings_request(request, target)
        else:
            record.stream = bool(request.get("stream"))
            record.prompt_estimate = estimate_prompt_tokens(request)
            request_out = self.adapter.chat_request(request, target)
        if self.payloads and request_out.body is not None:
            record.request_payload = json.dumps(request_out.body, ensure_ascii=False)
        return request_out

    def send(self, request: ProviderRequest) -> Any:
        """`async with endpoint.send(request) as answer`."""
        return provider_client.send(request, self.timeout, self.ssl_verify)

    async def _fetch(self, request: ProviderRequest) -> tuple[int, bytes]:
        """A call an adapter's `authorize` needs (wenxin's token): (status, body)."""
        try:
            async with self.send(request) as answer:
                return answer.status, await answer.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, _, message = provider_client.describe_failure(exc)
            raise AdapterError(message, status=status, type="api_error") from None

    # -- answers ------------------------------------------------------------------------
    def error_response(self, status: int, body: bytes, retry_after: str | None,
                       front: Any, record: AiRecord) -> Response:
        """The client's answer for a provider error status: its 5xx is a bad gateway to
        the client; its 4xx (bad request, unknown model, rate limit) are the client's to
        see as they are."""
        error = self.adapter.error(status, body)
        record.error = str(status)
        record.finished = True
        client_status = 502 if status >= 500 else status
        headers = [JSON_HEADER]
        if retry_after is not None:
            headers.append(("Retry-After", retry_after))
        return Response(client_status, front.error_body(client_status, error), headers)

    async def relay_error(self, answer: aiohttp.ClientResponse, front: Any,
                          record: AiRecord, writer: Any) -> None:
        body = await answer.read()
        writer.respond(self.error_response(answer.status, body,
                                           answer.headers.get("Retry-After"), front, record))

    def failure_response(self, exc: BaseException, front: Any, record: AiRecord,
                         name: str = "ai-proxy") -> Response:
        """The client's answer for a call that failed (timeout, connect...)."""
        status, label, message = provider_client.describe_failure(exc)
        log.warning("%s %s: %s", name, self.provider, message)
        record.error = label
        record.finished = True
        error = openai_error(message, "api_error" if status == 502 else "timeout")
        return Response(status, front.error_body(status, error), [JSON_HEADER])

    async def relay_answer(self, kind: str, answer: aiohttp.ClientResponse, front: Any,
                           record: AiRecord, writer: Any) -> None:
        body = await answer.read()
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError("not an object")
            if kind == "chat":
                internal = self.adapter.chat_response(data, int(time.time()))
                usage = usage_from_openai(internal.get("usage"))
                if usage is None:
                    record.completion_parts.append(answer_text(internal))
                    usage = record.estimate_usage()
                    if front is ANTHROPIC_FRONT:  # its answers always carry usage
                        internal["usage"] = usage.as_openai()
                result = front.chat_response(internal)
            elif kind == "embeddings":
                result = self.adapter.embeddings_response(data)
                usage = usage_from_openai(result.get("usage"))
            else:
                result = front.models_response(self.adapter.models_response(data))
                usage = None
        except AdapterError as exc:  # an error inside a 200 answer (wenxin's error_code)
            respond_adapter_error(exc, front, record, writer, str(exc.status))
            return
        except (ValueError, AttributeError, TypeError, KeyError):
            record.error = "bad_response"
            record.finished = True
            error = openai_error("the provider's answer is not the JSON it should be",
                                 "api_error")
            writer.respond(Response(502, front.error_body(502, error), [JSON_HEADER]))
            return
        record.usage = usage
        if self.payloads and kind == "chat":
            record.response_payload = answer_text(result)
        record.finished = True
        writer.respond(Response(200, json.dumps(result, ensure_ascii=False).encode(),
                                [JSON_HEADER]))

    async def relay_stream(self, ctx: RequestContext, answer: aiohttp.ClientResponse,
                           client_request: JsonObject, front: Any, record: AiRecord,
                           writer: Any, first: bytes = b"") -> None:
        """Relay a streamed answer. `first`: bytes the caller already read from it (to
        know the provider answers before the client gets a byte)."""
        translator = self.adapter.stream_translator(record.model, int(time.time()))
        encoder = front.stream_encoder(client_request, record.model, record.prompt_estimate)
        writer.send_head(200, SSE_HEADERS)
        parts = record.completion_parts
        waiting = True  # for the first token
        try:
            async for data in _pieces(first, answer):
                out = []
                for chunk in translator.feed(data):
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        text = delta.get("content")
                        if text:
                            parts.append(text)
                        for call in delta.get("tool_calls") or ():
                            arguments = (call.get("function") or {}).get("arguments")
                            if arguments:
                                parts.append(arguments)
                    if waiting and parts:
                        waiting = False
                        record.ttft = time.monotonic() - ctx.start_time
                    out.append(encoder.chunk(chunk))
                if out:
                    writer.send_body(b"".join(out))
            if not translator.done:
                raise StreamError(openai_error("the provider's stream ended before the "
                                               "answer did", "api_error"))
        except StreamError as exc:
            record.error = "stream"
            self._end_stream(record, translator.usage)
            writer.send_body(encoder.error(exc.error))
            return
        except (aiohttp.ClientError, TimeoutError) as exc:
            _, _, message = provider_client.describe_failure(exc)
            log.warning("ai %s: stream cut: %s", self.provider, message)
            record.error = "stream"
            self._end_stream(record, translator.usage)
            writer.send_body(encoder.error(openai_error(f"stream cut: {message}",
                                                        "api_error")))
            raise
        usage = self._end_stream(record, translator.usage)
        writer.send_body(encoder.end(usage))

    def _end_stream(self, record: AiRecord, usage: Usage | None) -> Usage:
        record.finished = True
        record.usage = usage if usage is not None else record.estimate_usage()
        if self.payloads:
            record.response_payload = "".join(record.completion_parts)
        return record.usage


async def _pieces(first: bytes, answer: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for data in answer.content.iter_any():
        yield data


def answer_text(result: JsonObject) -> str:
    if result.get("type") == "message":
        return "".join(b.get("text", "") for b in result.get("content") or ()
                       if isinstance(b, dict))
    parts = []
    for choice in result.get("choices") or ():
        message = choice.get("message") or {}
        if isinstance(message.get("content"), str):
            parts.append(message["content"])
        for call in message.get("tool_calls") or ():
            parts.append((call.get("function") or {}).get("arguments") or "")
    return "".join(parts)


# -- log phase -------------------------------------------------------------------------------

def account(ctx: RequestContext, metrics: Any, summaries: bool) -> AiRecord | None:
    """Count the request's AI record in /metrics (and the summary log line): the
    provider and model are those that answered."""
    record: AiRecord | None = ctx.vars.get(AI_RECORD_VAR) if ctx.vars else None
    if record is None:
        return None
    record.settle()
    route = ctx.route
    labels = (route.id if route is not None else "", ctx.consumer_name or "",
              record.provider, record.model)
    usage = record.usage
    latency = time.monotonic() - ctx.start_time
    if metrics is not None:
        metrics.record_ai(labels, ctx.response_status, record.error,
                          usage.prompt_tokens if usage else 0,
                          usage.completion_tokens if usage else 0,
                          usage.estimated if usage else False, latency, record.ttft)
    if summaries:
        log.info("ai %s provider=%s%s model=%s status=%s error=%s tokens=%s/%s%s "
                 "latency_ms=%.1f ttft_ms=%s", record.api, record.provider,
                 f" instance={record.instance}" if record.instance else "", record.model,
                 ctx.response_status, record.error or "-",
                 usage.prompt_tokens if usage else "-",
                 usage.completion_tokens if usage else "-",
                 " (estimated)" if usage and usage.estimated else "", latency * 1000,
                 f"{record.ttft * 1000:.1f}" if record.ttft is not None else "-")
    return record
