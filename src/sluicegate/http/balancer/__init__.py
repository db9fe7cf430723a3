"""Upstream load balancers with APISIX semantics: pure selection logic, no I/O.

A balancer is compiled once per upstream config snapshot by :func:`make_balancer` and then
asked for a node on every request (and again on every retry). It is not thread-safe: each
event loop owns its snapshot.

Nodes are compared by identity: ``excluded`` and the ``on_request_*`` hooks must be given
the node objects this balancer returned.
"""

from __future__ import annotations

from sluicegate.http.balancer.base import (
    Balancer,
    BalancerContext,
    SingleNodeBalancer,
    UpstreamNode,
)
from sluicegate.http.balancer.chash import HASH_ON, ConsistentHashBalancer
from sluicegate.http.balancer.ewma import EwmaBalancer
from sluicegate.http.balancer.least_conn import LeastConnBalancer
from sluicegate.http.balancer.original_destination import OriginalDestinationBalancer
from sluicegate.http.balancer.priority import PriorityBalancer
from sluicegate.http.balancer.roundrobin import RoundRobinBalancer

__all__ = [
    "BALANCER_TYPES",
    "HASH_ON",
    "Balancer",
    "BalancerContext",
    "ConsistentHashBalancer",
    "EwmaBalancer",
    "LeastConnBalancer",
    "OriginalDestinationBalancer",
    "PriorityBalancer",
    "RoundRobinBalancer",
    "SingleNodeBalancer",
    "UpstreamNode",
    "make_balancer",
]

BALANCER_TYPES = ("roundrobin", "chash", "least_conn", "ewma")


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
