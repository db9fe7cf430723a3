"""cors: answer CORS preflights at the gateway and add CORS headers to responses.

Follows APISIX's cors plugin: the same options, defaults and `*` / `**` meanings, with the
choices the Fetch standard (https://fetch.spec.whatwg.org/#http-cors-protocol) leaves to a
server made explicit in the option docs below.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field

from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Plugin, PluginConfig, PluginEnv, Response, register
from sluicegate.plugins.proxy_rewrite import HeaderValue

# APISIX's pattern: `*`, `**`, `null`, or comma-separated `scheme://host[:port]` origins.
ORIGINS_PATTERN = r"^(\*|\*\*|null|\w+://[^,]+(,\w+://[^,]+)*)$"
# What `allow_methods: "**"` expands to (APISIX).
ALL_METHODS = "GET,POST,PUT,DELETE,PATCH,HEAD,OPTIONS,CONNECT,TRACE"
_WILDCARD_FIELDS = ("allow_origins", "allow_methods", "allow_headers", "expose_headers")
_ORIGINS = re.compile(ORIGINS_PATTERN)


def _origins(value: str) -> str:
    if not _ORIGINS.match(value):
        raise ValueError("expected '*', '**', 'null' or comma-separated scheme://host[:port] "
                         f"origins, got {value!r}")
    return value


Origins = Annotated[HeaderValue, AfterValidator(_origins)]


class CorsConfig(PluginConfig):
    """Which cross-origin requests browsers may make. `*` allows any value but cannot be
    used with `allow_credential` (browsers ignore a `*` on credentialed requests); `**`
    allows any value even then (it echoes the request's origin or headers), which lets any
    site make credentialed requests: use with care."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    allow_origins: Origins = Field("*", json_schema_extra={"pattern": ORIGINS_PATTERN})
    """Origins allowed, comma-separated `scheme://host[:port]` (e.g.
    `https://a.example,https://b.example:8443`), matched exactly; `*` for any origin
    (sent as `*`), `**` for any origin (the request's origin is echoed back). Ignored when
    `allow_origins_by_regex` is set."""
    allow_methods: HeaderValue = Field("*", min_length=1)
    """Methods allowed, comma-separated (e.g. `GET,POST`); `*` for any, `**` for
    `GET,POST,PUT,DELETE,PATCH,HEAD,OPTIONS,CONNECT,TRACE`."""
    allow_headers: HeaderValue = Field("*", min_length=1)
    """Request headers allowed, comma-separated; `*` for any, `**` to echo the
    preflight's `Access-Control-Request-Headers`."""
    expose_headers: HeaderValue | None = None
    """Response headers the browser may show to scripts, comma-separated; `*` for any.
    When unset, no `Access-Control-Expose-Headers` is sent."""
    max_age: int = Field(5, ge=-1)
    """Seconds a browser may cache a preflight's answer; -1 disables caching."""
    allow_credential: bool = False
    """Allow requests with credentials (cookies, HTTP authentication): sends
    `Access-Control-Allow-Credentials: true`. The other options may then not be `*`."""
    allow_origins_by_regex: list[str] | None = Field(None, min_length=1)
    """Regexes (Python `re` syntax) an origin must match as a whole, e.g.
    `https://.*\\.example\\.com` for every subdomain of example.com. When set, only these
    decide and `allow_origins` is ignored (APISIX). Unlike APISIX, which searches, a
    pattern must match the whole origin, so that one does not allow
    `https://a.example.com.evil.net`."""


def _compile_regexes(patterns: list[str]) -> tuple[list[re.Pattern[str]], list[str]]:
    compiled, reasons = [], []
    for index, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            reasons.append(f"allow_origins_by_regex[{index}]: invalid regex: {exc}")
    return compiled, reasons


# Per-request state in ctx.vars: the Origin as the client sent it (a later plugin, e.g.
# proxy-rewrite, may change the header sent upstream).
_ORIGIN_KEY = "cors.origin"
_UNSET = object()


@register
class Cors(Plugin):
    """Answers preflight requests (OPTIONS with `Origin` and
    `Access-Control-Request-Method`) itself with 200, without calling the upstream, and
    adds CORS headers to responses for allowed origins (the upstream's and the gateway's
    own, e.g. a 401 from an auth plugin). A disallowed origin gets no CORS headers."""

    name = "cors"
    priority = 4000
    schema = CorsConfig

    def __init__(self, conf: CorsConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.regexes: list[re.Pattern[str]] | None = None
        if conf.allow_origins_by_regex is not None:
            self.regexes, _ = _compile_regexes(conf.allow_origins_by_regex)
        self.any_origin = self.regexes is None and conf.allow_origins == "*"
        self.echo_origin = self.regexes is None and conf.allow_origins == "**"
        self.origins = frozenset(part.strip() for part in conf.allow_origins.split(","))
        # Unless every origin gets the same `*`, the answer depends on Origin and shared
        # caches must key on it (Fetch standard, "CORS protocol and HTTP caches").
        self.varies = not self.any_origin
        self.echo_request_headers = conf.allow_headers == "**"
        headers = [
            ("Access-Control-Allow-Methods",
             ALL_METHODS if conf.allow_methods == "**" else conf.allow_methods),
            ("Access-Control-Max-Age", str(conf.max_age)),
        ]
        if not self.echo_request_headers:
            headers.append(("Access-Control-Allow-Headers", conf.allow_headers))
        if conf.expose_headers is not None:
            headers.append(("Access-Control-Expose-Headers", conf.expose_headers))
        if conf.allow_credential:
            headers.append(("Access-Control-Allow-Credentials", "true"))
        self.fixed_headers = headers
        self.replaced = frozenset({"access-control-allow-origin",
                                   "access-control-allow-headers",
                                   *(name.lower() for name, _ in headers)})

    @classmethod
    def check(cls, conf: CorsConfig) -> list[str]:
        reasons = []
        if conf.allow_credential:
            for field in _WILDCARD_FIELDS:
                if getattr(conf, field) == "*":
                    reasons.append(f"{field}: '*' is not allowed when allow_credential is "
                                   "true; list the values (or use '**' to allow any)")
        if conf.allow_origins_by_regex is not None:
            reasons += _compile_regexes(conf.allow_origins_by_regex)[1]
        return reasons

    def allowed_origin(self, origin: str | None) -> str | None:
        """The `Access-Control-Allow-Origin` value for a request's Origin, or None when
        the origin is not allowed."""
        if self.regexes is not None:
            if origin is not None and any(regex.fullmatch(origin) for regex in self.regexes):
                return origin
            return None
        if self.any_origin:
            return "*"
        if self.echo_origin:
            return origin or "*"
        return origin if origin in self.origins else None

    def rewrite(self, ctx: RequestContext) -> Response | None:
        origin = ctx.get_header("Origin")
        if ctx.vars is None:
            ctx.vars = {}
        ctx.vars[_ORIGIN_KEY] = origin
        if (ctx.method == "OPTIONS" and origin is not None
                and ctx.get_header("Access-Control-Request-Method") is not None):
            return Response(200)  # header_filter adds the CORS headers
        return None

    def header_filter(self, ctx: RequestContext) -> None:
        origin: Any = ctx.vars.get(_ORIGIN_KEY, _UNSET) if ctx.vars else _UNSET
        if origin is _UNSET:  # answered before this plugin's rewrite ran
            origin = ctx.get_header("Origin")
        if self.varies:
            _add_vary_origin(ctx)
        allowed = self.allowed_origin(origin)
        if allowed is None:
            return
        added = [("Access-Control-Allow-Origin", allowed), *self.fixed_headers]
        if self.echo_request_headers:
            requested = ctx.get_header("Access-Control-Request-Headers")
            if requested is not None:
                added.append(("Access-Control-Allow-Headers", requested))
        replaced = self.replaced
        ctx.response_headers = [header for header in ctx.response_headers
                                if header[0].lower() not in replaced]
        ctx.response_headers += added


def _add_vary_origin(ctx: RequestContext) -> None:
    headers = ctx.response_headers
    first = None
    for index, (name, value) in enumerate(headers):
        if name.lower() == "vary":
            tokens = {token.strip().lower() for token in value.split(",")}
            if "origin" in tokens or "*" in tokens:
                return
            if first is None:
                first = index
    if first is None:
        headers.append(("Vary", "Origin"))
    else:
        name, value = headers[first]
        headers[first] = (name, f"{value}, Origin" if value.strip() else "Origin")
