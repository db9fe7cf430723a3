"""Charging a fixed-window counter after the fact: what an AI answer used (tokens for
ai-rate-limiting, USD for ai-budget) is known only once the answer is complete, so it is
charged in the `log` phase, after the request was admitted on the budget left.

A charge larger than the room left is refused by the counter (it never passes its limit);
then the window is filled up to its limit instead, so the next request sees the budget
spent. With a store doing I/O (redis) the charge runs as a task of its own: the response
is already sent and must not wait for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sluicegate.limits.counters import CounterStore, CountResult
from sluicegate.limits.redis_store import StoreUnavailable

__all__ = ["Charges"]

log = logging.getLogger("sluicegate.limits")

# Concurrent charges may change the room left between the read and the fill, so a few
# rounds, after which the window is full or others filled it.
MAX_FILL_ROUNDS = 4


class Charges:
    """The after-the-fact charges of one plugin, and its tasks still running."""

    __slots__ = ("on_unavailable", "plugin", "tasks")

    def __init__(self, plugin: str, on_unavailable: Callable[[], object]) -> None:
        self.plugin = plugin
        # Called when the store could not take a charge (Redis down): the amount is lost,
        # counted like the plugin's other store failures.
        self.on_unavailable = on_unavailable
        self.tasks: set[asyncio.Task[None]] = set()

    def charge(self, store: CounterStore, key: str, limit: int, window: float,
               amount: int) -> None:
        result = store.incr(key, limit, window, False, amount)
        if type(result) is tuple:
            if not result[0]:
                self._fill(store, key, limit, window)
            return
        task = asyncio.ensure_future(self._charge_later(store, result, key, limit, window))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @staticmethod
    def _fill(store: CounterStore, key: str, limit: int, window: float) -> None:
        for _ in range(MAX_FILL_ROUNDS):
            room: Any = store.incr(key, limit, window, False, 0)
            if room[1] <= 0 or store.incr(key, limit, window, False,
                                          room[1])[0]:  # type: ignore[index]
                return

    async def _charge_later(self, store: Any, pending: Awaitable[CountResult], key: str,
                            limit: int, window: float) -> None:
        try:
            result = await pending
            for _ in range(MAX_FILL_ROUNDS):
                if result[0]:
                    return
                room = await store.incr(key, limit, window, False, 0)
                if room[1] <= 0:
                    return
                result = await store.incr(key, limit, window, False, room[1])
        except StoreUnavailable:
            self.on_unavailable()
        except Exception:
            log.exception("%s: charging a counter failed", self.plugin)
