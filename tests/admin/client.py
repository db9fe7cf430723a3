"""A small Admin API client for the tests: requests as curl would send them, JSON back."""

from __future__ import annotations

import http.client
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from harness import Gateway

ADMIN_KEY = "test-admin-key-0123456789"
DEFAULT = object()  # "the client's own key" (None: send no key at all)


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


class AdminClient:
    """Requests to /apisix/admin on one gateway, with its key unless told otherwise."""

    def __init__(self, port: int, key: str | None = ADMIN_KEY) -> None:
        self.port = port
        self.key = key

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                key: Any = DEFAULT, headers: dict[str, str] | None = None) -> Reply:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = dict(headers or {})
        use_key = self.key if key is DEFAULT else key
        if use_key is not None:
            sent["X-API-KEY"] = use_key
        payload = raw if raw is not None else (
            json.dumps(body).encode() if body is not None else None)
        if payload is not None:
            sent.setdefault("Content-Type", "application/json")
        try:
            path = path if path.startswith("/") else f"/apisix/admin/{path}"
            connection.request(method, path, body=payload, headers=sent)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        try:
            parsed: Any = json.loads(data) if data else None
        except ValueError:
            parsed = data.decode(errors="replace")
        return Reply(response.status, parsed, {k.lower(): v for k, v in response.getheaders()})

    def get(self, path: str, **options: Any) -> Reply:
        return self.request("GET", path, **options)

    def put(self, path: str, body: Any, **options: Any) -> Reply:
        return self.request("PUT", path, body, **options)

    def post(self, path: str, body: Any, **options: Any) -> Reply:
        return self.request("POST", path, body, **options)

    def patch(self, path: str, body: Any, **options: Any) -> Reply:
        return self.request("PATCH", path, body, **options)

    def delete(self, path: str, **options: Any) -> Reply:
        return self.request("DELETE", path, **options)


def with_admin(config: dict[str, Any], **admin: Any) -> dict[str, Any]:
    """`config` with an admin section using the test key (unless given otherwise)."""
    settings = {"key": ADMIN_KEY, **dict(config.get("admin") or {}), **admin}
    return {**config, "admin": settings}


def admin_port(gateway: Gateway, timeout: float = 20.0) -> int:
    """The port the gateway's Admin API listens on, from its log line `Admin API on ...`
    (the harness asks for port 0: the kernel picks it, so parallel runs never collide)."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(r"Admin API on http://\S+?:(\d+)", gateway.log())
        if found:
            return int(found.group(1))
        if gateway.process.poll() is not None:
            raise RuntimeError(f"gateway exited with {gateway.process.returncode}:\n"
                               f"{gateway.log()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no Admin API in the gateway log:\n{gateway.log()}")
        time.sleep(0.05)
