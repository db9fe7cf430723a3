"""response-rewrite: change the status, headers and body of the response to the client."""

from __future__ import annotations

import binascii
import re
import zlib
from base64 import b64decode
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from sluicegate.config.expr import compile_vars
from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Plugin, PluginConfig, PluginEnv, register
from sluicegate.plugins.proxy_rewrite import (
    HEADER_NAME_PATTERN,
    HeaderName,
    HeaderValue,
    VarTemplate,
    capture_template,
    check_header_value,
)

# -- config ------------------------------------------------------------------------------

_HEADER_NAME = re.compile(HEADER_NAME_PATTERN)


def _name_value(item: str) -> str:
    name, sep, text = item.partition(":")
    if not sep or not _HEADER_NAME.match(name.strip()):
        raise ValueError(f"expected 'Name: value', got {item!r}")
    check_header_value(text)
    return item


class ResponseRewriteHeaders(PluginConfig):
    """Response header operations, run in the order add, remove, set. APISIX's older flat
    form `{"X-Name": "value"}` means set, and an empty value there means remove."""

    model_config = ConfigDict(coerce_numbers_to_str=True, use_attribute_docstrings=True)

    add: list[Annotated[str, AfterValidator(_name_value)]] = Field(default_factory=list)
    """Headers appended to the response, as `"Name: value"` strings. Values may use
    variables such as `$remote_addr`."""
    remove: list[HeaderName] = Field(default_factory=list)
    """Names of response headers removed."""
    set: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    """Response headers set, replacing any of the same name. Values may use variables."""

    @model_validator(mode="before")
    @classmethod
    def _flat_form(cls, value: Any) -> Any:
        if isinstance(value, dict) and value and not {"add", "set", "remove"} & set(value):
            return {"set": {k: v for k, v in value.items() if v != ""},
                    "remove": [k for k, v in value.items() if v == ""]}
        return value



class ResponseFilter(PluginConfig):
    """One regex substitution over the response body."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    regex: str = Field(min_length=1)
    """Regex (Python `re` syntax) searched in the body."""
    scope: Literal["once", "global"] = "once"
    """`once` replaces the first match, `global` every match."""
    replace: str
    """Replacement; `$0` is the whole match, `$1`, `$2`... its captures."""
    options: str = Field("jo", pattern=r"^[jioumsx]*$")
    """PCRE-style flags as in APISIX: `i` ignore case, `m` multi-line, `s` dot matches
    newline, `x` verbose; `j`, `o` and `u` are accepted and have no effect."""


class ResponseRewriteConfig(PluginConfig):
    """response-rewrite options. Rewrites apply only when `vars` (if given) hold."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    status_code: int | None = Field(None, ge=200, le=598)
    """New response status."""
    body: str | None = None
    """New response body, replacing the upstream's (Content-Length, Content-Encoding and
    ETag are dropped). Not together with `filters`."""
    body_base64: bool = False
    """`body` is base64 (for binary bodies); decoded once when the config loads."""
    headers: ResponseRewriteHeaders | None = None
    """Response header operations: `{add: ["Name: value"], remove: [], set: {}}`."""
    vars: list[Any] | None = None
    """Conditions (APISIX `vars`) on variables such as `status`, `http_x_y`, `arg_x`,
    e.g. `[["status", "==", 200]]`; operators `==`, `~=`, `>`, `<`, `>=`, `<=`, `~~`
    (regex), `~*` (regex, any case), `in`, each may be negated with `"!"`. Response
    variables (`status`) hold the upstream's response."""
    filters: list[ResponseFilter] | None = Field(None, min_length=1)
    """Regex substitutions over the body, applied in order once the whole body has
    arrived (the body is buffered). gzip and deflate bodies are decoded, filtered and
    re-encoded; bodies in other encodings (br, zstd) pass unchanged."""

    @model_validator(mode="after")
    def _body_options(self) -> ResponseRewriteConfig:
        if self.body is not None and self.filters is not None:
            raise ValueError("body and filters cannot be used together")
        if self.body_base64:
            if self.body is None:
                raise ValueError("body_base64 needs body")
            try:
                b64decode(self.body, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("body: not valid base64 (body_base64 is true)") from None
        return self


# -- plugin ------------------------------------------------------------------------------

_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}
# Headers describing the upstream's body bytes, wrong once the body changes.
_BODY_HEADERS = frozenset({"content-length", "etag", "content-md5"})
_REPLACED_BODY_HEADERS = _BODY_HEADERS | {"content-encoding"}  # our body is not encoded
_GZIP = ("gzip", "x-gzip")
_ENCODINGS = (*_GZIP, "deflate")
_REPLACE = object()  # per-request state: send the configured body


class _HeldBody:
    """Per-request state for filters: the chunks held so far and their encoding."""

    __slots__ = ("chunks", "encoding")

    def __init__(self, encoding: str | None) -> None:
        self.chunks: list[bytes] = []
        self.encoding = encoding


@register
class ResponseRewrite(Plugin):
    """Rewrites the response: `status_code`, `headers`, and the body (`body` replaces it,
    `filters` edit it), optionally only when `vars` hold."""

    name = "response-rewrite"
    priority = 899
    schema = ResponseRewriteConfig

    def __init__(self, conf: ResponseRewriteConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        self.condition = compile_vars(conf.vars) if conf.vars else None
        self.status = conf.status_code
        self.body: bytes | None = None
        if conf.body is not None:
            self.body = b64decode(conf.body) if conf.body_base64 else conf.body.encode()
        self.filters: list[tuple[re.Pattern[bytes], bytes, int]] = []
        for item in conf.filters or []:
            flags = 0
            for option in item.options:
                flags |= _REGEX_FLAGS.get(option, 0)
            template, _ = capture_template(item.replace)
            self.filters.append((re.compile(item.regex.encode(), flags), template.encode(),
                                 1 if item.scope == "once" else 0))
        headers = conf.headers or ResponseRewriteHeaders()
        self.add = []
        for item in headers.add:
            name, _, value = item.partition(":")
            self.add.append((name.strip(), VarTemplate(value.strip())))
        self.remove = list(headers.remove)
        self.set = [(name, VarTemplate(value)) for name, value in headers.set.items()]
        self.state_key = f"{self.name}#{id(self)}"
        # Only a config that changes the body has a body_filter: any body_filter in a
        # chain makes the data plane re-frame the response as chunked.
        if self.body is not None or self.filters:
            self.body_filter = self._body_filter

    @classmethod
    def check(cls, conf: ResponseRewriteConfig) -> list[str]:
        reasons = []
        if conf.vars:
            try:
                compile_vars(conf.vars)
            except ValueError as exc:
                reasons.append(str(exc))
        for index, item in enumerate(conf.filters or []):
            try:
                regex = re.compile(item.regex)
            except re.error as exc:
                reasons.append(f"filters[{index}].regex: invalid regex: {exc}")
                continue
            _, highest = capture_template(item.replace)
            if highest > regex.groups:
                reasons.append(f"filters[{index}].replace: refers to capture ${highest} but "
                               f"the regex has {regex.groups} group(s)")
        return reasons

    def header_filter(self, ctx: RequestContext) -> None:
        if self.condition is not None and not self.condition(ctx):
            return
        if self.status is not None:
            ctx.response_status = self.status
        if self.body is not None or self.filters:
            if ctx.vars is None:
                ctx.vars = {}
            if self.body is not None:
                ctx.vars[self.state_key] = _REPLACE
                drop = _REPLACED_BODY_HEADERS
            else:
                encoding = (ctx.get_response_header("Content-Encoding") or "").strip().lower()
                encoding = encoding if encoding not in ("", "identity") else None
                ctx.vars[self.state_key] = _HeldBody(encoding)
                drop = _BODY_HEADERS
            ctx.response_headers = [(k, v) for k, v in ctx.response_headers
                                    if k.lower() not in drop]
        for name, template in self.add:
            ctx.response_headers.append((name, template.render(ctx)))
        for name in self.remove:
            ctx.set_response_header(name, None)
        for name, template in self.set:
            ctx.set_response_header(name, template.render(ctx))

    def _body_filter(self, ctx: RequestContext, chunk: bytes, eof: bool) -> bytes:
        state = ctx.vars.get(self.state_key) if ctx.vars else None
        if state is None:  # conditions did not hold
            return chunk
        if state is _REPLACE:
            return self.body if eof else b""  # type: ignore[return-value]
        state.chunks.append(chunk)
        if not eof:
            return b""
        body = b"".join(state.chunks)
        state.chunks.clear()
        return self._filter(body, state.encoding)

    def _filter(self, body: bytes, encoding: str | None) -> bytes:
        if encoding is not None:
            if encoding not in _ENCODINGS:
                return body
            try:
                plain = zlib.decompress(body, 47)  # 32 + 15: zlib or gzip header
            except zlib.error:
                return body  # not what the header says: leave it alone
        else:
            plain = body
        for regex, template, count in self.filters:
            plain = regex.sub(template, plain, count)
        if encoding is None:
            return plain
        if encoding in _GZIP:
            compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # 16 + 15: gzip header
            return compressor.compress(plain) + compressor.flush()
        return zlib.compress(plain)
