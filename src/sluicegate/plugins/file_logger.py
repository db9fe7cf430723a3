"""file-logger: one JSON line per request in a local file."""

from __future__ import annotations

import json
import os

from pydantic import ConfigDict, Field, field_validator

from sluicegate.http.context import RequestContext
from sluicegate.observe.access_log import UtcClock, access_entry, writer_for
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
        self.clock = UtcClock()

    @classmethod
    def check(cls, conf: FileLoggerConfig) -> list[str]:
        folder = os.path.dirname(os.path.abspath(conf.path))
        if not os.path.isdir(folder):
            return [f"path: folder {folder!r} does not exist"]
        return []

    def log(self, ctx: RequestContext) -> None:
        self.writer.write((_encode(access_entry(ctx, self.clock)) + "\n").encode())
