"""proxy-rewrite: change the method, path, Host and headers of the request sent upstream."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Plugin, PluginConfig, PluginEnv, register

# RFC 9110 section 5.6.2: a field name is a token.
HEADER_NAME_PATTERN = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$"
HeaderName = Annotated[str, Field(pattern=HEADER_NAME_PATTERN, max_length=256)]

METHODS = ("GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "MKCOL", "COPY", "MOVE",
           "PROPFIND", "LOCK", "UNLOCK", "PATCH", "TRACE")

# `$name`, `${name}`; `$1`, `${1}` are regex captures. `$$` is a literal dollar.
_REFERENCE = re.compile(r"\$\$|\$\{(\w+)\}|\$(\w+)")
_LITERAL, _GROUP, _VAR = 0, 1, 2


def check_header_value(value: str) -> str:
    """Header values go on the wire as latin-1 and may not break the header block."""
    if any(char in value for char in "\r\n\x00"):
        raise ValueError("header values may not contain CR, LF or NUL")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("header values must be latin-1 text") from None
    return value


HeaderValue = Annotated[str, AfterValidator(check_header_value)]


class VarTemplate:
    """A string with APISIX variables (`$remote_addr`, `${http_x_id}`) and regex captures
    (`$1`), parsed once; `render` is a join over precomputed parts. Unknown or unset
    variables render as the empty string, as in APISIX."""

    __slots__ = ("constant", "max_group", "parts")

    def __init__(self, text: str) -> None:
        parts: list[tuple[int, Any]] = []
        position = 0
        self.max_group = 0
        for match in _REFERENCE.finditer(text):
            if match.start() > position:
                parts.append((_LITERAL, text[position:match.start()]))
            name = match.group(1) or match.group(2)
            if name is None:
                parts.append((_LITERAL, "$"))
            elif name.isdigit():
                parts.append((_GROUP, int(name)))
                self.max_group = max(self.max_group, int(name))
            else:
                parts.append((_VAR, name))
            position = match.end()
        if position < len(text):
            parts.append((_LITERAL, text[position:]))
        self.parts = tuple(parts)
        literal_only = all(kind == _LITERAL for kind, _ in parts)
        self.constant = "".join(value for _, value in parts) if literal_only else None

    def render(self, ctx: RequestContext, match: re.Match[str] | None = None) -> str:
        if self.constant is not None:
            return self.constant
        out = []
        for kind, value in self.parts:
            if kind == _LITERAL:
                out.append(value)
            elif kind == _VAR:
                out.append(ctx.var(value) or "")
            elif match is not None and value <= match.re.groups:
                out.append(match.group(value) or "")
        return "".join(out)


def capture_template(text: str) -> tuple[str, int]:
    """Translate an nginx/PCRE replacement (`$1`, `${1}`, `$0`, `$$`) into a Python
    `re` template; returns (template, highest group referenced)."""
    out = []
    position = 0
    highest = 0
    for match in _REFERENCE.finditer(text):
        out.append(text[position:match.start()].replace("\\", "\\\\"))
        name = match.group(1) or match.group(2)
        if name is None:
            out.append("$")
        elif name.isdigit():
            out.append(f"\\g<{int(name)}>")
            highest = max(highest, int(name))
        else:  # not a capture: kept as written
            out.append(match.group(0).replace("\\", "\\\\"))
        position = match.end()
    out.append(text[position:].replace("\\", "\\\\"))
    return "".join(out), highest


class ProxyRewriteHeaders(PluginConfig):
    """Header operations, run in the order add, remove, set. APISIX's older flat form,
    `{"X-Name": "value"}`, means `set`."""

    model_config = ConfigDict(coerce_numbers_to_str=True, use_attribute_docstrings=True)

    add: dict[HeaderName, str | list[str]] = Field(default_factory=dict)
    """Headers appended to the request (kept alongside a header of the same name). A list
    appends the header once per value. Values may use variables (`$remote_addr`) and
    `regex_uri` captures (`$1`)."""
    remove: list[HeaderName] = Field(default_factory=list)
    """Names of headers removed from the request."""
    set: dict[HeaderName, str | list[str]] = Field(default_factory=dict)
    """Headers set on the request, replacing any of the same name. Values as for `add`.
    Use the `host` option, not this, for Host."""

    @model_validator(mode="before")
    @classmethod
    def _flat_form(cls, value: Any) -> Any:
        if isinstance(value, dict) and value and not {"add", "set", "remove"} & set(value):
            return {"set": value}
        return value

    @field_validator("add", "set")
    @classmethod
    def _values(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        for name, item in value.items():
            for text in item if isinstance(item, list) else [item]:
                try:
                    check_header_value(text)
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        return value


class ProxyRewriteConfig(PluginConfig):
    """Rewrites what is sent upstream. Runs in the rewrite phase, before authentication."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    uri: str | None = Field(None, pattern=r"^/", max_length=4096)
    """New upstream path. May use variables, e.g. `/api/$arg_version`. A `?query` in it is
    sent before the client's own query arguments. Takes precedence over `regex_uri`."""
    regex_uri: list[str] | None = Field(None, min_length=2)
    """Pairs of [regex, template]: the first regex (Python `re` syntax) found in the path
    has its match replaced by the template, where `$1`, `$2`... are its captures; e.g.
    `["^/api/(.*)", "/$1"]`. When none matches, the path is kept."""
    host: str | None = Field(None, pattern=r"^(\[[0-9A-Fa-f:.]+\]|[0-9A-Za-z\-.]+)(:\d{1,5})?$")
    """Host header sent upstream."""
    method: Literal[METHODS] | None = None  # type: ignore[valid-type]
    """HTTP method sent upstream."""
    headers: ProxyRewriteHeaders | None = None
    """Request header operations: `{add: {}, remove: [], set: {}}` or `{name: value}`."""

    @field_validator("regex_uri")
    @classmethod
    def _pairs(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(value) % 2:
            raise ValueError("must hold [regex, template] pairs (an even number of strings)")
        return value


@register
class ProxyRewrite(Plugin):
    """Rewrites the upstream request: path (`uri` or `regex_uri`), `method`, `host` and
    `headers`."""

    name = "proxy-rewrite"
    priority = 1008
    schema = ProxyRewriteConfig

    def __init__(self, conf: ProxyRewriteConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.uri = VarTemplate(conf.uri) if conf.uri is not None else None
        self.regex_uri: list[tuple[re.Pattern[str], str]] = []
        if conf.uri is None and conf.regex_uri:
            pairs = conf.regex_uri
            for index in range(0, len(pairs), 2):
                template, _ = capture_template(pairs[index + 1])
                self.regex_uri.append((re.compile(pairs[index]), template))
        self.method = conf.method
        self.host = conf.host
        headers = conf.headers or ProxyRewriteHeaders()
        self.add = [(name, [VarTemplate(v) for v in _as_list(value)])
                    for name, value in headers.add.items()]
        self.remove = list(headers.remove)
        self.set = [(name, [VarTemplate(v) for v in _as_list(value)])
                    for name, value in headers.set.items()]

    @classmethod
    def check(cls, conf: ProxyRewriteConfig) -> list[str]:
        reasons = []
        pairs = conf.regex_uri or []
        for index in range(0, len(pairs), 2):
            try:
                regex = re.compile(pairs[index])
            except re.error as exc:
                reasons.append(f"regex_uri[{index}]: invalid regex: {exc}")
                continue
            _, highest = capture_template(pairs[index + 1])
            if highest > regex.groups:
                reasons.append(f"regex_uri[{index + 1}]: refers to capture ${highest} but "
                               f"the regex has {regex.groups} group(s)")
        return reasons

    def rewrite(self, ctx: RequestContext) -> None:
        match = None
        if self.uri is not None:
            _set_upstream_uri(ctx, self.uri.render(ctx))
        elif self.regex_uri:
            path = ctx.uri
            for regex, template in self.regex_uri:
                match = regex.search(path)
                if match is not None:
                    new = path[:match.start()] + match.expand(template) + path[match.end():]
                    _set_upstream_uri(ctx, new)
                    break
        if self.method is not None and self.method != ctx.method:
            ctx.method = self.method
            # The request line is re-serialised only when marked dirty.
            ctx.uri_dirty = True
        if self.host is not None:
            ctx.upstream_host = self.host
        for name, templates in self.add:
            for template in templates:
                add_request_header(ctx, name, template.render(ctx, match))
        for name in self.remove:
            ctx.remove_header(name)
        for name, templates in self.set:
            if len(templates) == 1:
                ctx.set_header(name, templates[0].render(ctx, match))
            else:
                ctx.remove_header(name)
                for template in templates:
                    add_request_header(ctx, name, template.render(ctx, match))
        return None


def _as_list(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


def _set_upstream_uri(ctx: RequestContext, uri: str) -> None:
    """A `?` in the new URI brings its own arguments, followed by the client's (APISIX)."""
    path, sep, query = uri.partition("?")
    if sep:
        ctx.set_uri(path, f"{query}&{ctx.query}" if ctx.query else query)
    else:
        ctx.set_uri(path)


def add_request_header(ctx: RequestContext, name: str, value: str) -> None:
    ctx.add_header(name, value)
