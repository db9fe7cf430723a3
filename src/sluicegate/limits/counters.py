"""Counter stores: one interface for every rate-limit policy, two local implementations.

A store answers three questions about a key, each as one atomic read-modify-write:

- `incr(key, limit, window, sliding)`: may one more request pass in this window?
  (limit-count; fixed windows start at the first request, sliding windows weight the
  previous window's count by how much of it still overlaps, as APISIX 3.18 does);
- `leaky_bucket(key, rate, burst)`: leaky bucket of lua-resty-limit-req (limit-req);
- `acquire(key, limit)` / `release(key)`: a concurrency count (limit-conn).

The arithmetic lives in the `*_step` functions below, pure functions from
(state, now, options) to (new state, answer), so every store computes the same thing:
`InProcessStore` keeps states in a dict (one process), `SharedMemoryStore` keeps them in a
table in a memory-mapped file shared by the workers of one host, and a Redis store will run
the same steps as Lua scripts. A state is four floats `(expires, a, b, c)`; an expired state
means the same as no state, so a store may drop it at any time.

A store method returns its answer, or an awaitable of it for a store that does I/O
(Redis). Plugins accept both, as the plugin contract accepts both from hooks; the local
stores answer synchronously so the local policy costs no coroutine.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# (allowed, remaining, seconds until the window resets)
CountResult = tuple[bool, int, float]
# (allowed, seconds the request should wait to match the rate)
BucketResult = tuple[bool, float]
# (allowed, concurrent count including this one when allowed)
ConnResult = tuple[bool, int]
State = tuple[float, float, float, float]
Step = Callable[..., tuple[State | None, Any]]

INFINITY = float("inf")

# The environment variable naming the directory of this gateway's shared counter table. The
# supervisor creates a fresh private directory (under /dev/shm) per run and passes it to
# every worker; without it each process counts alone (fine with one worker).
LIMITS_DIR_ENV = "SLUICEGATE_LIMITS_DIR"
TABLE_FILE = "counters"


class CounterStore:
    """Where rate-limit counters live. Each method is atomic for its key across everyone
    sharing the store, and returns its answer, or an awaitable of it for a store that does
    network I/O (a Redis store; plugins handle both).

    Keys are opaque strings; the plugins prefix them with the limit they belong to, so a
    store never needs to know about routes or plugins. Rejected attempts do not count.
    """

    __slots__ = ()

    def incr(self, key: str, limit: int, window: float, sliding: bool = False,
             cost: int = 1) -> CountResult | Awaitable[CountResult]:
        """Count `cost` requests against `limit` per `window` seconds: (allowed,
        remaining, reset seconds). A fixed window starts at the first request after the
        previous one ended; a sliding window also counts the previous window's requests,
        weighted by the share of it the sliding window still covers."""
        raise NotImplementedError

    def leaky_bucket(self, key: str, rate: float, burst: float
                     ) -> BucketResult | Awaitable[BucketResult]:
        """A request into a bucket leaking `rate` requests a second and holding `burst`
        beyond the one being served: (allowed, delay seconds to match the rate)."""
        raise NotImplementedError

    def acquire(self, key: str, limit: int) -> ConnResult | Awaitable[ConnResult]:
        """One more concurrent request if fewer than `limit` are in flight: (allowed,
        count including this one). Every allowed acquire needs one `release`."""
        raise NotImplementedError

    def release(self, key: str) -> int | Awaitable[int]:
        """One concurrent request fewer; returns the count left."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of shared resources (the counts stay for the other processes)."""


# -- the arithmetic, shared by every store --------------------------------------------------
# Each step gets the current state (None when absent or expired) and returns the new state
# (the same object when nothing changes, None to delete) and the answer.


def count_step(state: State | None, now: float, limit: int, window: float, sliding: bool,
               cost: int) -> tuple[State | None, CountResult]:
    """limit-count. State: (expires, window start, count in it, count in the previous)."""
    if state is None:
        start, current, previous = now, 0.0, 0.0
    else:
        _, start, current, previous = state
        elapsed = now - start
        if elapsed >= window:
            if sliding:  # windows stay back to back so the previous one can be weighted
                periods = elapsed // window
                previous = current if periods == 1 else 0.0
                start += periods * window
            else:  # APISIX local policy: the next window starts with the next request
                start, previous = now, 0.0
            current = 0.0
    used = current
    if previous:
        used += previous * (1.0 - (now - start) / window)
    reset = start + window - now
    if used + cost > limit:
        return state, (False, 0, reset)
    current += cost
    expires = start + (2.0 * window if sliding else window)
    return (expires, start, current, previous), (True, int(limit - used - cost), reset)


def bucket_step(state: State | None, now: float, rate: float, burst: float
                ) -> tuple[State | None, BucketResult]:
    """limit-req, as lua-resty-limit-req: `excess` requests wait beyond the one being
    served; it leaks `rate` a second; over `burst` the request is rejected (and not counted).
    State: (expires, excess, time of the last admitted request, unused)."""
    if state is None:
        excess = 0.0
    else:
        _, excess, last, _ = state
        excess = max(excess - rate * abs(now - last) + 1.0, 0.0)
        if excess > burst:
            return state, (False, 0.0)
    # Once (excess + 1) / rate has passed the next request computes excess 0, exactly as
    # with no state: that is when this state may be dropped.
    return (now + (excess + 1.0) / rate, excess, now, 0.0), (True, excess / rate)


def acquire_step(state: State | None, now: float, limit: int
                 ) -> tuple[State | None, ConnResult]:
    """limit-conn entry. State: (never expires while in use, count, unused, unused)."""
    count = (state[1] if state is not None else 0.0) + 1.0
    if count > limit:
        return state, (False, int(count - 1.0))
    return (INFINITY, count, 0.0, 0.0), (True, int(count))


def release_step(state: State | None, now: float) -> tuple[State | None, int]:
    """limit-conn exit; a count reaching 0 frees its slot."""
    if state is None:
        return None, 0
    count = state[1] - 1.0
    if count <= 0.0:
        return None, 0
    return (INFINITY, count, 0.0, 0.0), int(count)


class _StepStore(CounterStore):
    """The four operations expressed as steps applied by `_apply`."""

    __slots__ = ()

    def _apply(self, key: str, step: Step, *args: Any) -> Any:
        raise NotImplementedError

    def incr(self, key: str, limit: int, window: float, sliding: bool = False,
             cost: int = 1) -> CountResult:
        return self._apply(key, count_step, limit, window, sliding, cost)

    def leaky_bucket(self, key: str, rate: float, burst: float) -> BucketResult:
        return self._apply(key, bucket_step, rate, burst)

    def acquire(self, key: str, limit: int) -> ConnResult:
        return self._apply(key, acquire_step, limit)

    def release(self, key: str) -> int:
        return self._apply(key, release_step)


# -- one process -----------------------------------------------------------------------------

# The dict is swept of expired states when it doubles past this size.
IN_PROCESS_SWEEP_MIN = 4096


class InProcessStore(_StepStore):
    """Counters in a dict: exact within one process (the gateway with one worker, tests).
    Hooks run on the event loop thread, so no lock is needed."""

    __slots__ = ("_clock", "_entries", "_sweep_at")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, State] = {}
        self._sweep_at = IN_PROCESS_SWEEP_MIN

    def _apply(self, key: str, step: Step, *args: Any) -> Any:
        now = self._clock()
        entries = self._entries
        state = entries.get(key)
        if state is not None and state[0] <= now:
            state = None
        new, result = step(state, now, *args)
        if new is not state:
            if new is None:
                entries.pop(key, None)
            else:
                entries[key] = new
                if len(entries) >= self._sweep_at:
                    self._sweep(now)
        return result

    def _sweep(self, now: float) -> None:
        entries = self._entries
        for key in [key for key, state in entries.items() if state[0] <= now]:
            del entries[key]
        self._sweep_at = max(IN_PROCESS_SWEEP_MIN, 2 * len(entries))


# -- the processes of one host --------------------------------------------------------------
#
# File layout: a 64-byte header (magic, group count, ways), then `groups` groups. A group is
# 8 ways: their 64-bit key tags (one cache line), then their states (4 doubles each). A key
# lives in group `tag % groups`, in any way of it; a group is locked with an fcntl byte-range
# lock on its bytes for the whole read-modify-write, so processes serialise per group.
# fcntl locks belong to the process and the kernel drops them when it dies: a killed worker
# cannot leave a group locked.

MAGIC = b"SGLIMIT1"
HEADER = struct.Struct("<8sII")
HEADER_BYTES = 64
WAYS = 8
TAGS = struct.Struct(f"<{WAYS}Q")
TAG = struct.Struct("<Q")
RECORD = struct.Struct("<4d")
EXPIRES = struct.Struct("<d")
GROUP_BYTES = TAGS.size + WAYS * RECORD.size  # 320
# Hot-path aliases (module globals are cheaper than attribute lookups on every check).
_RECORDS = TAGS.size
_RECORD_BYTES = RECORD.size
_TAG_BYTES = TAG.size
_unpack_tags = TAGS.unpack_from
_unpack_record = RECORD.unpack_from
_pack_record = RECORD.pack_into
_pack_tag = TAG.pack_into
_lockf = fcntl.lockf
_LOCK_EX = fcntl.LOCK_EX
_LOCK_UN = fcntl.LOCK_UN
# 16384 groups: 131072 slots in 5 MiB (tmpfs fills pages as they are touched). With 16k
# live keys a group averages 1 key; the chance that any group needs a 9th way is ~2%.
DEFAULT_GROUPS = 16384
# Key -> tag memo: a blake2b costs ~0.4 µs, a dict hit ~0.05 µs. Cleared when full.
TAG_CACHE_SIZE = 65536


def key_tag(key: str) -> int:
    """A 64-bit hash of the key, the same in every process (unlike `hash`); never 0, which
    marks a free way."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


class SharedMemoryStore(_StepStore):
    """Counters in a memory-mapped file (put it on tmpfs: /dev/shm) shared by independent
    processes: every worker of a gateway opens the same file, so a limit holds for the host,
    not per worker.

    Guarantee: each operation is a read-modify-write of one slot under an exclusive lock on
    its group, so operations on a key are serialised across processes, and a limit of N
    admits exactly N in a window however requests spread over workers. This holds while no
    group has to evict a live key (9 keys live at once in one group of 8 ways; `evictions`
    counts it), in which case the state closest to expiry is dropped and its key starts
    over. All processes read the same clock (CLOCK_MONOTONIC is system-wide on Linux).
    One thread per process uses a store (fcntl locks do not exclude threads of a process).
    """

    __slots__ = ("_clock", "_fd", "_groups", "_mm", "_tags", "evictions", "path")

    def __init__(self, path: str | Path, groups: int = DEFAULT_GROUPS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if groups < 1:
            raise ValueError("groups must be >= 1")
        self.path = Path(path)
        self._clock = clock
        self._tags: dict[str, int] = {}
        self.evictions = 0
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._groups = self._prepare(fd, groups)
            self._mm = mmap.mmap(fd, HEADER_BYTES + self._groups * GROUP_BYTES)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _prepare(self, fd: int, groups: int) -> int:
        """Create the table, or join the one there (taking its size); returns its groups."""
        fcntl.lockf(fd, fcntl.LOCK_EX, HEADER_BYTES, 0)
        try:
            head = os.pread(fd, HEADER.size, 0)
            if len(head) == HEADER.size and head[:len(MAGIC)] == MAGIC:
                _, existing, ways = HEADER.unpack(head)
                size = os.fstat(fd).st_size
                if ways != WAYS or existing < 1 or \
                        size != HEADER_BYTES + existing * GROUP_BYTES:
                    raise ValueError(f"{self.path}: a counter table of another layout "
                                     f"({existing} groups of {ways} ways, {size} bytes)")
                return int(existing)
            if head.strip(b"\0"):
                raise ValueError(f"{self.path}: not a sluicegate counter table")
            # Empty, or left half-made by a process that died here (we hold the lock
            # every creator takes): zero-fill, then write the header last.
            os.ftruncate(fd, 0)
            os.ftruncate(fd, HEADER_BYTES + groups * GROUP_BYTES)
            os.pwrite(fd, HEADER.pack(MAGIC, groups, WAYS), 0)
            return groups
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, HEADER_BYTES, 0)

    @property
    def groups(self) -> int:
        return self._groups

    def _apply(self, key: str, step: Step, *args: Any) -> Any:
        tag = self._tags.get(key)
        if tag is None:
            tag = key_tag(key)
            if len(self._tags) >= TAG_CACHE_SIZE:
                self._tags.clear()
            self._tags[key] = tag
        base = HEADER_BYTES + (tag % self._groups) * GROUP_BYTES
        fd = self._fd
        mm = self._mm
        # (A signal during the wait retries it: PEP 475.)
        _lockf(fd, _LOCK_EX, GROUP_BYTES, base)
        try:
            now = self._clock()  # read under the lock: time only moves forward per key
            tags = _unpack_tags(mm, base)
            state: State | None
            try:
                way = tags.index(tag)
            except ValueError:
                way, state = -1, None
            else:
                state = _unpack_record(mm, base + _RECORDS + way * _RECORD_BYTES)
                if state[0] <= now:
                    state = None
            new, result = step(state, now, *args)
            if new is not state:
                if new is None:
                    if way >= 0:
                        _pack_tag(mm, base + way * _TAG_BYTES, 0)
                elif way >= 0:
                    _pack_record(mm, base + _RECORDS + way * _RECORD_BYTES, *new)
                else:
                    way = self._free_way(mm, base, tags, now)
                    if way < 0:
                        return result  # every way holds a count in use: not tracked
                    # State first, tag last: a process killed in between leaves a free
                    # way, never a key pointing at another key's state.
                    _pack_record(mm, base + _RECORDS + way * _RECORD_BYTES, *new)
                    _pack_tag(mm, base + way * _TAG_BYTES, tag)
        finally:
            _lockf(fd, _LOCK_UN, GROUP_BYTES, base)
        return result

    def _free_way(self, mm: mmap.mmap, base: int, tags: tuple[int, ...], now: float) -> int:
        """A way for a new key: a free one, else the state that expires first (dropping a
        live one is an eviction). -1 when all hold counts that never expire (limit-conn)."""
        if 0 in tags:
            return tags.index(0)
        best, best_expires = -1, INFINITY
        for way in range(WAYS):
            expires = EXPIRES.unpack_from(mm, base + TAGS.size + way * RECORD.size)[0]
            if expires < best_expires:
                best, best_expires = way, expires
        if best >= 0 and best_expires > now:
            self.evictions += 1
        return best

    def close(self) -> None:
        if self._fd >= 0:
            self._mm.close()
            os.close(self._fd)
            self._fd = -1


_local: CounterStore | None = None


def local_store() -> CounterStore:
    """The store of the `local` policy in this process: the host-wide table in
    `$SLUICEGATE_LIMITS_DIR/counters` when the variable is set (the supervisor sets it for
    its workers), else counters of this process alone."""
    global _local
    if _local is None:
        directory = os.environ.get(LIMITS_DIR_ENV)
        if directory:
            Path(directory).mkdir(mode=0o700, parents=True, exist_ok=True)
            _local = SharedMemoryStore(Path(directory) / TABLE_FILE)
        else:
            _local = InProcessStore()
    return _local
