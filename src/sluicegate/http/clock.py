"""A coarse clock and one periodic sweep for every timeout of a worker.

A timer per request costs ~0.5 µs (PERF.md) and a reset per read costs more; instead,
connections stamp `CLOCK.now` (an attribute read) on activity and one tick every
TICK_SECONDS checks who has been quiet too long. Timeouts are therefore accurate to one tick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

TICK_SECONDS = 0.25


class Clock:
    __slots__ = ("extra", "handle", "loop", "now", "watchers")

    def __init__(self) -> None:
        self.now = time.monotonic()
        self.watchers: set[Any] = set()  # objects with check_timeouts(now)
        self.handle: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.extra: list[Callable[[float], None]] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.now = time.monotonic()
        self.handle = loop.call_later(TICK_SECONDS, self._tick)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _tick(self) -> None:
        self.now = now = time.monotonic()
        for watcher in list(self.watchers):
            watcher.check_timeouts(now)
        for callback in self.extra:
            callback(now)
        assert self.loop is not None
        self.handle = self.loop.call_later(TICK_SECONDS, self._tick)


CLOCK = Clock()
