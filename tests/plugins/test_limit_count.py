"""limit-count: the plugin's hooks over a request context, then a running gateway with two
workers counting against one limit."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sluicegate.config.load import ConfigError, validate_config
from sluicegate.http.context import RequestContext
from sluicegate.limits.counters import LIMITS_DIR_ENV, InProcessStore
from sluicegate.plugins.base import PluginEnv, validate_plugin
from sluicegate.plugins.limit_count import LimitCount

PATH = "routes[0].plugins.limit-count"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_ctx(remote="192.0.2.9", headers=(), query=""):
    raw = [(b"Host", b"gw.example"), *[(k.encode(), v.encode()) for k, v in headers]]
    return RequestContext("GET", "/items", query, raw, "gw.example", (remote, 40000),
                          ("10.0.0.1", 9080), "1.1")


def plugin(env=None, store=None, **conf):
    model, _, errors = validate_plugin("limit-count", conf, PATH)
    assert errors == []
    instance = LimitCount(model, env or PluginEnv())
    instance.store = store or InProcessStore()
    return instance


def errors_of(conf):
    return validate_plugin("limit-count", conf, PATH)[2]


def statuses(limit, requests):
    """Status of each request (None when admitted) through one plugin instance."""
    out = []
    for ctx in requests:
        response = limit.access(ctx)
        out.append(None if response is None else response.status)
    return out


def quota_headers(limit, ctx, upstream_headers=()):
    ctx.response_status = 200
    ctx.response_headers = list(upstream_headers)
    ctx.merge_added_headers()  # what the exchange does with every response head
    return {name: value for name, value in ctx.response_headers
            if name.startswith("X-RateLimit")}


# -- config -------------------------------------------------------------------------------


def test_limit_count_config_errors_name_the_field():
    assert errors_of({"count": 0, "time_window": 60}) == [f"{PATH}.count: must be > 0"]
    assert errors_of({"count": 5, "time_window": -1}) == [f"{PATH}.time_window: must be > 0"]
    assert errors_of({"count": 5}) == [f"{PATH}.time_window: Field required"]
    assert errors_of({"count": 5, "time_window": 60, "rejected_code": 700}) == [
        f"{PATH}.rejected_code: must be between 200 and 599"]
    assert errors_of({"count": 5, "time_window": 60, "window_type": "rolling"})[0].startswith(
        f"{PATH}.window_type: ")


def test_limit_count_refuses_an_unknown_policy_with_a_clear_reason():
    errors = errors_of({"count": 5, "time_window": 60, "policy": "memcached"})
    assert len(errors) == 1
    assert errors[0].startswith(f"{PATH}.policy: 'memcached' is not supported: use 'local'")


def test_limit_count_refuses_a_key_that_cannot_work_with_its_key_type():
    assert errors_of({"count": 5, "time_window": 60, "key": "$remote_addr"})[0].startswith(
        f"{PATH}.key: '$remote_addr' is not a variable name")
    assert errors_of({"count": 5, "time_window": 60, "key_type": "var_combination",
                      "key": "remote_addr"})[0].startswith(f"{PATH}.key: 'remote_addr' has no")


def test_limit_count_config_error_in_a_full_config_has_the_route_path():
    config = {"routes": [{"id": "r1", "uri": "/*", "upstream": {"nodes": {"127.0.0.1:1": 1}},
                          "plugins": {"limit-count": {"count": 0, "time_window": 60}}}]}
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    assert "routes[0].plugins.limit-count.count: must be > 0" in caught.value.errors


def test_limit_count_defaults_are_apisix_defaults():
    model, _, _ = validate_plugin("limit-count", {"count": 1, "time_window": 1}, PATH)
    assert (model.key_type, model.key, model.rejected_code, model.window_type,
            model.show_limit_quota_header, model.policy) == (
        "var", "remote_addr", 503, "fixed", True, "local")
    assert LimitCount.priority == 1002


# -- counting -----------------------------------------------------------------------------


def test_limit_count_rejects_requests_beyond_count_with_503():
    limit = plugin(count=3, time_window=60)
    assert statuses(limit, [make_ctx() for _ in range(5)]) == [None, None, None, 503, 503]
    rejected = limit.access(make_ctx())
    assert json.loads(rejected.body) == {"error_msg": "503 Service Unavailable"}
    assert ("Content-Type", "application/json") in rejected.headers


def test_limit_count_rejects_with_rejected_code_and_rejected_msg():
    limit = plugin(count=1, time_window=60, rejected_code=429, rejected_msg="slow down")
    limit.access(make_ctx())
    rejected = limit.access(make_ctx())
    assert rejected.status == 429
    assert json.loads(rejected.body) == {"error_msg": "slow down"}


def test_limit_count_admits_again_when_the_window_has_passed():
    clock = FakeClock()
    limit = plugin(store=InProcessStore(clock), count=2, time_window=10)
    assert statuses(limit, [make_ctx() for _ in range(3)]) == [None, None, 503]
    clock.now += 10
    assert statuses(limit, [make_ctx() for _ in range(3)]) == [None, None, 503]


def test_limit_count_counts_each_client_address_by_default():
    limit = plugin(count=1, time_window=60)
    assert statuses(limit, [make_ctx("192.0.2.1"), make_ctx("192.0.2.2"),
                            make_ctx("192.0.2.1")]) == [None, None, 503]


def test_limit_count_key_var_counts_by_a_header_and_falls_back_to_the_address():
    limit = plugin(count=1, time_window=60, key="http_x_api_key")
    assert statuses(limit, [
        make_ctx("192.0.2.1", [("X-Api-Key", "a")]),
        make_ctx("192.0.2.2", [("X-Api-Key", "a")]),  # same key, another address
        make_ctx("192.0.2.1", [("X-Api-Key", "b")]),
        make_ctx("192.0.2.1"),  # no header: counted by address
        make_ctx("192.0.2.1"),
    ]) == [None, 503, None, None, 503]


def test_limit_count_key_var_combination_counts_by_several_variables():
    limit = plugin(count=1, time_window=60, key_type="var_combination",
                   key="$remote_addr ${arg_user}")
    assert statuses(limit, [
        make_ctx("192.0.2.1", query="user=jack"),
        make_ctx("192.0.2.1", query="user=rose"),
        make_ctx("192.0.2.2", query="user=jack"),
        make_ctx("192.0.2.1", query="user=jack"),
    ]) == [None, None, None, 503]


def test_limit_count_key_constant_counts_every_request_together():
    limit = plugin(count=2, time_window=60, key_type="constant", key="everyone")
    assert statuses(limit, [make_ctx(f"192.0.2.{i}") for i in range(1, 4)]) == [
        None, None, 503]


def test_limit_count_sliding_window_weights_the_previous_window():
    clock = FakeClock()
    limit = plugin(store=InProcessStore(clock), count=4, time_window=10,
                   window_type="sliding")
    assert statuses(limit, [make_ctx() for _ in range(4)]) == [None] * 4
    clock.now += 12.5  # 75% of the previous window overlaps: 3 of 4 used
    assert statuses(limit, [make_ctx() for _ in range(2)]) == [None, 503]


def test_limit_count_routes_with_the_same_config_count_apart():
    env, store = PluginEnv(), InProcessStore()
    first = plugin(env, store, count=1, time_window=60)
    second = plugin(env, store, count=1, time_window=60)
    assert statuses(first, [make_ctx()]) == [None]
    assert statuses(second, [make_ctx()]) == [None]


def test_limit_count_group_shares_one_counter_between_routes():
    env, store = PluginEnv(), InProcessStore()
    first = plugin(env, store, count=1, time_window=60, group="shared")
    second = plugin(env, store, count=1, time_window=60, group="shared")
    assert statuses(first, [make_ctx()]) == [None]
    assert statuses(second, [make_ctx()]) == [503]


def test_limit_count_workers_compiling_the_same_config_use_the_same_counter_keys():
    # Each worker builds its snapshot from the same file: the n-th limit of a config in
    # one worker is the n-th in the other, so they share its counter in the shared table.
    worker_a, worker_b = PluginEnv(), PluginEnv()
    a_routes = [plugin(worker_a, count=5, time_window=60) for _ in range(2)]
    b_routes = [plugin(worker_b, count=5, time_window=60) for _ in range(2)]
    ctx = make_ctx()
    assert [p.key_of(ctx) for p in a_routes] == [p.key_of(ctx) for p in b_routes]
    assert a_routes[0].key_of(ctx) != a_routes[1].key_of(ctx)
    changed = plugin(PluginEnv(), count=6, time_window=60)
    assert changed.key_of(ctx) != a_routes[0].key_of(ctx)  # a changed limit starts afresh


# -- headers ------------------------------------------------------------------------------


def test_limit_count_sends_limit_remaining_and_reset_headers():
    clock = FakeClock()
    limit = plugin(store=InProcessStore(clock), count=3, time_window=60)
    ctx = make_ctx()
    limit.access(ctx)
    assert quota_headers(limit, ctx) == {"X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "2",
                                         "X-RateLimit-Reset": "60"}
    clock.now += 20.5
    ctx = make_ctx()
    limit.access(ctx)
    assert quota_headers(limit, ctx, [("X-RateLimit-Limit", "999")]) == {
        "X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "1", "X-RateLimit-Reset": "40"}


def test_limit_count_sends_the_headers_with_a_rejection_too():
    limit = plugin(count=1, time_window=60)
    limit.access(make_ctx())
    ctx = make_ctx()
    assert limit.access(ctx).status == 503
    assert quota_headers(limit, ctx)["X-RateLimit-Remaining"] == "0"


def test_limit_count_without_quota_headers_adds_no_headers():
    limit = plugin(count=1, time_window=60, show_limit_quota_header=False)
    assert not hasattr(limit, "header_filter")  # responses keep their raw head
    ctx = make_ctx()
    limit.access(ctx)
    assert quota_headers(limit, ctx) == {}


# -- a counter store that does I/O (Redis) drops in ----------------------------------------


class AwaitingStore(InProcessStore):
    """The in-process store answering through awaitables, as a network store does."""

    def incr(self, *args, **kwargs):
        result = super().incr(*args, **kwargs)

        async def later():
            await asyncio.sleep(0)
            return result

        return later()


def test_limit_count_accepts_a_store_that_answers_with_awaitables():
    limit = plugin(store=AwaitingStore(), count=1, time_window=60)

    async def run():
        return [await limit.access(make_ctx()) for _ in range(2)]

    admitted, rejected = asyncio.run(run())
    assert admitted is None
    assert rejected.status == 503


# -- through a running gateway -------------------------------------------------------------


def wait_for_workers(gateway, count, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = gateway.log()
        if all(f"worker {index} (pid" in log for index in range(count)):
            return
        time.sleep(0.05)
    raise AssertionError(f"workers not serving:\n{gateway.log()}")


def get(gateway, path):
    """One request on a new connection (so the kernel spreads them over the workers)."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def get_many(gateway, paths, concurrency=32):
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda path: get(gateway, path), paths))


@pytest.fixture
def two_workers(start_gateway, tmp_path, monkeypatch):
    """start(config) -> a gateway with two workers sharing one counter table (the
    supervisor creates it: nothing is set here, so this checks that wiring too)."""
    monkeypatch.delenv(LIMITS_DIR_ENV, raising=False)

    def start(config):
        gateway = start_gateway(config, workers=2)
        wait_for_workers(gateway, 2)
        return gateway

    return start


def limited_route(echo, uri="/*", route_id="r1", **conf):
    return {"id": route_id, "uri": uri, "upstream": {"nodes": {echo.address: 1}},
            "plugins": {"limit-count": conf}}


def test_limit_count_admits_exactly_count_across_two_workers(echo, two_workers):
    gateway = two_workers({"routes": [limited_route(echo, count=40, time_window=60)]})
    replies = get_many(gateway, [f"/n/{i}" for i in range(120)])
    codes = [status for status, _, _ in replies]
    assert codes.count(200) == 40, codes
    assert codes.count(503) == 80, codes
    # One counter, not one per worker: each remaining value was handed out once.
    remaining = sorted(int(headers["X-RateLimit-Remaining"]) for status, headers, _ in replies
                       if status == 200)
    assert remaining == list(range(40))
    for status, headers, body in replies:
        assert headers["X-RateLimit-Limit"] == "40"
        assert 0 < int(headers["X-RateLimit-Reset"]) <= 60
        if status == 503:
            assert headers["X-RateLimit-Remaining"] == "0"
            assert json.loads(body) == {"error_msg": "503 Service Unavailable"}


def test_limit_count_fixed_window_refills_at_the_boundary_and_sliding_does_not(
        echo, two_workers):
    gateway = two_workers({"routes": [
        limited_route(echo, "/fixed", "fixed", count=5, time_window=3),
        limited_route(echo, "/sliding", "sliding", count=5, time_window=3,
                      window_type="sliding")]})
    started = time.monotonic()
    first = get_many(gateway, ["/fixed"] * 8 + ["/sliding"] * 8)
    for replies in (first[:8], first[8:]):
        assert sorted(status for status, _, _ in replies) == [200] * 5 + [503] * 3
    time.sleep(max(0.0, started + 3.4 - time.monotonic()))
    second = get_many(gateway, ["/fixed"] * 8 + ["/sliding"] * 8)
    fixed = [status for status, _, _ in second[:8]]
    sliding = [status for status, _, _ in second[8:]]
    assert fixed.count(200) == 5  # a new window: a full count again
    # The previous window still weighs ~85%: at most what has slid out of it fits.
    assert sliding.count(200) < 5, sliding
