"""TLS contexts of the L7 data plane, compiled with each config snapshot: server
certificates chosen by SNI (`CertificateSet`) and TLS to upstreams with `scheme: https`
(`UpstreamTls`). The HTTPS listeners that use them are in `sluicegate.http.https`.

Upstream connections with TLS are pooled under (host, port, TLS server name, settings
fingerprint), never under a plain `(host, port)` key, so a connection verified for one
name or one CA is not reused for a request that would have needed another.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sluicegate.config.tls import SslConfig, UpstreamTlsConfig, load_key_pair, read_pem

if TYPE_CHECKING:
    from sluicegate.config.model import GatewayConfig, UpstreamConfig
    from sluicegate.http.balancer import UpstreamNode
    from sluicegate.http.context import RequestContext

# The issue asks for TLS 1.2 and 1.3 only; RFC 8996 deprecates 1.0 and 1.1.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# HTTP/1.1 is what the pipeline speaks; advertising it lets clients skip guessing h2.
ALPN_PROTOCOLS = ["http/1.1"]
# Upstream client contexts kept for reuse across reloads (loading the system trust store
# costs milliseconds); keyed by a digest of the settings and PEM contents.
MAX_CACHED_CLIENT_CONTEXTS = 64


def harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = MINIMUM_VERSION
    # Client-initiated renegotiation (TLS 1.2) is a CPU-exhaustion lever with no use here.
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    return context


# -- server certificates (HTTPS listeners) ------------------------------------------------


def server_certificate_context(entry: SslConfig) -> ssl.SSLContext:
    context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    load_key_pair(context, entry.cert, entry.key)
    return context


class CertificateSet:
    """The certificates of one config snapshot, by server name.

    `select(name)`: the context whose snis has the exact name, else the longest wildcard
    suffix (`*.example.com` matches any name ending `.example.com`, at any depth, as APISIX),
    else the first enabled entry of `ssls`."""

    __slots__ = ("default", "exact", "wildcards")

    def __init__(self, entries: Iterable[SslConfig]) -> None:
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcards: dict[str, ssl.SSLContext] = {}  # ".example.com" -> context
        self.default: ssl.SSLContext | None = None
        for entry in entries:
            if not entry.status:
                continue
            context = server_certificate_context(entry)
            if self.default is None:
                self.default = context
            for name in entry.server_names:
                if name.startswith("*."):
                    self.wildcards.setdefault(name[1:], context)
                else:
                    self.exact.setdefault(name, context)

    def select(self, server_name: str | None) -> ssl.SSLContext | None:
        if server_name:
            name = server_name.lower().rstrip(".")
            context = self.exact.get(name)
            if context is not None:
                return context
            wildcards = self.wildcards
            if wildcards:
                # Suffixes from the longest: a.b.example.com tries .b.example.com first.
                dot = name.find(".")
                while dot != -1:
                    context = wildcards.get(name[dot:])
                    if context is not None:
                        return context
                    dot = name.find(".", dot + 1)
        return self.default


def compile_certificates(config: GatewayConfig) -> CertificateSet | None:
    """The snapshot's certificates; None when no enabled `ssls` entry exists."""
    if not any(entry.status for entry in config.ssls):
        return None
    return CertificateSet(config.ssls)


# -- TLS to upstreams ----------------------------------------------------------------------

# The system trust store is read when its context is first made: changes to it need a
# restart.
_client_contexts: dict[str, ssl.SSLContext] = {}


def client_context(tls: UpstreamTlsConfig) -> tuple[ssl.SSLContext, str]:
    """The client context for an upstream's tls settings and a fingerprint of those
    settings (part of the pool key)."""
    ca = read_pem(tls.ca_file) if tls.ca_file else b""
    cert = read_pem(tls.client_cert) if tls.client_cert else b""
    key = read_pem(tls.client_key) if tls.client_key else b""
    digest = hashlib.sha256()
    for part in (b"1" if tls.verify else b"0", ca, cert, key):
        digest.update(b"%d:" % len(part) + part)
    fingerprint = digest.hexdigest()[:16]
    context = _client_contexts.get(fingerprint)
    if context is not None:
        return context, fingerprint
    context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # verifies chain and name
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca:
        context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.client_cert and tls.client_key:
        load_key_pair(context, tls.client_cert, tls.client_key)
    if len(_client_contexts) >= MAX_CACHED_CLIENT_CONTEXTS:
        _client_contexts.clear()
    _client_contexts[fingerprint] = context
    return context, fingerprint


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


class UpstreamTls:
    """Runtime TLS settings of an https upstream (`Upstream.tls`)."""

    __slots__ = ("context", "fingerprint", "pass_host", "sni", "upstream_host")

    def __init__(self, conf: UpstreamConfig) -> None:
        tls = conf.tls or UpstreamTlsConfig()
        self.context, self.fingerprint = client_context(tls)
        self.sni = tls.sni
        self.pass_host = conf.pass_host
        self.upstream_host = conf.upstream_host

    def server_name(self, node: UpstreamNode, ctx: RequestContext) -> str:
        """The name sent as SNI and verified: `tls.sni`, else the Host the request goes
        upstream with (pass_host result or a plugin's upstream_host) without its port. An
        IP address is verified against the certificate's IP entries and sent as no SNI."""
        if self.sni:
            return self.sni
        if ctx.upstream_host:
            host = ctx.upstream_host
        elif self.pass_host == "pass":
            host = ctx.host
        elif self.pass_host == "node":
            host = node.host
        else:
            host = self.upstream_host or ""
        return _strip_port(host).lower() or node.host

    def pool_key(self, node: UpstreamNode, ctx: RequestContext) -> tuple[str, int, str, str]:
        return (node.host, node.port, self.server_name(node, ctx), self.fingerprint)

    def connect_options(self, server_name: str) -> dict[str, Any]:
        """`create_connection` arguments for a new connection (not per request). A name
        that cannot be a TLS server name (a client's Host like `a..b`) fails as a connect
        does, with an OSError, instead of escaping as a ValueError."""
        try:
            server_name.encode("idna")
        except UnicodeError:
            raise ssl.SSLError(f"{server_name!r} cannot be a TLS server name") from None
        return {"ssl": self.context, "server_hostname": server_name}


def compile_upstream_tls(conf: UpstreamConfig) -> UpstreamTls | None:
    return UpstreamTls(conf) if conf.scheme == "https" else None
