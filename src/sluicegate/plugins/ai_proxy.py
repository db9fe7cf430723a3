"""ai-proxy: the route answers OpenAI- and Anthropic-compatible AI APIs from one LLM
provider, in place of an upstream (APISIX's ai-proxy option names).

Served on the route's paths, by how they end:
- `POST .../chat/completions` (and any other POST): OpenAI chat completions, streamed or not;
- `POST .../embeddings`: OpenAI embeddings;
- `GET .../models`: the provider's models, in Anthropic's shape when the request carries
  an `anthropic-version` header (the Anthropic SDKs send it), else OpenAI's;
- `POST .../messages`: Anthropic's Messages API, streamed or not, translated to and from
  the provider's API, so either SDK works with any provider.

Provider API keys come from the config or environment variables (`$env://NAME`) and are
never logged; the client's own credentials are never forwarded to the provider.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from pydantic import ConfigDict, Field, field_validator

from sluicegate.ai import provider_client
from sluicegate.ai.accounting import AiRecord
from sluicegate.ai.adapter import (
    ADAPTERS,
    AdapterError,
    JsonObject,
    ProviderAdapter,
    ProviderRequest,
    ProviderTarget,
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
from sluicegate.plugins.base import (
    LocalHandler,
    Plugin,
    PluginConfig,
    PluginEnv,
    Response,
    register,
)

log = logging.getLogger("sluicegate.ai")

# Request bodies are read whole before the provider is called. Vision requests carry images
# inline as base64 (OpenAI accepts images up to 20 MB); 32 MiB leaves room for that.
MAX_REQUEST_BODY = 32 * 1024 * 1024
# `$env://NAME` (APISIX's form of a secret reference), anywhere in a value.
ENV_REFERENCE = re.compile(r"\$env://([A-Za-z_][A-Za-z0-9_]*)")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_JSON = ("Content-Type", "application/json")
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
    """What ai-proxy adds to logs (token figures always reach the access log)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    summaries: bool = False
    """One line per request in the gateway's own log (logger `sluicegate.ai`): provider,
    model, status, tokens, latency and time to first token."""
    payloads: bool = False
    """Put the request sent to the provider and the answer's text in the access log
    entry (`ai.request`, `ai.response`, 8 KiB each at most)."""


class AiProxyConfig(PluginConfig):
    """ai-proxy options."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    provider: str
    """openai, azure-openai, anthropic, deepseek, mistral, ollama, gemini, wenxin, or
    openai-compatible."""
    auth: AiAuthConfig = Field(default_factory=AiAuthConfig)
    """Credentials for the provider: `header` and/or `query` name → value."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Request fields set on every request, over what the client sent: `model`, and e.g.
    `max_tokens`, `temperature`."""
    override: AiOverrideConfig = Field(default_factory=AiOverrideConfig)
    """`endpoint`: where the provider is, when not its public API."""
    timeout: int = Field(30000, gt=0)
    """Milliseconds to connect and then to wait for each read from the provider (its
    answer head, each part of a stream): a stream may last longer as long as it flows."""
    ssl_verify: bool = True
    """Verify the provider's TLS certificate."""
    logging: AiLoggingConfig = Field(default_factory=AiLoggingConfig)
    """`summaries` and `payloads`."""

    @field_validator("provider")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ADAPTERS:
            raise ValueError(f"unknown provider {value!r} (known: {', '.join(ADAPTERS)})")
        return value

    @field_validator("options")
    @classmethod
    def _options(cls, value: dict[str, Any]) -> dict[str, Any]:
        model = value.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise ValueError("model: must be a non-empty string")
        if "stream" in value:
            raise ValueError("stream: chosen by each request, not by the route")
        return value


@register
class AiProxy(Plugin):
    """Answers AI API requests from the configured provider (see the module docstring for
    the APIs), with token accounting in `/metrics` (`sluicegate_ai_*`) and the access log."""

    name = "ai-proxy"
    priority = 1040  # APISIX's; it serves in before_proxy, after every auth and limit
    schema = AiProxyConfig
    serves_requests = True

    def __init__(self, conf: AiProxyConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.provider = conf.provider
        self.adapter: ProviderAdapter = adapter_for(conf.provider)
        endpoint = conf.override.endpoint or self.adapter.default_endpoint or ""
        headers = {name: resolve_secret(value) for name, value in conf.auth.header.items()}
        query = [(name, resolve_secret(value)) for name, value in conf.auth.query.items()]
        self.target = target_for(endpoint, headers, query)
        parts = urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self.provider_addr = f"{parts.hostname}:{port}"  # upstream_addr in logs
        self.options = dict(conf.options)
        seconds = conf.timeout / 1000
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=seconds,
                                             sock_read=seconds)
        self.ssl_verify = conf.ssl_verify
        self.summaries = conf.logging.summaries
        self.payloads = conf.logging.payloads
        self.metrics = env.metrics
        # Providers whose credential is exchanged for a token first (wenxin's OAuth).
        self.authorize = getattr(self.adapter, "authorize", None)

    @classmethod
    def check(cls, conf: AiProxyConfig) -> list[str]:
        problems = []
        adapter = adapter_for(conf.provider)
        if adapter.default_endpoint is None and not conf.override.endpoint:
            problems.append(f"override.endpoint: required for provider {conf.provider}")
        for section, values in (("header", conf.auth.header), ("query", conf.auth.query)):
            for name, value in values.items():
                for variable in ENV_REFERENCE.findall(value):
                    if variable not in os.environ:
                        problems.append(f"auth.{section}.{name}: environment variable "
                                        f"{variable} is not set")
        return problems

    # -- request phase ---------------------------------------------------------------------
    def before_proxy(self, ctx: RequestContext) -> LocalHandler | Response:
        uri = ctx.uri.rstrip("/")
        method = ctx.method
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
            return Response(404, json.dumps(error).encode(), [_JSON])
        return LocalHandler(functools.partial(self.serve, ctx, api[0], api[1]),
                            MAX_REQUEST_BODY)

    async def serve(self, ctx: RequestContext, kind: str, front_name: str, body: bytes,
                    writer: Any) -> None:
        front = ANTHROPIC_FRONT if front_name == "anthropic" else OPENAI_FRONT
        record = AiRecord(self.provider, kind if front_name == "openai" else
                          f"{kind}:{front_name}")
        if ctx.vars is None:
            ctx.vars = {}
        ctx.vars[AI_RECORD_VAR] = record
        ctx.upstream_addr = self.provider_addr
        try:
            target = self.target
            if self.authorize is not None:
                target = await self.authorize(target, self._fetch)
            client_request, request = self._build(kind, front_name, body, record, ctx,
                                                  writer.chain.plugins, target)
        except AdapterError as exc:
            record.error = "bad_request"
            record.finished = True
            writer.respond(Response(exc.status, front.error_body(exc.status, exc.as_openai()),
                                    [_JSON]))
            return
        if self.payloads and request.body is not None:
            record.request_payload = json.dumps(request.body, ensure_ascii=False)
        started = time.monotonic()
        try:
            async with provider_client.send(request, self.timeout, self.ssl_verify) as answer:
                ctx.upstream_status = answer.status
                ctx.upstream_latency = time.monotonic() - started
                if answer.status >= 400:
                    await self._provider_error(answer, front, record, writer)
                elif record.stream:
                    await self._relay_stream(ctx, answer, client_request, front, record,
                                             writer)
                else:
                    await self._relay_answer(kind, answer, client_request, front, record,
                                             writer)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if writer.head_sent:  # mid-stream: the stream relay sent its error event
                return
            status, label, message = provider_client.describe_failure(exc)
            log.warning("ai-proxy %s: %s", self.provider, message)
            record.error = label
            record.finished = True
            error = openai_error(message, "api_error" if status == 502 else "timeout")
            writer.respond(Response(status, front.error_body(status, error), [_JSON]))

    def _build(self, kind: str, front_name: str, body: bytes, record: AiRecord,
               ctx: RequestContext, plugins: list[Plugin], target: ProviderTarget
               ) -> tuple[JsonObject, ProviderRequest]:
        """(the client's request in OpenAI form, the provider request). Plugins of the
        chain may take part: `ai_body(ctx, body)` returns the request made from the parsed
        body (ai-prompt-template), `ai_request(ctx, request)` may refuse the final request
        by raising AdapterError (ai-model-acl)."""
        if kind == "models":
            return {}, self.adapter.models_request(target)
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
            return client_request, self.adapter.embeddings_request(request, target)
        record.stream = bool(request.get("stream"))
        record.prompt_estimate = estimate_prompt_tokens(request)
        return client_request, self.adapter.chat_request(request, target)

    async def _fetch(self, request: ProviderRequest) -> tuple[int, bytes]:
        """A call an adapter's `authorize` needs (wenxin's token): (status, body)."""
        try:
            async with provider_client.send(request, self.timeout, self.ssl_verify) as answer:
                return answer.status, await answer.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, _, message = provider_client.describe_failure(exc)
            raise AdapterError(message, status=status, type="api_error") from None

    async def _provider_error(self, answer: aiohttp.ClientResponse, front: Any,
                              record: AiRecord, writer: Any) -> None:
        body = await answer.read()
        error = self.adapter.error(answer.status, body)
        record.error = str(answer.status)
        record.finished = True
        # A provider's 5xx is a bad gateway to the client; its 4xx (bad request, unknown
        # model, rate limit) are the client's to see as they are.
        status = 502 if answer.status >= 500 else answer.status
        headers = [_JSON]
        retry_after = answer.headers.get("Retry-After")
        if retry_after is not None:
            headers.append(("Retry-After", retry_after))
        writer.respond(Response(status, front.error_body(status, error), headers))

    async def _relay_answer(self, kind: str, answer: aiohttp.ClientResponse,
                            client_request: JsonObject, front: Any, record: AiRecord,
                            writer: Any) -> None:
        body = await answer.read()
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError("not an object")
            if kind == "chat":
                internal = self.adapter.chat_response(data, int(time.time()))
                usage = usage_from_openai(internal.get("usage"))
                if usage is None:
                    record.completion_parts.append(_answer_text(internal))
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
            record.error = str(exc.status)
            record.finished = True
            writer.respond(Response(exc.status, front.error_body(exc.status, exc.as_openai()),
                                    [_JSON]))
            return
        except (ValueError, AttributeError, TypeError, KeyError):
            record.error = "bad_response"
            record.finished = True
            error = openai_error("the provider's answer is not the JSON it should be",
                                 "api_error")
            writer.respond(Response(502, front.error_body(502, error), [_JSON]))
            return
        record.usage = usage
        if self.payloads and kind == "chat":
            record.response_payload = _answer_text(result)
        record.finished = True
        writer.respond(Response(200, json.dumps(result, ensure_ascii=False).encode(),
                                [_JSON]))

    async def _relay_stream(self, ctx: RequestContext, answer: aiohttp.ClientResponse,
                            client_request: JsonObject, front: Any, record: AiRecord,
                            writer: Any) -> None:
        translator = self.adapter.stream_translator(record.model, int(time.time()))
        encoder = front.stream_encoder(client_request, record.model, record.prompt_estimate)
        writer.send_head(200, SSE_HEADERS)
        parts = record.completion_parts
        waiting = True  # for the first token
        try:
            async for data in answer.content.iter_any():
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
            log.warning("ai-proxy %s: stream cut: %s", self.provider, message)
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

    # -- log phase -------------------------------------------------------------------------
    def log(self, ctx: RequestContext) -> None:
        record = ctx.vars.get(AI_RECORD_VAR) if ctx.vars else None
        if record is None:
            return
        if not record.finished:  # the client left: count what the provider produced so far
            record.finished = True
            record.error = record.error or "client_closed"
            if record.api.startswith("chat"):
                record.usage = record.estimate_usage()
        route = ctx.route
        labels = (route.id if route is not None else "", ctx.consumer_name or "",
                  self.provider, record.model)
        usage = record.usage
        latency = time.monotonic() - ctx.start_time
        if self.metrics is not None:
            self.metrics.record_ai(labels, ctx.response_status, record.error,
                                   usage.prompt_tokens if usage else 0,
                                   usage.completion_tokens if usage else 0,
                                   usage.estimated if usage else False, latency, record.ttft)
        if self.summaries:
            log.info("ai %s provider=%s model=%s status=%s error=%s tokens=%s/%s%s "
                     "latency_ms=%.1f ttft_ms=%s", record.api, self.provider, record.model,
                     ctx.response_status, record.error or "-",
                     usage.prompt_tokens if usage else "-",
                     usage.completion_tokens if usage else "-",
                     " (estimated)" if usage and usage.estimated else "", latency * 1000,
                     f"{record.ttft * 1000:.1f}" if record.ttft is not None else "-")


def _answer_text(result: JsonObject) -> str:
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
