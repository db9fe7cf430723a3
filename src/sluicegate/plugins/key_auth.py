"""key-auth: identify the consumer by an API key in a header or query argument."""

from __future__ import annotations

import hashlib
import re

from pydantic import ConfigDict, Field, field_validator

from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Consumer, Plugin, PluginConfig, PluginEnv, Response, register

_JSON = ("Content-Type", "application/json")
_MISSING = b'{"message":"Missing API key in request"}'
_INVALID = b'{"message":"Invalid API key in request"}'

# A stored key may be `sha256:<hex>`: API keys are long and random, so one fast SHA-256
# keeps them safe at rest (a slow password hash buys nothing against a key nobody can
# guess) and costs well under a microsecond per request.
KEY_HASH_PREFIX = "sha256:"
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def hash_key(key: str) -> str:
    """The stored form of an API key (`sluicegate hash-secret --kind key`)."""
    return KEY_HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


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

    key: str = Field(min_length=1, repr=False)
    """The consumer's API key, unique among consumers; or `sha256:<hex>`, its SHA-256, as
    `sluicegate hash-secret --kind key` prints it, so the config holds no usable key."""

    @field_validator("key")
    @classmethod
    def _stored_form(cls, value: str) -> str:
        if value.startswith(KEY_HASH_PREFIX):
            digest = value[len(KEY_HASH_PREFIX):]
            if not _HEX_DIGEST.fullmatch(digest):
                raise ValueError("a 'sha256:' key needs 64 hex digits, the SHA-256 of the key "
                                 "(make it with `sluicegate hash-secret --kind key`)")
            return KEY_HASH_PREFIX + digest.lower()  # one spelling: uniqueness compares it
        return value


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
        hashed: dict[bytes, Consumer] = {}
        for consumer in env.consumers.values():
            credential = consumer.plugin_confs.get(self.name)
            if credential is None:
                continue
            if credential.key.startswith(KEY_HASH_PREFIX):
                hashed[bytes.fromhex(credential.key[len(KEY_HASH_PREFIX):])] = consumer
            else:
                self.consumers[credential.key] = consumer
        # With any hashed key, every key is looked up by its digest: one hash of the
        # presented key, one dict hit. Without, the plain dict (no hashing at all).
        self.by_digest: dict[bytes, Consumer] | None = None
        if hashed:
            self.by_digest = {hashlib.sha256(key.encode()).digest(): consumer
                              for key, consumer in self.consumers.items()}
            self.by_digest.update(hashed)

    def access(self, ctx: RequestContext) -> Response | None:
        key = ctx.get_header(self.header)
        from_header = key is not None
        if key is None:
            key = ctx.args.get(self.query)
            if key is None:
                return Response(401, _MISSING, [_JSON])
        if self.by_digest is None:
            consumer = self.consumers.get(key)
        else:
            consumer = self.by_digest.get(hashlib.sha256(key.encode()).digest())
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
