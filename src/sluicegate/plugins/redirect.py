"""redirect: answer with a redirect (http to https, a fixed or templated URI, or a regex
rewrite of the path) instead of proxying."""

from __future__ import annotations

import re
from urllib.parse import quote

from pydantic import ConfigDict, Field, model_validator

from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Plugin, PluginConfig, PluginEnv, Response, register
from sluicegate.plugins.proxy_rewrite import HeaderValue, VarTemplate, capture_template

DEFAULT_HTTPS_PORT = 443
# nginx's ngx_escape_uri(NGX_ESCAPE_URI), which APISIX's `encode_uri` uses: escapes space,
# `#`, `%`, `?`, control characters and non-ASCII; keeps other printable ASCII.
_URI_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "#%?")
# A header value cannot carry control characters, and the data plane writes latin-1: the
# Location always has these percent-encoded (UTF-8), whatever `encode_uri` says.
_NOT_WIRE_SAFE = re.compile(r"[\x00-\x20\x7f-\U0010ffff]")
# RFC 9110 §15.4: a 308 keeps the method and body; 301 lets clients turn POST into GET.
_SAFE_TO_REWRITE = frozenset({"GET", "HEAD"})


class RedirectConfig(PluginConfig):
    """Exactly one of `http_to_https`, `uri` or `regex_uri`. The redirect is answered by
    the gateway; the upstream is not called."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    http_to_https: bool | None = None
    """Redirect plain-HTTP requests to `https://` with the same host, path and query: 301
    for GET and HEAD, 308 for other methods (so the method and body are kept); requests
    that came over TLS pass. `ret_code` does not apply."""
    uri: HeaderValue | None = Field(None, min_length=2)
    """Redirect target, a path or an absolute URL; may use variables, e.g.
    `https://example.com$request_uri` or `/new/$arg_id` (unset ones are empty)."""
    regex_uri: list[str] | None = Field(None, min_length=2, max_length=2)
    """`[regex, template]`: when the regex (Python `re` syntax) is found in the request
    path, the target is the path with that match replaced by the template, where `$1`,
    `$2`... are its captures, e.g. `["^/old/(.*)", "/new/$1"]`. No match: no redirect,
    the request goes on."""
    ret_code: int = Field(302, ge=200, le=599)
    """Status of the redirect for `uri` and `regex_uri`."""
    encode_uri: bool = False
    """Percent-encode the target's path (before any `?`) as nginx does: space, `#`,
    `%`, `?`, control and non-ASCII characters. Variables such as `$uri` hold the decoded
    path, so set this when the target is built from them."""
    append_query_string: bool = False
    """Append the request's query string to the target (after `&` if the target already
    has a `?`). Not with `http_to_https`, which always keeps the query."""
    https_port: int = Field(DEFAULT_HTTPS_PORT, ge=1, le=65535)
    """Port of the `http_to_https` target; written into the URL unless it is 443."""

    @model_validator(mode="after")
    def _one_target(self) -> RedirectConfig:
        given = [name for name in ("http_to_https", "uri", "regex_uri")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of http_to_https, uri or regex_uri"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.http_to_https and self.append_query_string:
            raise ValueError("only one of http_to_https and append_query_string can be set")
        return self


def encode_path(path: str) -> str:
    """Percent-encode what nginx's NGX_ESCAPE_URI escapes (see `_URI_SAFE`)."""
    return quote(path, safe=_URI_SAFE)


def _wire_safe(location: str) -> str:
    return _NOT_WIRE_SAFE.sub(lambda match: quote(match.group(), safe=""), location)


@register
class Redirect(Plugin):
    """Answers with a redirect: `http_to_https`, a `uri` template, or `regex_uri`."""

    name = "redirect"
    priority = 900
    schema = RedirectConfig

    def __init__(self, conf: RedirectConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.http_to_https = bool(conf.http_to_https)
        self.port_suffix = "" if conf.https_port == DEFAULT_HTTPS_PORT else \
            f":{conf.https_port}"
        self.uri = VarTemplate(conf.uri) if conf.uri is not None else None
        self.regex: re.Pattern[str] | None = None
        self.template = ""
        if conf.regex_uri is not None:
            self.regex = re.compile(conf.regex_uri[0])
            self.template, _ = capture_template(conf.regex_uri[1])
        self.ret_code = conf.ret_code
        self.encode_uri = conf.encode_uri
        self.append_query_string = conf.append_query_string

    @classmethod
    def check(cls, conf: RedirectConfig) -> list[str]:
        if conf.regex_uri is None:
            return []
        try:
            regex = re.compile(conf.regex_uri[0])
        except re.error as exc:
            return [f"regex_uri[0]: invalid regex: {exc}"]
        _, highest = capture_template(conf.regex_uri[1])
        if highest > regex.groups:
            return [f"regex_uri[1]: refers to capture ${highest} but the regex has "
                    f"{regex.groups} group(s)"]
        return []

    def rewrite(self, ctx: RequestContext) -> Response | None:
        if self.http_to_https:
            return self._to_https(ctx)
        if self.uri is not None:
            target = self.uri.render(ctx)
        elif self.regex is not None:
            # subn, not search + expand: it reuses the parsed template (4.8 -> 1.7 µs a redirect).
            target, count = self.regex.subn(self.template, ctx.uri, 1)
            if not count:
                return None
        else:  # http_to_https: false
            return None
        if self.encode_uri:
            path, sep, query = target.partition("?")
            target = encode_path(path) + sep + query
        if self.append_query_string and ctx.query:
            target += ("&" if "?" in target else "?") + ctx.query
        return Response(self.ret_code, b"", [("Location", _wire_safe(target))])

    def _to_https(self, ctx: RequestContext) -> Response | None:
        # APISIX also trusts a client's X-Forwarded-Proto here; our data plane drops that
        # header from clients (it sets its own), so only the connection's scheme counts.
        if ctx.var("scheme") != "http":
            return None
        host = ctx.host or (f"[{ctx.server_addr}]" if ":" in ctx.server_addr
                            else ctx.server_addr)
        # The path arrives decoded; encoding it again gives the client's target back.
        target = f"https://{host}{self.port_suffix}{encode_path(ctx.uri)}"
        if ctx.query:
            target += f"?{ctx.query}"
        status = 301 if ctx.method in _SAFE_TO_REWRITE else 308
        return Response(status, b"", [("Location", _wire_safe(target))])
