"""basic-auth: identify the consumer by HTTP Basic credentials (RFC 7617)."""

from __future__ import annotations

import binascii
import hmac
from base64 import b64decode

from pydantic import ConfigDict, Field

from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Consumer, Plugin, PluginConfig, PluginEnv, Response, register

_JSON = ("Content-Type", "application/json")
_CHALLENGE = ("WWW-Authenticate", 'Basic realm="sluicegate"')
_MISSING = b'{"message":"Missing authorization in request"}'
_MALFORMED = b'{"message":"Invalid authorization in request"}'
_INVALID = b'{"message":"Invalid user authorization"}'


class BasicAuthConfig(PluginConfig):
    """basic-auth options of a route."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    hide_credentials: bool = False
    """Remove the Authorization header before proxying, so the upstream never sees it."""


class BasicAuthConsumer(PluginConfig):
    """A consumer's basic-auth credential."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    username: str = Field(min_length=1, pattern=r"^[^:]+$")
    """User name the client sends; unique among consumers; may not contain ':'."""
    password: str = Field(min_length=1)
    """Password the client sends."""


@register
class BasicAuth(Plugin):
    """Answers 401 unless the request's `Authorization: Basic` header holds a consumer's
    username and password, and identifies that consumer."""

    name = "basic-auth"
    priority = 2520
    schema = BasicAuthConfig
    consumer_unique_field = "username"
    consumer_schema = BasicAuthConsumer

    def __init__(self, conf: BasicAuthConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.hide_credentials = conf.hide_credentials
        self.users: dict[bytes, tuple[Consumer, bytes]] = {}
        for consumer in env.consumers.values():
            credential = consumer.plugin_confs.get(self.name)
            if credential is not None:
                self.users[credential.username.encode()] = (consumer,
                                                            credential.password.encode())

    def access(self, ctx: RequestContext) -> Response | None:
        header = ctx.get_header("authorization")
        if header is None:
            return Response(401, _MISSING, [_JSON, _CHALLENGE])
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return Response(401, _MALFORMED, [_JSON])
        try:
            decoded = b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return Response(401, _MALFORMED, [_JSON])
        username, sep, password = decoded.partition(b":")
        if not sep:
            return Response(401, _MALFORMED, [_JSON])
        entry = self.users.get(username)
        if entry is None:
            # Spend the same comparison so an unknown user does not answer faster.
            hmac.compare_digest(password, password)
            return Response(401, _INVALID, [_JSON])
        consumer, expected = entry
        if not hmac.compare_digest(password, expected):
            return Response(401, _INVALID, [_JSON])
        ctx.consumer = consumer
        ctx.consumer_name = consumer.username
        if self.hide_credentials:
            ctx.remove_header("authorization")
        return None
