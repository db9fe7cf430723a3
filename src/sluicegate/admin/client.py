"""A thin, blocking Admin API client for the `sluicegate admin` and `sluicegate config dump`
commands (urllib: a CLI call makes one request, no event loop needed)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sluicegate.admin.auth import KEY_ENV, KEY_HEADER

URL_ENV = "SLUICEGATE_ADMIN_URL"
DEFAULT_URL = "http://127.0.0.1:9180"
TIMEOUT = 30.0


class AdminCallError(Exception):
    """The request could not be made or answered (no connection, not JSON...)."""


@dataclass
class AdminReply:
    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def problems(self) -> list[str]:
        """What an error reply says, one line each: the message, then every field error."""
        if not isinstance(self.body, dict):
            return [f"HTTP {self.status}"]
        lines = [f"HTTP {self.status}: {self.body.get('error_msg', self.body)}"]
        lines += [f"  {line}" for line in self.body.get("errors", [])]
        return lines


def admin_url(given: str | None) -> str:
    return (given or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")


def admin_key(given: str | None) -> str | None:
    return given or os.environ.get(KEY_ENV) or None


def read_body(path: str) -> Any:
    """A resource body from a YAML or JSON file (JSON is YAML), `-` for stdin."""
    import sys

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise AdminCallError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise AdminCallError(f"{path}: not YAML or JSON: {exc}") from None


def call(url: str, key: str, method: str, path: str, body: Any = None) -> AdminReply:
    """One request to `url` + /apisix/admin/`path`; HTTP errors are replies, not raised."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}/apisix/admin/{path.lstrip('/')}", data=data,
                                     method=method)
    request.add_header(KEY_HEADER, key)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminCallError(f"cannot reach the Admin API at {url}: {reason}") from None
    try:
        return AdminReply(status, json.loads(raw) if raw else None)
    except ValueError:
        raise AdminCallError(f"{url}: HTTP {status}, and the reply is not JSON") from None
