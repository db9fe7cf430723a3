"""Nodes of several priorities: one balancer per priority, tried from the highest down
(APISIX priority.lua).
"""

from __future__ import annotations

from sluicegate.http.balancer.base import (
    Balancer,
    BalancerContext,
    UpstreamNode,
)


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
