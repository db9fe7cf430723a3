"""file-logger: one JSON line per request in a local file."""

from __future__ import annotations

import json
import os
import time

from pydantic import ConfigDict, Field, field_validator

from sluicegate.http.context import RequestContext
from sluicegate.observe.access_log import writer_for
from sluicegate.plugins.base import Plugin, PluginConfig, PluginEnv, register

# One encoder: json.dumps with non-default options builds a new encoder per call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


class FileLoggerConfig(PluginConfig):
    """file-logger options."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    path: str = Field(min_length=1)
    """File the lines are appended to (created if missing, mode 0640). Relative paths are
    relative to the gateway's working directory. Rotate it by moving it away: the gateway
    notices within half a second and starts a new file."""
    include_req_body: bool = False
    """Not supported: sluicegate does not buffer request bodies for logging. Accepted
    only as `false`, so APISIX configs load."""

    @field_validator("include_req_body")
    @classmethod
    def _no_request_body(cls, value: bool) -> bool:
        if value:
            raise ValueError("not supported: sluicegate does not log request bodies")
        return value


class _UtcClock:
    """ISO 8601 UTC timestamps with milliseconds; the date part is formatted once a second."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.prefix}.{int((now - second) * 1000):03d}Z"


@register
class FileLogger(Plugin):
    """Appends one JSON object per request to `path`, with the fields `time` (ISO 8601,
    UTC), `client_ip`, `method`, `uri` (path only: the query string can hold keys),
    `host`, `status`, `upstream_status` and `upstream_addr` (null when no upstream was
    contacted), `route_id`, `consumer`, `request_id`, `latency_ms`, `upstream_latency_ms`,
    `bytes_sent`, `bytes_received`, `user_agent`. No credentials are logged: no
    Authorization header, API key, cookie or query string. Lines are buffered for up to
    half a second."""

    name = "file-logger"
    priority = 399
    schema = FileLoggerConfig

    def __init__(self, conf: FileLoggerConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.writer = writer_for(conf.path)
        self.clock = _UtcClock()

    @classmethod
    def check(cls, conf: FileLoggerConfig) -> list[str]:
        folder = os.path.dirname(os.path.abspath(conf.path))
        if not os.path.isdir(folder):
            return [f"path: folder {folder!r} does not exist"]
        return []

    def log(self, ctx: RequestContext) -> None:
        latency = time.monotonic() - ctx.start_time
        upstream = ctx.upstream_status != 0
        route = ctx.route
        entry = {
            "time": self.clock.now(),
            "client_ip": ctx.remote_addr,
            "method": ctx.method,
            "uri": ctx.uri,
            "host": ctx.host,
            "status": ctx.response_status,
            "upstream_status": ctx.upstream_status if upstream else None,
            "upstream_addr": ctx.upstream_addr,
            "route_id": route.id if route is not None else None,
            "consumer": ctx.consumer_name,
            "request_id": ctx.request_id,
            "latency_ms": round(latency * 1000, 3),
            "upstream_latency_ms": round(ctx.upstream_latency * 1000, 3) if upstream else None,
            "bytes_sent": ctx.bytes_sent,
            "bytes_received": ctx.bytes_received,
            "user_agent": ctx.get_header("user-agent"),
        }
        if ctx.original_destination is not None:  # intercepted: where it was going, and how
            host, port = ctx.original_destination
            entry["original_destination"] = f"[{host}]:{port}" if ":" in host else \
                f"{host}:{port}"
            entry["intercept_mode"] = ctx.intercept_mode
        self.writer.write((_encode(entry) + "\n").encode())
