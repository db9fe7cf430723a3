"""Peer (d) of bench/http_proxy.sh: a minimal pooled aiohttp reverse proxy.

What "a reverse proxy written in an afternoon with aiohttp" looks like: one shared
ClientSession (keep-alive pool, up to 256 upstream connections), every path forwarded to
one upstream, hop-by-hop headers dropped both ways, bodies buffered (fine for the bench's
100-byte responses; not a streaming proxy), no access log.

Environment: LISTEN (host:port, default 127.0.0.1:18383), UPSTREAM (base URL,
default http://127.0.0.1:18380), UVLOOP (1 = use uvloop, the default; 0 = asyncio).
"""

from __future__ import annotations

import os

from aiohttp import ClientSession, TCPConnector, web
from multidict import CIMultiDict
from yarl import URL

LISTEN = os.environ.get("LISTEN", "127.0.0.1:18383")
UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:18380").rstrip("/")
# Hop-by-hop (RFC 9110 7.6.1) plus the headers aiohttp recomputes itself.
HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length",
))


def forwardable(headers) -> CIMultiDict:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


async def proxy(request: web.Request) -> web.Response:
    body = await request.read() if request.body_exists else None
    session: ClientSession = request.app["upstream"]
    async with session.request(request.method, URL(UPSTREAM + request.raw_path, encoded=True),
                               headers=forwardable(request.headers), data=body,
                               allow_redirects=False) as upstream:
        payload = await upstream.read()
        return web.Response(status=upstream.status, reason=upstream.reason, body=payload,
                            headers=forwardable(upstream.headers))


async def upstream_session(app: web.Application):
    app["upstream"] = ClientSession(
        connector=TCPConnector(limit=256, keepalive_timeout=75), auto_decompress=False)
    yield
    await app["upstream"].close()


def main() -> None:
    if os.environ.get("UVLOOP", "1") == "1":
        import uvloop

        uvloop.install()
    host, _, port = LISTEN.rpartition(":")
    app = web.Application()
    app.cleanup_ctx.append(upstream_session)
    app.router.add_route("*", "/{tail:.*}", proxy)
    web.run_app(app, host=host or "127.0.0.1", port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
