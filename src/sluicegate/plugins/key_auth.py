"""key-auth: identify the consumer by an API key in a header or query argument."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Consumer, Plugin, PluginConfig, PluginEnv, Response, register

_JSON = ("Content-Type", "application/json")
_MISSING = b'{"message":"Missing API key in request"}'
_INVALID = b'{"message":"Invalid API key in request"}'


class KeyAuthConfig(PluginConfig):
    """Where a route looks for the API key."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    header: str = Field("apikey", min_length=1, pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
    """Request header holding the key; looked at first."""
    query: str = Field("apikey", min_length=1)
    """Query argument holding the key, used when the header is absent."""
    hide_credentials: bool = False
    """Remove the key (the header, or the query argument it came from) before proxying,
    so the upstream never sees it."""


class KeyAuthConsumer(PluginConfig):
    """A consumer's key-auth credential."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    key: str = Field(min_length=1)
    """The consumer's API key; unique among consumers."""


@register
class KeyAuth(Plugin):
    """Answers 401 unless the request carries the key of a consumer, and identifies that
    consumer (`consumer_name`) for the plugins and logs after it."""

    name = "key-auth"
    priority = 2500
    schema = KeyAuthConfig
    consumer_unique_field = "key"
    consumer_schema = KeyAuthConsumer

    def __init__(self, conf: KeyAuthConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.header = conf.header
        self.query = conf.query
        self.hide_credentials = conf.hide_credentials
        self.consumers: dict[str, Consumer] = {}
        for consumer in env.consumers.values():
            credential = consumer.plugin_confs.get(self.name)
            if credential is not None:
                self.consumers[credential.key] = consumer

    def access(self, ctx: RequestContext) -> Response | None:
        key = ctx.get_header(self.header)
        from_header = key is not None
        if key is None:
            key = ctx.args.get(self.query)
            if key is None:
                return Response(401, _MISSING, [_JSON])
        consumer = self.consumers.get(key)
        if consumer is None:
            return Response(401, _INVALID, [_JSON])
        ctx.consumer = consumer
        ctx.consumer_name = consumer.username
        if self.hide_credentials:
            if from_header:
                ctx.remove_header(self.header)
            else:
                ctx.remove_arg(self.query)
        return None
