"""Counter stores: the same behaviour from the in-process store and the shared-memory table
(the reference path and the fast path run the same tests), then what only the shared table
does: several processes counting against one key exactly."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sluicegate.limits import counters
from sluicegate.limits.counters import (
    LIMITS_DIR_ENV,
    WAYS,
    InProcessStore,
    SharedMemoryStore,
    local_store,
)

SRC = Path(__file__).resolve().parents[2] / "src"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["in-process", "shared-memory"])
def make_store(request, tmp_path):
    """Factory: make_store(clock) -> a store of the parametrised kind."""
    stores = []

    def make(clock=None, **options):
        clock = clock or FakeClock()
        if request.param == "in-process":
            store = InProcessStore(clock)
        else:
            store = SharedMemoryStore(tmp_path / "counters", clock=clock, **options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


# -- limit-count: fixed window ------------------------------------------------------------


def test_fixed_window_admits_exactly_the_limit_then_rejects(make_store):
    store = make_store()
    answers = [store.incr("k", 5, 60.0) for _ in range(8)]
    assert [allowed for allowed, _, _ in answers] == [True] * 5 + [False] * 3


def test_fixed_window_reports_remaining_and_seconds_to_reset(make_store):
    clock = FakeClock()
    store = make_store(clock)
    assert store.incr("k", 3, 60.0) == (True, 2, 60.0)
    clock.now += 15
    assert store.incr("k", 3, 60.0) == (True, 1, 45.0)
    assert store.incr("k", 3, 60.0) == (True, 0, 45.0)
    assert store.incr("k", 3, 60.0) == (False, 0, 45.0)


def test_fixed_window_starts_afresh_with_the_first_request_after_it_ended(make_store):
    clock = FakeClock()
    store = make_store(clock)
    for _ in range(3):
        store.incr("k", 3, 10.0)
    clock.now += 10.0
    assert store.incr("k", 3, 10.0) == (True, 2, 10.0)  # a new window, from now


def test_keys_are_counted_apart(make_store):
    store = make_store()
    assert store.incr("a", 1, 60.0)[0] is True
    assert store.incr("a", 1, 60.0)[0] is False
    assert store.incr("b", 1, 60.0)[0] is True


# -- limit-count: sliding window ----------------------------------------------------------


def test_sliding_window_counts_the_previous_window_weighted_by_its_overlap(make_store):
    clock = FakeClock()
    store = make_store(clock)
    for _ in range(10):
        assert store.incr("k", 10, 10.0, sliding=True)[0]
    clock.now += 12.0  # 2 s into the next window: 80% of the previous one still counts
    # 10 * 0.8 = 8 used: 2 more fit
    assert store.incr("k", 10, 10.0, sliding=True) == (True, 1, 8.0)
    assert store.incr("k", 10, 10.0, sliding=True) == (True, 0, 8.0)
    assert store.incr("k", 10, 10.0, sliding=True)[0] is False
    clock.now += 5.0  # 7 s in: 10 * 0.3 + 2 = 5 used
    assert store.incr("k", 10, 10.0, sliding=True) == (True, 4, 3.0)


def test_fixed_window_allows_a_full_burst_right_after_the_boundary_sliding_does_not(
        make_store):
    clock = FakeClock()
    fixed, sliding = make_store(clock), make_store(clock)
    for _ in range(10):
        fixed.incr("fixed", 10, 10.0)
        sliding.incr("sliding", 10, 10.0, sliding=True)
    clock.now += 10.5
    fixed_admitted = sum(fixed.incr("fixed", 10, 10.0)[0] for _ in range(10))
    sliding_admitted = sum(sliding.incr("sliding", 10, 10.0, sliding=True)[0]
                           for _ in range(10))
    assert fixed_admitted == 10
    assert sliding_admitted == 0  # 10 * 0.95 = 9.5 used


def test_sliding_window_forgets_a_window_two_windows_back(make_store):
    clock = FakeClock()
    store = make_store(clock)
    for _ in range(10):
        store.incr("k", 10, 10.0, sliding=True)
    clock.now += 21.0
    assert sum(store.incr("k", 10, 10.0, sliding=True)[0] for _ in range(12)) == 10


def test_rejected_requests_do_not_count(make_store):
    clock = FakeClock()
    store = make_store(clock)
    for _ in range(50):
        store.incr("k", 4, 10.0, sliding=True)
    clock.now += 15.0  # half the previous window (4 admitted, not 50) still counts: 2
    assert sum(store.incr("k", 4, 10.0, sliding=True)[0] for _ in range(5)) == 2


# -- limit-req: leaky bucket --------------------------------------------------------------


def test_leaky_bucket_delays_each_request_by_the_excess_over_the_rate(make_store):
    store = make_store()
    answers = [store.leaky_bucket("k", 2.0, 3.0) for _ in range(5)]
    assert answers == [(True, 0.0), (True, 0.5), (True, 1.0), (True, 1.5), (False, 0.0)]


def test_leaky_bucket_leaks_at_the_rate(make_store):
    clock = FakeClock()
    store = make_store(clock)
    for _ in range(4):
        store.leaky_bucket("k", 2.0, 3.0)  # excess 3
    clock.now += 1.0  # leaks 2: excess 1 + this request
    assert store.leaky_bucket("k", 2.0, 3.0) == (True, 1.0)
    clock.now += 10.0
    assert store.leaky_bucket("k", 2.0, 3.0) == (True, 0.0)


def test_leaky_bucket_without_burst_admits_one_request_per_interval(make_store):
    clock = FakeClock()
    store = make_store(clock)
    assert store.leaky_bucket("k", 1.0, 0.0) == (True, 0.0)
    assert store.leaky_bucket("k", 1.0, 0.0)[0] is False
    clock.now += 1.0
    assert store.leaky_bucket("k", 1.0, 0.0) == (True, 0.0)


# -- limit-conn: concurrency ---------------------------------------------------------------


def test_acquire_admits_up_to_the_limit_and_release_makes_room(make_store):
    store = make_store()
    assert [store.acquire("k", 2) for _ in range(3)] == [(True, 1), (True, 2), (False, 2)]
    assert store.release("k") == 1
    assert store.acquire("k", 2) == (True, 2)
    assert store.release("k") == 1
    assert store.release("k") == 0
    assert store.release("k") == 0  # never below zero
    assert store.acquire("k", 2) == (True, 1)


def test_concurrency_counts_never_expire(make_store):
    clock = FakeClock()
    store = make_store(clock)
    store.acquire("k", 1)
    clock.now += 10 ** 7
    assert store.acquire("k", 1) == (False, 1)


# -- both stores compute the same thing -----------------------------------------------------


def test_shared_table_answers_exactly_like_the_in_process_store(tmp_path):
    clock = FakeClock()
    reference = InProcessStore(clock)
    shared = SharedMemoryStore(tmp_path / "counters", groups=4, clock=clock)
    rng = random.Random(7)
    keys = [f"key-{i}" for i in range(6)]  # 6 keys in 4 groups of 8 ways: no eviction
    try:
        for _ in range(5000):
            clock.now += rng.choice((0.0, 0.01, 0.3, 2.5))
            key = rng.choice(keys)
            operation = rng.randrange(4)
            if operation == 0:
                call = ("incr", key, 7, 5.0, rng.random() < 0.5)
            elif operation == 1:
                call = ("leaky_bucket", key + "r", 3.0, 2.0)
            elif operation == 2:
                call = ("acquire", key + "c", 3)
            else:
                call = ("release", key + "c")
            expected = getattr(reference, call[0])(*call[1:])
            assert getattr(shared, call[0])(*call[1:]) == expected, call
        assert shared.evictions == 0
    finally:
        shared.close()


# -- the shared table ------------------------------------------------------------------------


def test_two_stores_on_one_file_share_counts(tmp_path):
    first = SharedMemoryStore(tmp_path / "counters")
    second = SharedMemoryStore(tmp_path / "counters")
    try:
        assert first.incr("k", 2, 60.0)[0] is True
        assert second.incr("k", 2, 60.0)[0] is True
        assert first.incr("k", 2, 60.0)[0] is False
    finally:
        first.close()
        second.close()


def test_table_joins_an_existing_table_whatever_size_it_asks_for(tmp_path):
    first = SharedMemoryStore(tmp_path / "counters", groups=8)
    second = SharedMemoryStore(tmp_path / "counters", groups=1024)
    try:
        assert second.groups == 8
        first.incr("k", 1, 60.0)
        assert second.incr("k", 1, 60.0)[0] is False
    finally:
        first.close()
        second.close()


def test_table_refuses_a_file_that_is_not_a_counter_table(tmp_path):
    path = tmp_path / "counters"
    path.write_bytes(b"something else entirely")
    with pytest.raises(ValueError, match="not a sluicegate counter table"):
        SharedMemoryStore(path)


def test_full_group_reuses_expired_slots_before_evicting_live_ones(tmp_path):
    clock = FakeClock()
    store = SharedMemoryStore(tmp_path / "counters", groups=1, clock=clock)
    try:
        for i in range(WAYS):
            store.incr(f"old-{i}", 1, 1.0)
        clock.now += 2.0  # all expired
        for i in range(WAYS):
            store.incr(f"new-{i}", 1, 60.0)
        assert store.evictions == 0
        assert all(store.incr(f"new-{i}", 1, 60.0)[0] is False for i in range(WAYS))
        store.incr("one-too-many", 1, 60.0)
        assert store.evictions == 1
    finally:
        store.close()


def test_full_group_never_evicts_concurrency_counts(tmp_path):
    store = SharedMemoryStore(tmp_path / "counters", groups=1)
    try:
        for i in range(WAYS):
            assert store.acquire(f"conn-{i}", 1) == (True, 1)
        assert store.acquire("untracked", 1) == (True, 1)  # admitted, not counted
        assert all(store.acquire(f"conn-{i}", 1) == (False, 1) for i in range(WAYS))
    finally:
        store.close()


HAMMER = textwrap.dedent("""
    import sys, time
    from sluicegate.limits.counters import SharedMemoryStore
    path, operation, attempts = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = SharedMemoryStore(path)
    print("ready", flush=True)
    sys.stdin.readline()
    admitted = 0
    started = time.perf_counter()
    if operation == "incr":
        for _ in range(attempts):
            admitted += store.incr("limit-count|hammered|0|10.0.0.1", 25000, 3600.0)[0]
    else:
        for _ in range(attempts):
            admitted += store.acquire("limit-conn|hammered|0|10.0.0.1", 10 ** 9)[0]
            store.release("limit-conn|hammered|0|10.0.0.1")
    elapsed = time.perf_counter() - started
    print(admitted, elapsed / attempts * 1e6, flush=True)
""")


def hammer(path: Path, operation: str, attempts: int, processes: int = 2
           ) -> list[tuple[int, float]]:
    """Run `processes` processes doing `attempts` operations each on one key, all released
    at once; returns (admitted, µs per operation) per process."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    children = [subprocess.Popen([sys.executable, "-c", HAMMER, str(path), operation,
                                  str(attempts)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env)
                for _ in range(processes)]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        results = []
        for child in children:
            admitted, micros = child.stdout.readline().split()
            results.append((int(admitted), float(micros)))
            assert child.wait(30) == 0
        return results
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def test_two_processes_hammering_one_key_admit_exactly_the_limit(tmp_path):
    path = tmp_path / "counters"
    results = hammer(path, "incr", 20000)
    admitted = [count for count, _ in results]
    assert sum(admitted) == 25000, results  # 40000 attempts, limit 25000
    store = SharedMemoryStore(path)
    try:
        assert store.incr("limit-count|hammered|0|10.0.0.1", 25000, 3600.0)[0] is False
    finally:
        store.close()


def test_two_processes_acquiring_and_releasing_leave_the_count_at_zero(tmp_path):
    path = tmp_path / "counters"
    results = hammer(path, "acquire", 10000)
    assert [count for count, _ in results] == [10000, 10000]
    store = SharedMemoryStore(path)
    try:
        assert store.acquire("limit-conn|hammered|0|10.0.0.1", 1) == (True, 1)
    finally:
        store.close()


# -- which store the local policy uses ------------------------------------------------------


def test_local_policy_uses_the_shared_table_when_the_limits_dir_is_set(tmp_path, monkeypatch):
    monkeypatch.setattr(counters, "_local", None)
    monkeypatch.setenv(LIMITS_DIR_ENV, str(tmp_path / "limits"))
    store = local_store()
    try:
        assert isinstance(store, SharedMemoryStore)
        assert store.path == tmp_path / "limits" / "counters"
        assert local_store() is store
    finally:
        store.close()
        monkeypatch.setattr(counters, "_local", None)


def test_local_policy_counts_in_process_without_a_limits_dir(monkeypatch):
    monkeypatch.setattr(counters, "_local", None)
    monkeypatch.delenv(LIMITS_DIR_ENV, raising=False)
    assert isinstance(local_store(), InProcessStore)
    monkeypatch.setattr(counters, "_local", None)
