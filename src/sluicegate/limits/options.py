"""Options the three rate-limit plugins share (APISIX names), their checks, and what they
build: the store of the policy, the key function, the rejection response."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field, field_validator

from sluicegate.limits.counters import CounterStore, local_store
from sluicegate.plugins.base import PluginConfig, Response
from sluicegate.proto.http1 import error_body

# Below this a delay is not worth a timer (APISIX sleeps only from 1 ms).
MIN_DELAY_SECONDS = 0.001
POLICIES = ("local",)


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


class LimitOptions(PluginConfig):
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
    policy: str = Field("local", json_schema_extra={"enum": list(POLICIES)})
    """Where counters live. `local`: this host, exact across the workers of the gateway.
    (`redis` is planned, for limits shared by several gateway hosts.)"""

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

    @field_validator("policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"{value!r} is not supported: only 'local' (counters shared by "
                             "the workers of this host) is built; 'redis' is planned")
        return value


def store_for(conf: LimitOptions) -> CounterStore:
    """The counter store of the configured policy (a Redis store will be chosen here)."""
    return local_store()


def rejection(conf: LimitOptions) -> Response:
    """The response to a rejected request. One instance per plugin: the data plane copies
    what it sends and never changes it."""
    if conf.rejected_msg is not None:
        body = json.dumps({"error_msg": conf.rejected_msg}).encode()
    else:
        body = error_body(conf.rejected_code, "")
    return Response(conf.rejected_code, body, [("Content-Type", "application/json")])
