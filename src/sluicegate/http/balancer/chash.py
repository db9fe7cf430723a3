"""chash: consistent hashing on a request variable, header, cookie, the consumer or a
combination (APISIX chash.lua, lua-resty-balancer's ring).
"""

from __future__ import annotations

import math
import struct
from array import array
from bisect import bisect_left
from collections.abc import Callable
from hashlib import shake_128
from re import compile as re_compile
from zlib import crc32

from sluicegate.http.balancer.base import (
    Balancer,
    BalancerContext,
    UpstreamNode,
)

# Virtual points per unit of (gcd-reduced) weight: lua-resty-balancer's CONSISTENT_POINTS,
# which APISIX's chash uses after dividing all weights by their gcd.
CHASH_POINTS_PER_WEIGHT = 160
# Ring size cap: 12 bytes a point (768 KiB) and ~22 ms to build at the cap (timeit, 64
# nodes). Past it the points per weight unit halve (160, 80, 40...) until the ring fits, so
# a node's points still depend on its own weight alone and removing one node moves only its
# keys unless the removal changes that step.
CHASH_MAX_RING_POINTS = 1 << 16
HASH_ON = ("vars", "header", "cookie", "consumer", "vars_combinations")

# APISIX core.utils.resolve_var: `$name` or `${name}`, variable names are \w+.
_TEMPLATE_VAR = re_compile(r"\$\{(\w+)\}|\$(\w+)")


class ConsistentHashBalancer(Balancer):
    """Consistent hashing on a request key (APISIX ``chash``).

    Each node owns virtual points on a 32-bit ring in proportion to its weight; a key goes
    to the first point at or after its CRC32, so the same key keeps reaching the same node
    and removing a node moves only the keys it held. Points are derived from the node's
    address alone, so every gateway instance builds the same ring whatever the node order.
    A retry walks clockwise from the key to the next point whose node was not tried.

    ``hash_on`` chooses the key: ``vars`` (variable ``key``, e.g. ``remote_addr``),
    ``header`` (request header ``key``), ``cookie`` (cookie ``key``), ``consumer`` (the
    authenticated consumer's name) or ``vars_combinations`` (a template such as
    ``$host$uri``). A missing key falls back to ``remote_addr``.
    """

    __slots__ = (
        "_hashes",
        "_key_of",
        "_pickable_set",
        "_point_nodes",
        "_template",
        "_var_name",
    )

    def __init__(
        self, nodes: list[UpstreamNode], hash_on: str = "vars", key: str | None = None
    ) -> None:
        super().__init__(nodes)
        self._var_name = ""
        self._template: tuple[tuple[str, str | None], ...] = ()
        self._key_of = self._configure_key(hash_on, key)
        pickable = [node for node in nodes if node.weight > 0]
        self._pickable_set = frozenset(pickable)
        self._build_ring(pickable)

    def _configure_key(self, hash_on: str, key: str | None) -> Callable[[BalancerContext], str]:
        if hash_on not in HASH_ON:
            raise ValueError(f"unknown chash hash_on {hash_on!r}; expected one of {HASH_ON}")
        if hash_on == "consumer":
            return self._key_from_consumer
        if not key:
            raise ValueError(f"chash with hash_on={hash_on!r} needs a key")
        if hash_on == "vars":
            self._var_name = key
        elif hash_on == "header":
            self._var_name = "http_" + key.lower().replace("-", "_")
        elif hash_on == "cookie":
            self._var_name = "cookie_" + key
        else:
            self._template = _parse_template(key)
            return self._key_from_template
        return self._key_from_var

    def _build_ring(self, pickable: list[UpstreamNode]) -> None:
        # Hashes in a 4-byte array, nodes as references: 12 bytes a point where lists of
        # ints take ~48; bisect on the array costs 0.1 us more a pick (timeit, 2400 points).
        self._hashes = array("I")
        self._point_nodes: list[UpstreamNode] = []
        if not pickable:
            return
        gcd = 0
        for node in pickable:
            gcd = math.gcd(gcd, node.weight)
        units = [node.weight // gcd for node in pickable]
        total_units = sum(units)
        per_unit = CHASH_POINTS_PER_WEIGHT
        while per_unit > 1 and total_units * per_unit > CHASH_MAX_RING_POINTS:
            per_unit //= 2
        scale = min(1.0, CHASH_MAX_RING_POINTS / (total_units * per_unit))
        # Order by address so ties on the ring resolve the same on every instance.
        order = sorted(range(len(pickable)), key=lambda i: (pickable[i].address, i))
        ranked = [pickable[i] for i in order]
        combined: list[int] = []
        for rank, i in enumerate(order):
            count = max(1, int(units[i] * per_unit * scale))
            # An extendable output function: a node's first k points never change with its
            # weight, so a weight change moves only the keys on the points added or removed.
            stream = shake_128(ranked[rank].address.encode()).digest(4 * count)
            combined.extend((h << 32) | rank for h in struct.unpack(f"<{count}I", stream))
        combined.sort()
        self._hashes = array("I", [c >> 32 for c in combined])
        self._point_nodes = [ranked[c & 0xFFFFFFFF] for c in combined]

    def pick(
        self, ctx: BalancerContext, excluded: set[UpstreamNode] | None = None
    ) -> UpstreamNode | None:
        hashes = self._hashes
        npoints = len(hashes)
        if npoints == 0:
            return None
        if excluded and self._pickable_set <= excluded:
            return None
        key = self._key_of(ctx)
        i = bisect_left(hashes, crc32(key.encode("utf-8", "surrogatepass")))
        if i == npoints:
            i = 0
        point_nodes = self._point_nodes
        node = point_nodes[i]
        if excluded:
            # Terminates: some pickable node is not excluded and every one has a point.
            while node in excluded:
                i += 1
                if i == npoints:
                    i = 0
                node = point_nodes[i]
        return node

    def _key_from_var(self, ctx: BalancerContext) -> str:
        value = ctx.var(self._var_name)
        if value:
            return value
        return ctx.var("remote_addr") or ""

    def _key_from_consumer(self, ctx: BalancerContext) -> str:
        value = ctx.consumer_name
        if value:
            return value
        return ctx.var("remote_addr") or ""

    def _key_from_template(self, ctx: BalancerContext) -> str:
        parts = []
        resolved = False
        for literal, name in self._template:
            parts.append(literal)
            if name is not None:
                value = ctx.var(name)
                if value:
                    parts.append(value)
                    resolved = True
        # APISIX falls back when no variable in the template resolved.
        if resolved:
            return "".join(parts)
        return ctx.var("remote_addr") or ""


def _parse_template(template: str) -> tuple[tuple[str, str | None], ...]:
    """Split ``a$host-${uri}`` into ``(("a", "host"), ("-", "uri"))``-style parts."""
    parts: list[tuple[str, str | None]] = []
    pos = 0
    for match in _TEMPLATE_VAR.finditer(template):
        parts.append((template[pos : match.start()], match.group(1) or match.group(2)))
        pos = match.end()
    if pos < len(template):
        parts.append((template[pos:], None))
    if not any(name for _, name in parts):
        raise ValueError(f"chash vars_combinations key {template!r} has no $variable")
    return tuple(parts)
