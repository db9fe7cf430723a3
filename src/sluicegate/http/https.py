"""HTTPS listeners: the same HTTP/1.1 pipeline as plain HTTP over TLS 1.2/1.3.

uvloop decrypts and `ClientConnection` parses; what differs is a few class attributes
(`HttpsClientConnection`, `HttpsRequestContext`), so a plain listener does no TLS work at
all, per request or per connection.

Certificates come from the config snapshot: a listener's `SSLContext` is made once, at
start, and its SNI callback (run for every handshake, with or without SNI) moves the
connection to the context chosen from the *current* snapshot (`Snapshot.certificates`, see
`sluicegate.http.tls.CertificateSet`). A reload therefore changes certificates without
touching the listening sockets; only new handshakes see the change. Adding or removing
HTTPS listeners needs a restart, as for `gateway.listen`.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from sluicegate.config.model import parse_listen
from sluicegate.config.tls import https_listen_addresses
from sluicegate.http.context import RequestContext
from sluicegate.http.server import ClientConnection, HttpServer
from sluicegate.http.tls import harden

if TYPE_CHECKING:
    from sluicegate.config.model import GatewayConfig


class HttpsRequestContext(RequestContext):
    """A request that arrived over TLS: `ctx.scheme` and `var("scheme")` are "https"."""

    __slots__ = ()
    scheme = "https"


class HttpsClientConnection(ClientConnection):
    """A client connection on an HTTPS listener: the same HTTP/1.1 pipeline; requests get
    X-Forwarded-Proto: https and the https scheme.

    Closing after an error: TLS has no half-close, so `linger`'s write_eof fails and the
    connection closes; uvloop's TLS shutdown then reads and drops what the client still
    sends until the client's close_notify (or ssl_shutdown_timeout), which is the drain a
    lingering close is for."""

    __slots__ = ()
    scheme = "https"
    forwarded_proto = b"https"
    context_class = HttpsRequestContext


def listener_context(server: HttpServer) -> ssl.SSLContext:
    """The context the HTTPS listeners of `server` are created with. It holds no
    certificate: its SNI callback picks one from the server's current snapshot."""
    # The version floor and options apply from this context: OpenSSL copies them into the
    # connection before the callback switches the certificate's context in.
    context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))

    def choose(ssl_object: Any, server_name: str | None, _: ssl.SSLContext) -> int | None:
        certificates = server.snapshot.certificates
        chosen = certificates.select(server_name) if certificates is not None else None
        if chosen is None:  # every certificate was removed by a reload
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        ssl_object.context = chosen
        return None

    context.sni_callback = choose
    return context


async def listen_https(server: HttpServer, config: GatewayConfig, reuse_port: bool) -> None:
    """Open the HTTPS listeners of `config` (see `https_listen_addresses`)."""
    addresses = https_listen_addresses(config)
    if not addresses:
        return
    context = listener_context(server)
    for address in addresses:
        host, port = parse_listen(address)
        await server.listen(host, port, reuse_port, ssl_context=context,
                            connection_class=HttpsClientConnection)
