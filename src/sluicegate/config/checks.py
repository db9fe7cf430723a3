"""Upstream health checks (`upstream.checks`): APISIX's field names, shapes and defaults.

APISIX takes these from lua-resty-healthcheck. Differences, all of them widenings:
`interval` accepts fractions of a second (APISIX: whole seconds). As in APISIX, passive
checks need active ones: a node that passive checks eject gets no traffic, so only an
active probe can bring it back.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# lua-resty-healthcheck caps every counter threshold at 254 (one byte per counter).
MAX_THRESHOLD = 254
# A probe more often than this is load, not a check.
MIN_INTERVAL_SECONDS = 0.1

HttpStatus = Annotated[int, Field(ge=200, le=599)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


def _unique(value: list[int]) -> list[int]:
    if len(set(value)) != len(value):
        raise ValueError("status codes must be unique")
    return value


class ActiveHealthy(_Strict):
    """When a node that is down counts as healthy again (active probes)."""

    interval: float = Field(1.0, ge=MIN_INTERVAL_SECONDS, le=86_400)
    """Seconds between probes of a node that is up."""
    http_statuses: list[HttpStatus] = Field(default_factory=lambda: [200, 302], min_length=1)
    """Probe answers that count as a success."""
    successes: int = Field(2, ge=1, le=MAX_THRESHOLD)
    """Successes in a row that bring a node that is down back."""

    _statuses = field_validator("http_statuses")(_unique)


class ActiveUnhealthy(_Strict):
    """When a node that is up counts as down (active probes)."""

    interval: float = Field(1.0, ge=MIN_INTERVAL_SECONDS, le=86_400)
    """Seconds between probes of a node that is down."""
    http_statuses: list[HttpStatus] = Field(
        default_factory=lambda: [429, 404, 500, 501, 502, 503, 504, 505], min_length=1)
    """Probe answers that count as an HTTP failure."""
    http_failures: int = Field(5, ge=1, le=MAX_THRESHOLD)
    tcp_failures: int = Field(2, ge=1, le=MAX_THRESHOLD)
    timeouts: int = Field(3, ge=1, le=MAX_THRESHOLD)


class ActiveCheck(_Strict):
    """Probes sent by the gateway itself, per worker, on a timer."""

    type: Literal["http", "https", "tcp"] = "http"
    """`http`: GET `http_path` and judge the status; `https`: the same over TLS (a failed
    handshake or certificate check is a TCP failure); `tcp`: a connect is a success."""
    timeout: float = Field(1.0, gt=0, le=3600)
    """Seconds a whole probe (connect, request, status line) may take."""
    concurrency: int = Field(10, ge=1, le=1000)
    """Probes of one upstream in flight at once."""
    http_path: str = Field("/", min_length=1, max_length=4096)
    host: str | None = Field(None, min_length=1, max_length=253)
    """Host header of HTTP(S) probes (default: as the upstream's `pass_host` would send);
    for https probes also the TLS server name sent and verified (default: the upstream's
    `tls.sni`, else `upstream_host` under pass_host rewrite, else the node's host)."""
    port: int | None = Field(None, ge=1, le=65535)
    """Probe this port instead of each node's own."""
    https_verify_certificate: bool = True
    """https probes: verify the node's certificate chain (against the upstream's
    `tls.ca_file`, else the system trust store) and name. False: any certificate passes."""
    req_headers: list[str] | None = Field(None, min_length=1)
    """Extra request headers of HTTP probes, as `Name: value` lines."""
    healthy: ActiveHealthy = Field(default_factory=ActiveHealthy)
    unhealthy: ActiveUnhealthy = Field(default_factory=ActiveUnhealthy)

    @field_validator("http_path")
    @classmethod
    def _path_shape(cls, value: str) -> str:
        if not value.startswith("/") or any(c in value for c in " \r\n\t"):
            raise ValueError(f"{value!r}: must start with '/' and contain no whitespace")
        return value

    @field_validator("req_headers")
    @classmethod
    def _header_lines(cls, value: list[str] | None) -> list[str] | None:
        for line in value or []:
            name, colon, _ = line.partition(":")
            if not colon or not name.strip() or any(c in line for c in "\r\n\0") or \
                    name != name.strip() or " " in name:
                raise ValueError(f"{line!r}: expected 'Name: value' on one line")
        if value is not None and len(set(value)) != len(value):
            raise ValueError("headers must be unique")
        return value


class PassiveHealthy(_Strict):
    """Responses of real traffic that count as a success."""

    http_statuses: list[HttpStatus] = Field(
        default_factory=lambda: [200, 201, 202, 203, 204, 205, 206, 207, 208, 226,
                                 300, 301, 302, 303, 304, 305, 306, 307, 308], min_length=1)
    successes: int = Field(5, ge=0, le=MAX_THRESHOLD)
    """Successes in a row that bring a node that is down back (0: never by traffic)."""

    _statuses = field_validator("http_statuses")(_unique)


class PassiveUnhealthy(_Strict):
    """Outcomes of real traffic that count as failures; a threshold of 0 turns that kind of
    failure off."""

    http_statuses: list[HttpStatus] = Field(default_factory=lambda: [429, 500, 503],
                                            min_length=1)
    http_failures: int = Field(5, ge=0, le=MAX_THRESHOLD)
    tcp_failures: int = Field(2, ge=0, le=MAX_THRESHOLD)
    """Connects refused or connections lost before a response head."""
    timeouts: int = Field(7, ge=0, le=MAX_THRESHOLD)
    """Connect, send or read timeouts before a response head."""

    _statuses = field_validator("http_statuses")(_unique)


class PassiveCheck(_Strict):
    """Judges nodes by the requests the gateway proxies to them."""

    type: Literal["http", "https", "tcp"] = "http"
    healthy: PassiveHealthy = Field(default_factory=PassiveHealthy)
    unhealthy: PassiveUnhealthy = Field(default_factory=PassiveUnhealthy)


class HealthChecks(_Strict):
    """`upstream.checks`: nodes found unhealthy leave the balancer until healthy again; when
    every node is unhealthy the gateway proxies anyway (APISIX) and counts it in
    `sluicegate_upstream_all_unhealthy_total`."""

    active: ActiveCheck | None = None
    passive: PassiveCheck | None = None

    @model_validator(mode="after")
    def _active_required(self) -> HealthChecks:
        if self.active is None:
            raise ValueError("needs 'active' (alone or with 'passive'): a node that "
                             "passive checks eject gets no traffic, so only active probes "
                             "can bring it back")
        return self
