"""roundrobin: nginx's smooth weighted round robin (APISIX roundrobin.lua)."""

from __future__ import annotations

from sluicegate.http.balancer.base import (
    Balancer,
    BalancerContext,
    UpstreamNode,
    smooth_weighted_pick,
)


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
        return smooth_weighted_pick(
            self._pickable, self._weights, self._current, self._total, excluded
        )
