"""The HTTP client that calls providers: one aiohttp session per worker process (its
connection pool keeps provider connections alive across requests), the only I/O of the AI
gateway outside the data plane. Errors are described without URLs or headers, which can
carry API keys."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from sluicegate.ai.adapter import ProviderRequest

# Keep-alive of idle provider connections, seconds (aiohttp's default is 15; providers
# such as OpenAI keep theirs open longer, and a TLS handshake costs a round trip or two).
KEEPALIVE_SECONDS = 60.0

_session: aiohttp.ClientSession | None = None
_session_loop: asyncio.AbstractEventLoop | None = None


def session() -> aiohttp.ClientSession:
    """The worker's session, made on first use on the running loop."""
    global _session, _session_loop
    loop = asyncio.get_running_loop()
    if _session is None or _session.closed or _session_loop is not loop:
        # limit=0: concurrency is bounded by the clients' connections, and a long stream
        # must not make other requests queue for a pooled connection.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS,
                                         ttl_dns_cache=300)
        _session = aiohttp.ClientSession(connector=connector, json_serialize=json.dumps,
                                         headers={"User-Agent": "sluicegate"},
                                         timeout=aiohttp.ClientTimeout(total=None))
        _session_loop = loop
    return _session


async def close() -> None:
    global _session
    if _session is not None and not _session.closed:
        await _session.close()
    _session = None


def send(request: ProviderRequest, timeout: aiohttp.ClientTimeout, ssl_verify: bool
         ) -> Any:
    """The request as an aiohttp context manager (`async with send(...) as response`)."""
    data = None
    if request.body is not None:
        data = json.dumps(request.body, separators=(",", ":"), ensure_ascii=False).encode()
    return session().request(request.method, request.url, headers=request.headers,
                             data=data, timeout=timeout,
                             ssl=ssl_verify)


def describe_failure(exc: BaseException) -> tuple[int, str, str]:
    """(status for the client, error type label, safe message) for a failed call."""
    if isinstance(exc, asyncio.TimeoutError):
        return 504, "timeout", "the provider did not answer in time"
    if isinstance(exc, aiohttp.ClientConnectorError):
        # str() names host:port and the OS error, never the path or query
        return 502, "connect", f"cannot connect to the provider ({exc.host}:{exc.port}: " \
            f"{exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return 502, "stream", "the provider's answer was cut short"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return 502, "connect", "the provider closed the connection"
    return 502, "connect", f"provider request failed ({type(exc).__name__})"
