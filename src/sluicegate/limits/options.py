"""Options the rate-limit plugins share (APISIX names), their checks, and what they build:
the store of the policy, the key function, the rejection response. `StoreOptions` (where
counters live) is also ai-budget's, which keeps counters but has no key or rejection of
this shape."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

from sluicegate.limits.counters import CounterStore, local_store
from sluicegate.limits.redis_store import (
    DEFAULT_CONN_TTL_SECONDS,
    RedisSettings,
    RedisStore,
    StoreUnavailable,
)
from sluicegate.plugins.base import PluginConfig, PluginEnv, Response
from sluicegate.proto.http1 import error_body

__all__ = ["MIN_DELAY_SECONDS", "POLICIES", "STORE_FAILURE_STATUS", "LimitOptions",
           "NonNegativeInt", "NonNegativeNumber", "PositiveInt", "PositiveNumber",
           "StoreFailure", "StoreOptions", "StoreUnavailable", "rejection", "store_for"]

# Below this a delay is not worth a timer (APISIX sleeps only from 1 ms).
MIN_DELAY_SECONDS = 0.001
POLICIES = ("local", "redis")
# The status of a request whose limit could not be checked (Redis down, no degradation):
# the gateway cannot serve it as configured, so 503 rather than APISIX's 500.
STORE_FAILURE_STATUS = 503


def _positive(value: float) -> float:
    if not value > 0:
        raise ValueError("must be > 0")
    return value


def _not_negative(value: float) -> float:
    if not value >= 0:
        raise ValueError("must be >= 0")
    return value


# Our own checks rather than Field(gt=0), for APISIX-style reasons: "count: must be > 0".
PositiveInt = Annotated[int, AfterValidator(_positive),
                        Field(json_schema_extra={"exclusiveMinimum": 0})]
NonNegativeInt = Annotated[int, AfterValidator(_not_negative),
                           Field(json_schema_extra={"minimum": 0})]
PositiveNumber = Annotated[float, AfterValidator(_positive),
                           Field(json_schema_extra={"exclusiveMinimum": 0})]
NonNegativeNumber = Annotated[float, AfterValidator(_not_negative),
                              Field(json_schema_extra={"minimum": 0})]


class StoreOptions(PluginConfig):
    """Where a plugin's counters live: this host, or one Redis server shared by gateways."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    policy: str = Field("local", json_schema_extra={"enum": list(POLICIES)})
    """Where counters live. `local`: this host, exact across the workers of the gateway.
    `redis`: one Redis server (`redis_host`...), exact across every gateway using it."""
    redis_host: str | None = None
    """Redis server address (host name or IP); required with policy `redis`."""
    redis_port: int = Field(6379, json_schema_extra={"minimum": 1, "maximum": 65535})
    """Redis server port."""
    redis_username: str | None = None
    """Redis ACL user (Redis 6+); without it, `redis_password` authenticates the default
    user."""
    redis_password: str | None = Field(None, repr=False)
    """Redis password (`AUTH`); never logged."""
    redis_database: NonNegativeInt = 0
    """Redis database number (`SELECT`)."""
    redis_timeout: PositiveInt = 1000
    """Milliseconds allowed for connecting to Redis and for each check against it."""
    redis_ssl: bool = False
    """Connect to Redis with TLS, verifying its certificate against the system CAs."""
    allow_degradation: bool = False
    """When the counter store cannot answer (Redis unreachable or too slow): true lets
    the request pass unlimited, false rejects it with 503. Both are counted in
    `sluicegate_limit_store_errors_total`."""

    @field_validator("redis_host")
    @classmethod
    def _host_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("redis_port")
    @classmethod
    def _port(cls, value: int) -> int:
        if not 1 <= value <= 65535:
            raise ValueError("must be between 1 and 65535")
        return value

    @field_validator("policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        if value == "redis-cluster":
            raise ValueError("'redis-cluster' is not supported: use 'redis' (one Redis "
                             "server shared by the gateways) or 'local'")
        if value not in POLICIES:
            raise ValueError(f"{value!r} is not supported: use 'local' (counters shared by "
                             "the workers of this host) or 'redis' (shared by the gateways "
                             "using one Redis server)")
        return value

    @model_validator(mode="after")
    def _redis_needs_a_host(self) -> StoreOptions:
        if self.policy == "redis" and self.redis_host is None:
            raise ValueError("redis_host: required when policy is redis")
        return self


class LimitOptions(StoreOptions):
    """Options every rate-limit plugin has."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    key_type: Literal["var", "var_combination", "constant"] = "var"
    """How `key` is read: `var`, one variable (`remote_addr`, `http_x_api_key`,
    `consumer_name`...); `var_combination`, variables in a string (`$remote_addr $http_x_user`);
    `constant`, one counter for all requests."""
    key: str = "remote_addr"
    """What requests are counted by (see `key_type`). A variable that is unset or empty
    counts by `remote_addr`, as in APISIX."""
    rejected_code: int = Field(503, json_schema_extra={"minimum": 200, "maximum": 599})
    """Status of a rejected request (APISIX's default is 503)."""
    rejected_msg: str | None = None
    """Body of a rejected request, as `{"error_msg": ...}`; without it the body is the
    gateway's usual error JSON for `rejected_code`."""

    @field_validator("rejected_code")
    @classmethod
    def _status(cls, value: int) -> int:
        if not 200 <= value <= 599:
            raise ValueError("must be between 200 and 599")
        return value

    @field_validator("rejected_msg", "key")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("must not be empty")
        return value


def redis_settings(conf: StoreOptions) -> RedisSettings:
    assert conf.redis_host is not None
    return RedisSettings(host=conf.redis_host, port=conf.redis_port,
                         username=conf.redis_username, password=conf.redis_password,
                         database=conf.redis_database, timeout=conf.redis_timeout / 1000.0,
                         ssl=conf.redis_ssl)


def store_for(conf: StoreOptions, conn_ttl: float = DEFAULT_CONN_TTL_SECONDS
              ) -> CounterStore:
    """The counter store of the configured policy. Building it does no I/O. `conn_ttl`:
    how long a limit-conn count outlives its last change in Redis."""
    if conf.policy == "redis":
        return RedisStore(redis_settings(conf), conn_ttl)
    return local_store()


class StoreFailure:
    """What a limit does with a request its store could not check (policy redis with
    Redis down): with `allow_degradation` the request passes, else it gets 503 with
    `{"error_msg": "failed to limit count"}` (or req, conn). Either way it is counted in
    `sluicegate_limit_store_errors_total{plugin, outcome}`; the store logs the outage
    itself, once, not per request."""

    __slots__ = ("allow", "metrics", "plugin", "response")

    def __init__(self, plugin: str, conf: StoreOptions, env: PluginEnv) -> None:
        self.plugin = plugin
        self.allow = conf.allow_degradation
        self.metrics = env.metrics
        body = json.dumps({"error_msg": f"failed to {plugin.replace('-', ' ')}"}).encode()
        self.response = Response(STORE_FAILURE_STATUS, body,
                                 [("Content-Type", "application/json")])

    def __call__(self) -> Response | None:
        if self.metrics is not None:
            self.metrics.record_limit_store_error(
                self.plugin, "allowed" if self.allow else "rejected")
        return None if self.allow else self.response


def rejection(conf: LimitOptions) -> Response:
    """The response to a rejected request. One instance per plugin: the data plane copies
    what it sends and never changes it."""
    if conf.rejected_msg is not None:
        body = json.dumps({"error_msg": conf.rejected_msg}).encode()
    else:
        body = error_body(conf.rejected_code, "")
    return Response(conf.rejected_code, body, [("Content-Type", "application/json")])
