"""The request context: what plugins, the router and balancers see of one request.

Headers arrive as raw (name, value) byte pairs; the str dict plugins read is built only when
a plugin asks for it (PERF.md: building it costs ~2 µs a request).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, unquote_plus

if TYPE_CHECKING:
    from sluicegate.http.snapshot import CompiledRoute


class RequestContext:
    """One HTTP exchange as plugins see it. Attributes are plain; helpers below are lazy."""

    __slots__ = (
        "_args", "_cookies", "_headers", "added_headers", "added_names", "added_raw",
        "bytes_received", "bytes_sent", "consumer",
        "consumer_name", "headers_dirty", "host", "intercept_mode", "keep_alive", "method",
        "original_destination", "query", "raw_headers", "remote_addr", "remote_port",
        "request_id", "response_headers", "response_status", "route", "server_addr",
        "server_port", "start_time", "upgrade", "upstream_addr", "upstream_host",
        "upstream_latency", "upstream_status", "uri", "uri_dirty", "vars", "version",
    )
    # A class attribute, not a slot: HttpsRequestContext (http/https.py) says "https".
    scheme = "http"

    def __init__(self, method: str, uri: str, query: str, raw_headers: list[tuple[bytes, bytes]],
                 host: str, remote: tuple[str, int], server: tuple[str, int],
                 version: str) -> None:
        self.method = method
        self.uri = uri
        self.query = query
        self.raw_headers = raw_headers
        self.host = host
        self.remote_addr, self.remote_port = remote[0], remote[1]
        self.server_addr, self.server_port = server[0], server[1]
        self.version = version
        self.start_time = time.monotonic()
        self._headers: dict[str, str] | None = None
        self._args: dict[str, str] | None = None
        self._cookies: dict[str, str] | None = None
        self.headers_dirty = False
        self.uri_dirty = False
        self.route: CompiledRoute | None = None
        self.consumer: Any = None
        self.consumer_name: str | None = None
        self.original_destination: tuple[str, int] | None = None
        self.intercept_mode: str | None = None
        self.upstream_addr: str | None = None
        self.upstream_host: str | None = None
        self.upstream_status = 0
        self.upstream_latency = 0.0
        self.response_status = 0
        self.response_headers: list[tuple[str, str]] = []
        # Response headers a plugin knows before the response exists (set, replacing any
        # of the same name): applied without a header_filter, which would make every
        # response decode and re-encode its header list (~4 µs/req, bench plugin cost).
        self.added_headers: list[tuple[str, str]] | None = None
        self.added_names: frozenset[bytes] | None = None  # lower-case, for the raw path
        self.added_raw: bytes | None = None  # added_headers encoded, when a plugin gave it
        self.bytes_received = 0
        self.bytes_sent = 0
        self.request_id: str | None = None
        self.keep_alive = True
        self.upgrade = False
        self.vars: dict[str, Any] | None = None

    # -- request headers -------------------------------------------------------------
    @property
    def headers(self) -> dict[str, str]:
        """Request headers by lower-case name (repeated headers joined with ', ')."""
        if self._headers is None:
            headers: dict[str, str] = {}
            for name, value in self.raw_headers:
                key = name.decode("latin-1").lower()
                text = value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
            self._headers = headers
        return self._headers

    def get_header(self, name: str) -> str | None:
        """One request header (repeats joined with ', '); scans the raw pairs unless the
        dict is built already, which is cheaper for the one or two lookups auth plugins do."""
        if self._headers is not None:
            return self._headers.get(name.lower())
        wanted = name.lower().encode("latin-1")
        found: str | None = None
        for key, value in self.raw_headers:
            if len(key) == len(wanted) and key.lower() == wanted:
                text = value.decode("latin-1")
                found = text if found is None else f"{found}, {text}"
        return found

    def add_header(self, name: str, value: str) -> None:
        """Append a request header, keeping others of the same name."""
        headers = self.headers
        self.raw_headers.append((name.encode("latin-1"), value.encode("latin-1")))
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.headers_dirty = True

    def set_header(self, name: str, value: str) -> None:
        """Set (replace) a request header forwarded to the upstream."""
        self.remove_header(name)
        self.raw_headers.append((name.encode("latin-1"), value.encode("latin-1")))
        self.headers[name.lower()] = value

    def remove_header(self, name: str) -> None:
        lower = name.lower().encode("latin-1")
        self.raw_headers[:] = [(n, v) for n, v in self.raw_headers if n.lower() != lower]
        self.headers.pop(name.lower(), None)
        self.headers_dirty = True

    def set_uri(self, uri: str, query: str | None = None) -> None:
        """Rewrite the path (and optionally the query) sent upstream."""
        self.uri = uri
        if query is not None:
            self.query = query
            self._args = None
        self.uri_dirty = True

    def remove_arg(self, name: str) -> None:
        """Drop every `name=...` from the query sent upstream; the other arguments keep
        their encoding (auth plugins hiding a credential)."""
        kept = [part for part in self.query.split("&")
                if part and unquote_plus(part.partition("=")[0]) != name]
        self.set_uri(self.uri, "&".join(kept))

    # -- response headers (header_filter) -----------------------------------------------
    def get_response_header(self, name: str) -> str | None:
        lower = name.lower()
        for key, value in self.response_headers:
            if key.lower() == lower:
                return value
        return None

    def add_response_headers(self, headers: tuple[tuple[str, str], ...],
                             raw: bytes | None = None,
                             names: frozenset[bytes] | None = None) -> None:
        """Set these headers on whatever response this request gets (upstream's or a
        plugin's), replacing headers of the same names. A plugin may pass them already
        encoded (`raw`, with their lower-case `names`) for the raw response path."""
        if self.added_headers is None:
            self.added_headers = list(headers)
            self.added_raw, self.added_names = raw, names
        else:
            self.added_headers += headers
            self.added_raw = self.added_names = None  # re-derived when needed

    def merge_added_headers(self) -> None:
        """Fold `added_headers` into `response_headers` (for paths that build the list)."""
        added = self.added_headers
        if added:
            names = {name.lower() for name, _ in added}
            self.response_headers = [h for h in self.response_headers
                                     if h[0].lower() not in names] + added

    def set_response_header(self, name: str, value: str | None) -> None:
        lower = name.lower()
        self.response_headers = [(k, v) for k, v in self.response_headers if k.lower() != lower]
        if value is not None:
            self.response_headers.append((name, value))

    # -- APISIX variables --------------------------------------------------------------
    @property
    def args(self) -> dict[str, str]:
        if self._args is None:
            self._args = dict(parse_qsl(self.query, keep_blank_values=True))
        return self._args

    @property
    def cookies(self) -> dict[str, str]:
        if self._cookies is None:
            cookies: dict[str, str] = {}
            for part in self.headers.get("cookie", "").split(";"):
                name, sep, value = part.strip().partition("=")
                if sep:
                    cookies.setdefault(name, unquote(value))
            self._cookies = cookies
        return self._cookies

    def var(self, name: str) -> str | None:
        """An APISIX/nginx variable: `uri`, `host`, `arg_x`, `http_x_y`, `cookie_x`..."""
        if name.startswith("http_"):
            return self.headers.get(name[5:].replace("_", "-"))
        if name.startswith("arg_"):
            return self.args.get(name[4:])
        if name.startswith("cookie_"):
            return self.cookies.get(name[7:])
        getter = _VARS.get(name)
        return getter(self) if getter else None

    @property
    def request_uri(self) -> str:
        return f"{self.uri}?{self.query}" if self.query else self.uri


def _route_id(ctx: RequestContext) -> str | None:
    return ctx.route.id if ctx.route else None


def _service_id(ctx: RequestContext) -> str | None:
    return ctx.route.service_id if ctx.route else None


_VARS = {
    "uri": lambda c: c.uri,
    "request_uri": lambda c: c.request_uri,
    "args": lambda c: c.query,
    "query_string": lambda c: c.query,
    "host": lambda c: c.host,
    "request_method": lambda c: c.method,
    "remote_addr": lambda c: c.remote_addr,
    "remote_port": lambda c: str(c.remote_port),
    "server_addr": lambda c: c.server_addr,
    "server_port": lambda c: str(c.server_port),
    "scheme": lambda c: c.scheme,
    "server_protocol": lambda c: f"HTTP/{c.version}",
    "consumer_name": lambda c: c.consumer_name,
    "route_id": _route_id,
    "service_id": _service_id,
    "upstream_addr": lambda c: c.upstream_addr,
    "status": lambda c: str(c.response_status),
    "request_id": lambda c: c.request_id,
    # Where an intercepted connection was going (None for explicit traffic).
    "original_dst_addr": lambda c: c.original_destination[0] if c.original_destination else None,
    "original_dst_port": lambda c: (str(c.original_destination[1]) if c.original_destination
                                    else None),
}
