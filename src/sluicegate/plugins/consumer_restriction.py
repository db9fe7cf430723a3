"""consumer-restriction: admit or refuse a request by who it is (the consumer an auth plugin
identified) or where it goes (its route or service)."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Plugin, PluginConfig, PluginEnv, Response, register

_JSON = ("Content-Type", "application/json")
# APISIX's answer when restricting by consumer and no auth plugin identified one.
_NO_CONSUMER = b'{"message":"Missing authentication or identity verification."}'

HttpMethod = Literal["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT",
                     "TRACE", "PURGE"]
Name = str | int  # route and service ids may be written as numbers


class MethodsAllowed(BaseModel):
    """The methods one consumer may use."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    user: str = Field(min_length=1)
    """Consumer name (`username`)."""
    methods: list[HttpMethod] = Field(min_length=1)
    """The HTTP methods this consumer may use; others are rejected."""


class ConsumerRestrictionConfig(PluginConfig):
    """Who may pass: exactly one of `whitelist` and `blacklist`, matched against the
    request's consumer name, service id or route id (`type`)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    type: Literal["consumer_name", "service_id", "route_id"] = "consumer_name"
    """What the lists name: the consumer (identified by an auth plugin that runs earlier),
    the route's service id, or the route id."""
    whitelist: list[Name] | None = Field(None, min_length=1)
    """Only these may pass. A request without a consumer gets 401 (type consumer_name); a
    route without a service is not on a service_id whitelist."""
    blacklist: list[Name] | None = Field(None, min_length=1)
    """These may not pass; everyone else may. A request without a consumer gets 401
    (type consumer_name)."""
    rejected_code: int = Field(403, ge=200, le=599)
    """Status of the answer to a refused request."""
    rejected_msg: str | None = None
    """`message` of the answer to a refused request; default `The <type> is forbidden.`"""
    allowed_by_methods: list[MethodsAllowed] | None = None
    """Narrows what listed consumers may do: a consumer named here may only use its
    `methods` (also when whitelisted); consumers not named are unaffected."""


@register
class ConsumerRestriction(Plugin):
    """Refuses requests whose consumer, service or route is not on the whitelist or is on the
    blacklist. Runs after the auth plugins (lower priority) so the consumer is known."""

    name = "consumer-restriction"
    priority = 2400
    schema = ConsumerRestrictionConfig

    def __init__(self, conf: ConsumerRestrictionConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.type = conf.type
        self.whitelist = (frozenset(str(name) for name in conf.whitelist)
                          if conf.whitelist is not None else None)
        self.blacklist = frozenset(str(name) for name in conf.blacklist or ())
        self.methods: dict[str, frozenset[str]] = {}
        for entry in conf.allowed_by_methods or ():
            self.methods[entry.user] = self.methods.get(entry.user, frozenset()) | frozenset(
                entry.methods)
        message = conf.rejected_msg or f"The {conf.type} is forbidden."
        self.rejected = Response(conf.rejected_code, json.dumps({"message": message}).encode(),
                                 [_JSON])

    @classmethod
    def check(cls, conf: ConsumerRestrictionConfig) -> list[str]:
        if (conf.whitelist is None) == (conf.blacklist is None):
            return ["set exactly one of whitelist and blacklist"]
        return []

    def access(self, ctx: RequestContext) -> Response | None:
        if self.type == "consumer_name":
            value = ctx.consumer_name
            if value is None:
                return Response(401, _NO_CONSUMER, [_JSON])
        else:
            route = ctx.route
            if route is None:
                value = None
            else:
                value = route.id if self.type == "route_id" else route.service_id
        if value in self.blacklist:
            return self._reject()
        if self.whitelist is not None and value not in self.whitelist:
            return self._reject()
        if self.methods and value is not None:
            allowed = self.methods.get(value)
            if allowed is not None and ctx.method not in allowed:
                return self._reject()
        return None

    def _reject(self) -> Response:
        # A fresh Response per answer: later phases may edit it.
        rejected = self.rejected
        return Response(rejected.status, rejected.body, list(rejected.headers))
