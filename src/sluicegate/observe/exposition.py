"""The `/metrics` endpoint (Prometheus text format 0.0.4).

Served by the worker itself with one worker, or by the supervisor with several: it asks every
worker for its counters at scrape time and reports the sum.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from sluicegate.observe.metrics import SnapshotCollector

log = logging.getLogger("sluicegate.metrics")

SnapshotSource = Callable[[], Awaitable[dict[str, Any]]]
# GET /v1/healthcheck...: path -> (HTTP status, JSON-able body); see http/health.py.
HealthcheckSource = Callable[[str], Awaitable[tuple[int, Any]]]
# A scrape request head larger than this is not a scraper.
MAX_SCRAPE_HEAD = 16 * 1024


def render(snapshot: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot))
    return generate_latest(registry)


async def serve_metrics(host: str, port: int, source: SnapshotSource,
                        healthcheck: HealthcheckSource | None = None) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            request_line = head.split(b"\r\n", 1)[0].split()
            if len(head) > MAX_SCRAPE_HEAD or len(request_line) < 2:
                status, body, ctype = b"400 Bad Request", b"bad request\n", b"text/plain"
            elif request_line[1].split(b"?")[0] == b"/metrics" and request_line[0] in (
                    b"GET", b"HEAD"):
                status, ctype = b"200 OK", CONTENT_TYPE_LATEST.encode()
                body = render(await source())
                if request_line[0] == b"HEAD":
                    body = b""
            elif healthcheck is not None and request_line[0] == b"GET" and \
                    request_line[1].startswith(b"/v1/healthcheck"):
                code, payload = await healthcheck(
                    request_line[1].split(b"?")[0].decode("latin-1"))
                status = b"200 OK" if code == 200 else b"404 Not Found"
                body, ctype = json.dumps(payload).encode(), b"application/json"
            else:
                status, body, ctype = b"404 Not Found", b"try /metrics\n", b"text/plain"
            writer.write(b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (status, ctype, len(body), body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        except Exception:
            log.exception("metrics scrape failed")
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_address=True)
