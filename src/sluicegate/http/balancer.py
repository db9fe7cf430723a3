"""Upstream load balancers with APISIX semantics: pure selection logic, no I/O.

A balancer is compiled once per upstream config snapshot by :func:`make_balancer` and then
asked for a node on every request (and again on every retry). It is not thread-safe: each
event loop owns its snapshot.

Nodes are compared by identity: ``excluded`` and the ``on_request_*`` hooks must be given
the node objects this balancer returned.
"""

from __future__ import annotations

import math
import random
import struct
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable
from hashlib import shake_128
from re import compile as re_compile
from typing import Protocol
from zlib import crc32

__all__ = [
    "BALANCER_TYPES",
    "HASH_ON",
    "Balancer",
    "BalancerContext",
    "ConsistentHashBalancer",
    "EwmaBalancer",
    "LeastConnBalancer",
    "PriorityBalancer",
    "RoundRobinBalancer",
    "SingleNodeBalancer",
    "UpstreamNode",
    "make_balancer",
]

BALANCER_TYPES = ("roundrobin", "chash", "least_conn", "ewma")
HASH_ON = ("vars", "header", "cookie", "consumer", "vars_combinations")

# Virtual points per unit of (gcd-reduced) weight: lua-resty-balancer's CONSISTENT_POINTS,
# which APISIX's chash uses after dividing all weights by their gcd.
CHASH_POINTS_PER_WEIGHT = 160
# Ring size cap: 12 bytes a point (768 KiB) and ~22 ms to build at the cap (timeit, 64
# nodes). Past it the points per weight unit halve (160, 80, 40...) until the ring fits, so
# a node's points still depend on its own weight alone and removing one node moves only its
# keys unless the removal changes that step.
CHASH_MAX_RING_POINTS = 1 << 16
# APISIX ewma.lua DECAY_TIME: a latency sample's influence halves in ~7 s (10 * ln 2).
EWMA_DECAY_SECONDS = 10.0
# A failed attempt counts as a response this slow, so a backend that fails fast (connection
# refused in 1 ms) does not look like the fastest node and attract all traffic; Finagle's
# peak EWMA penalises failures the same way.
EWMA_FAILURE_PENALTY_SECONDS = 10.0

# APISIX core.utils.resolve_var: `$name` or `${name}`, variable names are \w+.
_TEMPLATE_VAR = re_compile(r"\$\{(\w+)\}|\$(\w+)")


class BalancerContext(Protocol):
    """What a balancer reads from the request: nginx-style variables and the consumer."""

    consumer_name: str | None

    def var(self, name: str) -> str | None: ...


class UpstreamNode:
    """One upstream server: ``host:port`` with a weight and a priority.

    ``weight`` 0 keeps the node configured but never picked. Nodes with a lower
    ``priority`` are used only once every node with a higher priority has been tried for
    the request (APISIX). Treat a node as immutable once a balancer holds it.
    """

    __slots__ = ("address", "host", "host_header", "key", "port", "priority", "weight")

    def __init__(self, host: str, port: int, weight: int, priority: int = 0) -> None:
        self.host = host
        self.port = port
        self.weight = weight
        self.priority = priority
        if ":" in host and not host.startswith("["):
            self.address = f"[{host}]:{port}"
        else:
            self.address = f"{host}:{port}"
        # Pool key, and the Host header for pass_host "node" (port omitted when 80).
        self.key = (host, port)
        self.host_header = (self.address if port != 80 else self.address.rsplit(":", 1)[0]
                            ).encode("idna" if host.isascii() is False else "ascii")

    def __repr__(self) -> str:
        return f"UpstreamNode({self.address!r}, weight={self.weight}, priority={self.priority})"


class Balancer:
    """Picks an upstream node for a request.

    ``pick(ctx, excluded)`` returns a node not in ``excluded`` (the nodes already tried for
    this request), or None when none is left. Call ``on_request_start`` when a request is
    sent to the picked node and ``on_request_end`` when it finishes.
    """

    __slots__ = ("nodes",)

    nodes: list[UpstreamNode]

    def __init__(self, nodes: list[UpstreamNode]) -> None:
        self.nodes = list(nodes)

    def pick(
        self, ctx: BalancerContext, excluded: set[UpstreamNode] | None = None
    ) -> UpstreamNode | None:
        raise NotImplementedError

    def on_request_start(self, node: UpstreamNode) -> None:
        return None

    def on_request_end(self, node: UpstreamNode, elapsed_seconds: float, failed: bool) -> None:
        return None


def _smooth_weighted_pick(
    pickable: list[UpstreamNode],
    weights: list[int],
    current: list[int],
    total: int,
    excluded: set[UpstreamNode] | None,
) -> UpstreamNode | None:
    """One step of nginx's smooth weighted round robin over the nodes not excluded.

    ``total`` is the sum of ``weights``, precomputed for the common case of no exclusions.
    """
    best = -1
    best_current = 0
    if not excluded:
        for i in range(len(weights)):
            c = current[i] + weights[i]
            current[i] = c
            if best < 0 or c > best_current:
                best = i
                best_current = c
    else:
        # Like nginx, only the peers still eligible for this request take part.
        total = 0
        for i in range(len(weights)):
            if pickable[i] in excluded:
                continue
            w = weights[i]
            total += w
            c = current[i] + w
            current[i] = c
            if best < 0 or c > best_current:
                best = i
                best_current = c
    if best < 0:
        return None
    current[best] = best_current - total
    return pickable[best]


class SingleNodeBalancer(Balancer):
    """The fast path for an upstream with one pickable node, whatever its type."""

    __slots__ = ("_node",)

    def __init__(self, nodes: list[UpstreamNode], node: UpstreamNode | None) -> None:
        super().__init__(nodes)
        self._node = node

    def pick(
        self, ctx: BalancerContext, excluded: set[UpstreamNode] | None = None
    ) -> UpstreamNode | None:
        if excluded and self._node in excluded:
            return None
        return self._node


class RoundRobinBalancer(Balancer):
    """nginx's smooth weighted round robin.

    Every pick adds each node's weight to its current weight, takes the node with the
    highest current weight and subtracts the total from it: weights 5, 1, 1 give
    ``a a b a c a a``, spreading the light nodes between the heavy one's turns.
    """

    __slots__ = ("_current", "_pickable", "_total", "_weights")

    def __init__(self, nodes: list[UpstreamNode]) -> None:
        super().__init__(nodes)
        self._pickable = [node for node in nodes if node.weight > 0]
        self._weights = [node.weight for node in self._pickable]
        self._current = [0] * len(self._pickable)
        self._total = sum(self._weights)

    def pick(
        self, ctx: BalancerContext, excluded: set[UpstreamNode] | None = None
    ) -> UpstreamNode | None:
        return _smooth_weighted_pick(
            self._pickable, self._weights, self._current, self._total, excluded
        )


class LeastConnBalancer(Balancer):
    """Fewest requests in flight relative to weight (``active / weight``), as nginx does.

    Nodes tied on that score share the load by smooth weighted round robin, so an idle
    upstream still follows the weights.
    """

    __slots__ = ("_active", "_current", "_in_flight", "_index", "_pickable", "_total", "_weights")

    def __init__(self, nodes: list[UpstreamNode]) -> None:
        super().__init__(nodes)
        self._pickable = [node for node in nodes if node.weight > 0]
        self._weights = [node.weight for node in self._pickable]
        self._active = [0] * len(self._pickable)
        self._current = [0] * len(self._pickable)
        self._total = sum(self._weights)
        self._index = {node: i for i, node in enumerate(self._pickable)}
        self._in_flight = 0

    def pick(
        self, ctx: BalancerContext, excluded: set[UpstreamNode] | None = None
    ) -> UpstreamNode | None:
        pickable = self._pickable
        weights = self._weights
        n = len(weights)
        if self._in_flight == 0:
            # Idle upstream: every node ties at 0, so only the tie-break runs. One pass
            # instead of two: 0.5 us instead of 1.5 us at 10 nodes (timeit, CPython 3.11).
            return _smooth_weighted_pick(pickable, weights, self._current, self._total, excluded)
        active = self._active
        # Compare active/weight by cross-multiplying: exact, and no float division.
        best = -1
        best_active = 0
        best_weight = 1
        tied = False
        for i in range(n):
            if excluded and pickable[i] in excluded:
                continue
            a = active[i]
            w = weights[i]
            lhs = a * best_weight
            rhs = best_active * w
            if best < 0 or lhs < rhs:
                best = i
                best_active = a
                best_weight = w
                tied = False
            elif lhs == rhs:
                tied = True
        if best < 0:
            return None
        if tied:
            current = self._current
            total = 0
            chosen = -1
            chosen_current = 0
            for i in range(best, n):
                w = weights[i]
                if active[i] * best_weight != best_active * w:
                    continue
                if excluded and pickable[i] in excluded:
                    continue
                total += w
                c = current[i] + w
                current[i] = c
                if chosen < 0 or c > chosen_current:
                    chosen = i
                    chosen_current = c
            current[chosen] = chosen_current - total
            best = chosen
        return pickable[best]

    def on_request_start(self, node: UpstreamNode) -> None:
        i = self._index.get(node)
        if i is not None:
            self._active[i] += 1
            self._in_flight += 1

    def on_request_end(self, node: UpstreamNode, elapsed_seconds: float, failed: bool) -> None:
        i = self._index.get(node)
        if i is not None and self._active[i] > 0:
            self._active[i] -= 1
            self._in_flight -= 1


class EwmaBalancer(Balancer):
    """APISIX's ewma balancer: the faster of two random nodes, latency-weighted by load.

    Each node keeps an exponentially weighted moving average of its response time that
    decays over ``EWMA_DECAY_SECONDS``, also towards 0 while the node is idle so a node
    that was slow once gets tried again. The score is ``ewma * (in_flight + 1)``; of two
    distinct random nodes the lower score wins, the less busy on a tie. A node without
    samples scores 0, so new nodes get tried. Weights other than 0 are ignored, as in
    APISIX.
    """

    __slots__ = ("_active", "_clock", "_ewma", "_index", "_pickable", "_random", "_touched")

    def __init__(
        self,
        nodes: list[UpstreamNode],
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(nodes)
        self._pickable = [node for node in nodes if node.weight > 0]
        n = len(self._pickable)
        self._index = {node: i for i, node in enumerate(self._pickable)}
        self._active = [0] * n
        self._ewma = [0.0] * n
        self._touched = [0.0] * n
        self._clock = clock
        self._random = (rng or random.Random()).random

    def pick(
        self, ctx: BalancerContext, excluded: set[UpstreamNode] | None = None
    ) -> UpstreamNode | None:
        pickable = self._pickable
        n = len(pickable)
        rnd = self._random
        if excluded:
            # Retry path: rare, so building the candidate list is fine here.
            candidates = [i for i in range(n) if pickable[i] not in excluded]
            m = len(candidates)
            if m == 0:
                return None
            if m == 1:
                return pickable[candidates[0]]
            a = int(rnd() * m)
            b = int(rnd() * (m - 1))
            if b >= a:
                b += 1
            a = candidates[a]
            b = candidates[b]
        else:
            if n == 0:
                return None
            if n == 1:
                return pickable[0]
            a = int(rnd() * n)
            b = int(rnd() * (n - 1))
            if b >= a:
                b += 1
        ewma = self._ewma
        touched = self._touched
        active = self._active
        now = self._clock()
        score_a = ewma[a]
        if score_a:
            score_a *= math.exp(-max(now - touched[a], 0.0) / EWMA_DECAY_SECONDS)
            score_a *= active[a] + 1
        score_b = ewma[b]
        if score_b:
            score_b *= math.exp(-max(now - touched[b], 0.0) / EWMA_DECAY_SECONDS)
            score_b *= active[b] + 1
        # Equal scores (typically two unmeasured nodes): the less busy one.
        if score_b < score_a or (score_b == score_a and active[b] < active[a]):
            return pickable[b]
        return pickable[a]

    def on_request_start(self, node: UpstreamNode) -> None:
        i = self._index.get(node)
        if i is not None:
            self._active[i] += 1

    def on_request_end(self, node: UpstreamNode, elapsed_seconds: float, failed: bool) -> None:
        i = self._index.get(node)
        if i is None:
            return
        if self._active[i] > 0:
            self._active[i] -= 1
        rtt = max(elapsed_seconds, EWMA_FAILURE_PENALTY_SECONDS) if failed else elapsed_seconds
        now = self._clock()
        if self._ewma[i] == 0.0 and self._touched[i] == 0.0:
            # First sample: APISIX's decay from last_touched_at=0 makes it the whole ewma.
            self._ewma[i] = rtt
        else:
            w = math.exp(-max(now - self._touched[i], 0.0) / EWMA_DECAY_SECONDS)
            self._ewma[i] = self._ewma[i] * w + rtt * (1.0 - w)
        self._touched[i] = now


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


class PriorityBalancer(Balancer):
    """Nodes grouped by priority: a lower group is used once the higher ones are tried."""

    __slots__ = ("_group_of", "_groups")

    def __init__(self, nodes: list[UpstreamNode], groups: list[Balancer]) -> None:
        super().__init__(nodes)
        self._groups = tuple(groups)
        self._group_of = {node: group for group in groups for node in group.nodes}

    def pick(
        self, ctx: BalancerContext, excluded: set[UpstreamNode] | None = None
    ) -> UpstreamNode | None:
        for group in self._groups:
            node = group.pick(ctx, excluded)
            if node is not None:
                return node
        return None

    def on_request_start(self, node: UpstreamNode) -> None:
        group = self._group_of.get(node)
        if group is not None:
            group.on_request_start(node)

    def on_request_end(self, node: UpstreamNode, elapsed_seconds: float, failed: bool) -> None:
        group = self._group_of.get(node)
        if group is not None:
            group.on_request_end(node, elapsed_seconds, failed)


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


def _make_group(type: str, nodes: list[UpstreamNode], hash_on: str, key: str | None) -> Balancer:
    pickable = [node for node in nodes if node.weight > 0]
    if len(pickable) <= 1:
        return SingleNodeBalancer(nodes, pickable[0] if pickable else None)
    if type == "roundrobin":
        return RoundRobinBalancer(nodes)
    if type == "chash":
        return ConsistentHashBalancer(nodes, hash_on, key)
    if type == "least_conn":
        return LeastConnBalancer(nodes)
    return EwmaBalancer(nodes)


def make_balancer(
    type: str, nodes: list[UpstreamNode], hash_on: str = "vars", key: str | None = None
) -> Balancer:
    """Build the balancer for an upstream of ``type`` (``roundrobin``, ``chash``,
    ``least_conn`` or ``ewma``); ``hash_on`` and ``key`` configure ``chash`` only.

    Nodes of weight 0 are kept in ``nodes`` but never picked. Nodes of several priorities
    get one balancer per priority, tried from the highest down. An upstream (or priority
    group) with a single pickable node gets a balancer that returns it without work.

    Raises ValueError for an unknown type, no nodes, a negative weight or a chash key
    that cannot be resolved.
    """
    if type not in BALANCER_TYPES:
        raise ValueError(f"unknown balancer type {type!r}; expected one of {BALANCER_TYPES}")
    if not nodes:
        raise ValueError("an upstream needs at least one node")
    for node in nodes:
        if node.weight < 0:
            raise ValueError(f"node {node.address} has negative weight {node.weight}")
    if type == "chash":
        # Validate hash_on/key even when the fast path below will not hash.
        ConsistentHashBalancer([], hash_on, key)
    priorities = sorted({node.priority for node in nodes}, reverse=True)
    if len(priorities) == 1:
        return _make_group(type, nodes, hash_on, key)
    groups = [
        _make_group(type, [node for node in nodes if node.priority == p], hash_on, key)
        for p in priorities
    ]
    return PriorityBalancer(nodes, groups)


class OriginalDestinationBalancer(Balancer):
    """For intercepted traffic with no upstream configured: the node is the address the
    client was connecting to (its original destination)."""

    __slots__ = ("cache",)

    # Distinct destinations remembered; past this the cache starts over (bounded memory).
    MAX_CACHED = 10_000

    def __init__(self) -> None:
        self.nodes = []
        self.cache: dict[tuple[str, int], UpstreamNode] = {}

    def pick(self, ctx: BalancerContext, excluded: set[UpstreamNode] | None = None
             ) -> UpstreamNode | None:
        destination = getattr(ctx, "original_destination", None)
        if destination is None:
            return None
        node = self.cache.get(destination)
        if node is None:
            if len(self.cache) >= self.MAX_CACHED:
                self.cache.clear()
            node = self.cache[destination] = UpstreamNode(destination[0], destination[1], 1)
        if excluded and node in excluded:
            return None
        return node

    def on_request_start(self, node: UpstreamNode) -> None:
        pass

    def on_request_end(self, node: UpstreamNode, elapsed_seconds: float, failed: bool) -> None:
        pass
