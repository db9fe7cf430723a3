"""least_conn: the node with the fewest requests in flight per weight (APISIX
least_conn.lua).
"""

from __future__ import annotations

from sluicegate.http.balancer.base import (
    Balancer,
    BalancerContext,
    UpstreamNode,
    smooth_weighted_pick,
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
            return smooth_weighted_pick(pickable, weights, self._current, self._total, excluded)
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
