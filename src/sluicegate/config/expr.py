"""APISIX `vars` expressions (lua-resty-expr), compiled once at config load into plain
callables over the request context (anything with `var(name) -> str | None`).

Used by route matching and by plugins with conditions (response-rewrite...). A bad
expression raises ValueError naming the element, which the validator reports with its path.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

Condition = Callable[[Any], bool]
COMPARISONS = ("==", "~=", ">", "<", ">=", "<=", "~~", "~*", "in", "has", "ipmatch")
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
    if op == "has":
        needle = str(expected)
        return lambda value: value is not None and needle in value
    if op == "ipmatch":
        try:
            networks = [ipaddress.ip_network(str(item), strict=False) for item in
                        (expected if isinstance(expected, list) else [expected])]
        except ValueError as exc:
            raise ValueError(f"{where}: 'ipmatch' needs IPs or CIDRs: {exc}") from None

        def inside(value: str | None) -> bool:
            try:
                address = ipaddress.ip_address(value or "")
            except ValueError:
                return False
            return any(address in network for network in networks)
        return inside
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
