"""RedisStore against a real redis-server: the same answers as the local stores give (the
Lua scripts mirror the `*_step` functions), keys that expire, and scripts that survive
Redis forgetting them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from servers.redis_server import RedisServerProcess
from sluicegate.limits.redis_store import KEY_PREFIX, RedisSettings, RedisStore


def run(server: RedisServerProcess, calls: Callable[[RedisStore], Awaitable[Any]],
        **store: Any) -> Any:
    """Run `calls(store)` on a fresh event loop with a store on `server`."""
    return asyncio.run(calls(RedisStore(RedisSettings("127.0.0.1", server.port), **store)))


def test_fixed_window_admits_exactly_the_limit_and_reports_remaining_and_reset(
        redis_server: RedisServerProcess) -> None:
    async def calls(store: RedisStore) -> list[Any]:
        return [await store.incr("k", 3, 60.0) for _ in range(5)]

    answers = run(redis_server, calls)
    assert [(allowed, remaining) for allowed, remaining, _ in answers] == [
        (True, 2), (True, 1), (True, 0), (False, 0), (False, 0)]
    assert all(59.0 < reset <= 60.0 for _, _, reset in answers)
    assert 0 < redis_server.client().pttl(KEY_PREFIX + "k") <= 60_000


def test_cost_counts_several_requests_at_once(redis_server: RedisServerProcess) -> None:
    async def calls(store: RedisStore) -> list[Any]:
        return [(await store.incr("k", 5, 60.0, cost=3))[:2] for _ in range(2)]

    assert run(redis_server, calls) == [(True, 2), (False, 0)]


def test_leaky_bucket_delays_within_the_burst_and_rejects_beyond(
        redis_server: RedisServerProcess) -> None:
    async def calls(store: RedisStore) -> list[Any]:
        return [await store.leaky_bucket("k", 1.0, 2.0) for _ in range(4)]

    answers = run(redis_server, calls)
    assert [allowed for allowed, _ in answers] == [True, True, True, False]
    # Each admitted request waits for the ones ahead of it at 1 a second (less the few
    # milliseconds between the calls).
    delays = [delay for _, delay in answers[:3]]
    assert delays[0] == 0.0
    assert 0.9 < delays[1] <= 1.0 and 1.9 < delays[2] <= 2.0
    # The bucket's key lives until it has drained: about 3 s.
    assert 2_000 < redis_server.client().pttl(KEY_PREFIX + "k") <= 3_000


def test_acquire_and_release_count_in_flight_and_free_the_key_at_zero(
        redis_server: RedisServerProcess) -> None:
    async def calls(store: RedisStore) -> list[Any]:
        return [await store.acquire("k", 2), await store.acquire("k", 2),
                await store.acquire("k", 2), await store.release("k"),
                await store.acquire("k", 2), await store.release("k"),
                await store.release("k"), await store.release("k")]

    assert run(redis_server, calls, conn_ttl=30) == [
        (True, 1), (True, 2), (False, 2), 1, (True, 2), 1, 0, 0]
    assert redis_server.client().keys("*") == []


def test_a_count_in_flight_expires_after_the_conn_ttl(
        redis_server: RedisServerProcess) -> None:
    async def calls(store: RedisStore) -> Any:
        return await store.acquire("k", 2)

    assert run(redis_server, calls, conn_ttl=30) == (True, 1)
    assert 29_000 < redis_server.client().pttl(KEY_PREFIX + "k") <= 30_000


def test_scripts_are_loaded_again_after_redis_forgets_them(
        redis_server: RedisServerProcess) -> None:
    async def calls(store: RedisStore) -> list[Any]:
        first = await store.incr("k", 5, 60.0)
        redis_server.client().script_flush()  # what a restart does to the script cache
        return [first, await store.incr("k", 5, 60.0)]

    assert [answer[:2] for answer in run(redis_server, calls)] == [(True, 4), (True, 3)]


@pytest.mark.parametrize("database", [0, 5])
def test_keys_go_to_the_configured_database(redis_server: RedisServerProcess,
                                            database: int) -> None:
    async def calls(store: RedisStore) -> Any:
        return await store.incr("k", 5, 60.0)

    settings = RedisSettings("127.0.0.1", redis_server.port, database=database)
    asyncio.run(calls(RedisStore(settings)))
    assert redis_server.client(db=database).keys("*") == [KEY_PREFIX + "k"]


def test_settings_never_show_the_password() -> None:
    settings = RedisSettings("127.0.0.1", 6379, password="hunter2")
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in repr(RedisStore(settings))


def test_calls_of_one_event_loop_turn_share_one_round_trip_and_stay_exact(
        redis_server: RedisServerProcess) -> None:
    async def calls(store: RedisStore) -> tuple[list[Any], int]:
        answers = await asyncio.gather(*(store.incr("k", 30, 60.0) for _ in range(50)))
        clients = redis_server.client().client_list()
        return list(answers), len(clients)

    before = redis_server.client().info("stats")["total_connections_received"]
    answers, _ = run(redis_server, calls)
    opened = redis_server.client().info("stats")["total_connections_received"] - before
    assert sorted(remaining for allowed, remaining, _ in answers if allowed) == list(range(30))
    assert sum(1 for allowed, _, _ in answers if not allowed) == 20
    # 50 concurrent calls went out as one pipeline on one connection (+ the two clients
    # this test opened to look).
    assert opened <= 3
