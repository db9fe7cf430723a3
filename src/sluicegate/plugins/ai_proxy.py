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
never logged; the client's own credentials are never forwarded to the provider. The work
of one request lives in ai/serving.py, shared with ai-proxy-multi.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import aiohttp
from pydantic import ConfigDict, Field, field_validator

from sluicegate.ai.adapter import AdapterError
from sluicegate.ai.serving import (
    ENV_REFERENCE,
    MAX_REQUEST_BODY,
    SSE_HEADERS,
    AiAuthConfig,
    AiLoggingConfig,
    AiOverrideConfig,
    ProviderEndpoint,
    account,
    api_of,
    checked_options,
    client_request_of,
    endpoint_problems,
    front_of,
    known_provider,
    new_record,
    resolve_secret,
    respond_adapter_error,
)
from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import (
    LocalHandler,
    Plugin,
    PluginConfig,
    PluginEnv,
    Response,
    register,
)

# Names other modules and users imported from here before ai/serving.py existed.
__all__ = ["ENV_REFERENCE", "MAX_REQUEST_BODY", "SSE_HEADERS", "AiAuthConfig",
           "AiLoggingConfig", "AiOverrideConfig", "AiProxy", "AiProxyConfig",
           "resolve_secret"]


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
        return known_provider(value)

    @field_validator("options")
    @classmethod
    def _options(cls, value: dict[str, Any]) -> dict[str, Any]:
        return checked_options(value)


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
        self.endpoint = ProviderEndpoint(conf.provider, conf.auth, conf.override,
                                         conf.options, conf.timeout, conf.ssl_verify,
                                         conf.logging.payloads)
        self.provider = conf.provider  # read by ai-rate-limiting
        self.summaries = conf.logging.summaries
        self.metrics = env.metrics

    @classmethod
    def check(cls, conf: AiProxyConfig) -> list[str]:
        return endpoint_problems("", conf.provider, conf.auth, conf.override)

    # -- request phase ---------------------------------------------------------------------
    def before_proxy(self, ctx: RequestContext) -> LocalHandler | Response:
        api = api_of(ctx)
        if isinstance(api, Response):
            return api
        return LocalHandler(functools.partial(self.serve, ctx, api[0], api[1]),
                            MAX_REQUEST_BODY)

    async def serve(self, ctx: RequestContext, kind: str, front_name: str, body: bytes,
                    writer: Any) -> None:
        endpoint = self.endpoint
        front = front_of(front_name)
        record = new_record(ctx, self.provider, kind, front_name)
        ctx.upstream_addr = endpoint.provider_addr
        plugins = writer.chain.plugins
        try:
            client_request = client_request_of(kind, front_name, body, ctx, plugins)
            request = await endpoint.provider_request(kind, client_request, record, ctx,
                                                      plugins)
        except AdapterError as exc:
            respond_adapter_error(exc, front, record, writer)
            return
        started = time.monotonic()
        try:
            async with endpoint.send(request) as answer:
                ctx.upstream_status = answer.status
                ctx.upstream_latency = time.monotonic() - started
                if answer.status >= 400:
                    await endpoint.relay_error(answer, front, record, writer)
                elif record.stream:
                    await endpoint.relay_stream(ctx, answer, client_request, front, record,
                                                writer)
                else:
                    await endpoint.relay_answer(kind, answer, front, record, writer)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if writer.head_sent:  # mid-stream: the stream relay sent its error event
                return
            writer.respond(endpoint.failure_response(exc, front, record, self.name))

    # -- log phase -------------------------------------------------------------------------
    def log(self, ctx: RequestContext) -> None:
        account(ctx, self.metrics, self.summaries)
