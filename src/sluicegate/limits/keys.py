"""Which counter a request counts against: the limit's scope plus the request's key.

A scope names one configured limit the same way in every worker, so the workers of a
gateway share its counter in the host-wide store: the plugin name, a digest of its config,
and the ordinal of that (name, config) pair in the snapshot being built. Workers compile the
same config file in the same order, so they agree; an unchanged limit keeps its counter
across a reload, a changed one starts afresh (as APISIX keys counters by config version).
Each route's plugin instance is its own limit; a global rule's instance, shared by all
routes, is one limit (APISIX counts per route, and per global rule).
"""

from __future__ import annotations

import hashlib
import re
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel

    from sluicegate.http.context import RequestContext

KeyFunction = Callable[["RequestContext"], str]

# APISIX core.utils.resolve_var: `$name` or `${name}`, variable names are \w+.
_TEMPLATE_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_VARIABLE_NAME = re.compile(r"\w+")
KEY_TYPES = ("var", "var_combination", "constant")

# Snapshot (PluginEnv) id -> how many instances of each (name, config digest) it has.
_ordinals: dict[int, dict[str, int]] = {}


def limit_scope(name: str, conf: BaseModel, env: object, group: str | None = None) -> str:
    """The counter-key prefix of one plugin instance built for snapshot `env`."""
    if group is not None:
        return f"{name}|group|{group}|"
    digest = hashlib.blake2b(conf.model_dump_json().encode(), digest_size=9).hexdigest()
    base = f"{name}|{digest}"
    counts = _ordinals.get(id(env))
    if counts is None:
        counts = _ordinals[id(env)] = {}
        weakref.finalize(env, _ordinals.pop, id(env), None)
    ordinal = counts.get(base, 0)
    counts[base] = ordinal + 1
    return f"{base}|{ordinal}|"


def key_problems(key_type: str, key: str) -> list[str]:
    """Reasons a key cannot work with its key_type (empty when fine)."""
    if key_type == "var" and not _VARIABLE_NAME.fullmatch(key):
        return [f"key: {key!r} is not a variable name (key_type var takes a name without "
                "'$', e.g. remote_addr, http_x_api_key, consumer_name)"]
    if key_type == "var_combination" and not _TEMPLATE_VAR.search(key):
        return [f"key: {key!r} has no $variable (key_type var_combination combines "
                "variables, e.g. '$remote_addr $http_x_user')"]
    return []


def _remote_addr(ctx: RequestContext) -> str:
    return ctx.remote_addr


def compile_key(key_type: str, key: str, scope: str) -> KeyFunction:
    """A function giving a request's full counter key. As in APISIX, a variable that is
    unset or empty (or a combination where none is set) counts by `remote_addr`."""
    if key_type == "constant":
        constant = scope + key
        return lambda ctx: constant
    if key_type == "var":
        if key == "remote_addr":  # the default: an attribute read, not a variable lookup
            return lambda ctx: scope + ctx.remote_addr

        def by_variable(ctx: RequestContext) -> str:
            return scope + (ctx.var(key) or ctx.remote_addr)

        return by_variable
    parts: list[tuple[bool, str]] = []  # (is a variable, literal text or variable name)
    position = 0
    for match in _TEMPLATE_VAR.finditer(key):
        if match.start() > position:
            parts.append((False, key[position:match.start()]))
        parts.append((True, match.group(1) or match.group(2)))
        position = match.end()
    if position < len(key):
        parts.append((False, key[position:]))

    def by_combination(ctx: RequestContext) -> str:
        out: list[Any] = [scope]
        resolved = 0
        for is_variable, text in parts:
            if is_variable:
                value = ctx.var(text)
                if value:
                    resolved += 1
                    out.append(value)
            else:
                out.append(text)
        return "".join(out) if resolved else scope + ctx.remote_addr

    return by_combination
