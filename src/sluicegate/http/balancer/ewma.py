"""ewma: the node with the lowest decayed response time (APISIX ewma.lua, peak EWMA)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

from sluicegate.http.balancer.base import (
    Balancer,
    BalancerContext,
    UpstreamNode,
)

# APISIX ewma.lua DECAY_TIME: a latency sample's influence halves in ~7 s (10 * ln 2).
EWMA_DECAY_SECONDS = 10.0
# A failed attempt counts as a response this slow, so a backend that fails fast (connection
# refused in 1 ms) does not look like the fastest node and attract all traffic; Finagle's
# peak EWMA penalises failures the same way.
EWMA_FAILURE_PENALTY_SECONDS = 10.0


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
