"""The balancer of intercepted traffic with no upstream configured."""

from __future__ import annotations

from sluicegate.http.balancer.base import (
    Balancer,
    BalancerContext,
    UpstreamNode,
)


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
