"""response-rewrite: change the status, headers and body of the response to the client."""

from __future__ import annotations

import binascii
import re
import zlib
from base64 import b64decode
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

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

# -- conditions (APISIX `vars`, lua-resty-expr) ---------------------------------------------

Condition = Callable[[RequestContext], bool]
COMPARISONS = ("==", "~=", ">", "<", ">=", "<=", "~~", "~*", "in")
LOGICAL = ("AND", "OR", "!AND", "!OR")


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _compare(op: str, expected: Any, where: str) -> Callable[[str | None], bool]:
    """A test of one variable's value (a string, or None when unset). As in lua-resty-expr,
    a number on the right makes `==`/`~=` compare numerically, and the ordering
    operators always do."""
    if op in ("==", "~="):
        if _is_number(expected):
            def equal(value: str | None) -> bool:
                return _number(value) == expected
        elif isinstance(expected, str):
            def equal(value: str | None) -> bool:
                return value == expected
        else:
            raise ValueError(f"{where}: {op!r} needs a string or number, got {expected!r}")
        if op == "==":
            return equal
        return lambda value: not equal(value)
    if op in (">", "<", ">=", "<="):
        bound = _number(expected)
        if bound is None:
            raise ValueError(f"{where}: {op!r} needs a number, got {expected!r}")
        ordering = {">": float.__gt__, "<": float.__lt__, ">=": float.__ge__,
                    "<=": float.__le__}[op]

        def ordered(value: str | None) -> bool:
            number = _number(value)
            return number is not None and ordering(number, bound)
        return ordered
    if op in ("~~", "~*"):
        if not isinstance(expected, str):
            raise ValueError(f"{where}: {op!r} needs a regex string, got {expected!r}")
        try:
            regex = re.compile(expected, re.IGNORECASE if op == "~*" else 0)
        except re.error as exc:
            raise ValueError(f"{where}: invalid regex: {exc}") from None
        return lambda value: value is not None and regex.search(value) is not None
    if op == "in":
        if not isinstance(expected, list):
            raise ValueError(f"{where}: 'in' needs a list, got {expected!r}")
        strings = frozenset(str(item) for item in expected if isinstance(item, str))
        numbers = frozenset(float(item) for item in expected if _is_number(item))

        def member(value: str | None) -> bool:
            return value in strings or (bool(numbers) and _number(value) in numbers)
        return member
    raise ValueError(f"{where}: unknown operator {op!r} (supported: {', '.join(COMPARISONS)}, "
                     "each may follow '!')")


def _compile_expression(expr: Any, where: str) -> Condition:
    if not isinstance(expr, list) or not expr:
        raise ValueError(f"{where}: an expression is a non-empty list")
    if isinstance(expr[0], str) and expr[0] in LOGICAL:
        return _compile_logical(expr, where)
    if len(expr) == 4 and expr[1] == "!":
        name, _, op, expected = expr
        negate = True
    elif len(expr) == 3:
        name, op, expected = expr
        negate = False
    else:
        raise ValueError(f"{where}: expected [variable, operator, value] or "
                         "[variable, '!', operator, value]")
    if not isinstance(name, str) or not isinstance(op, str):
        raise ValueError(f"{where}: variable and operator must be strings")
    test = _compare(op, expected, where)
    if negate:
        return lambda ctx: not test(ctx.var(name))
    return lambda ctx: test(ctx.var(name))


def _compile_logical(expr: list[Any], where: str) -> Condition:
    operator = expr[0]
    parts = [_compile_expression(item, f"{where}[{index}]")
             for index, item in enumerate(expr[1:], start=1)]
    combine = all if operator.endswith("AND") else any
    if operator.startswith("!"):
        return lambda ctx: not combine(part(ctx) for part in parts)
    return lambda ctx: combine(part(ctx) for part in parts)


def compile_vars(conditions: list[Any], where: str = "vars") -> Condition:
    """APISIX `vars`: a list of expressions that must all hold, e.g.
    `[["status", "==", 200], ["http_x_debug", "~~", "^on$"]]`, or one logical
    expression `["OR", [...], [...]]`. Raises ValueError naming the bad element."""
    if conditions and isinstance(conditions[0], str) and conditions[0] in LOGICAL:
        return _compile_logical(conditions, where)
    parts = [_compile_expression(item, f"{where}[{index}]")
             for index, item in enumerate(conditions)]
    if len(parts) == 1:
        return parts[0]
    return lambda ctx: all(part(ctx) for part in parts)


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
