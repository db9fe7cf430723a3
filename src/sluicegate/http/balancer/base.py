"""What every balancer shares: the node, the request context it reads, the interface,
nginx's smooth weighted round robin step, and the one-node fast path.
"""

from __future__ import annotations

from typing import Protocol


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


def smooth_weighted_pick(
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
