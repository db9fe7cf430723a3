"""limit-req: the leaky bucket over a request context, then through a running gateway with
two workers (delays asserted only as lower bounds)."""

from __future__ import annotations

import asyncio
import http.client
import inspect
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sluicegate.http.context import RequestContext
from sluicegate.limits.counters import LIMITS_DIR_ENV, InProcessStore
from sluicegate.plugins.base import PluginEnv, validate_plugin
from sluicegate.plugins.limit_req import LimitReq

PATH = "routes[0].plugins.limit-req"


def make_ctx(remote="192.0.2.9", headers=()):
    raw = [(b"Host", b"gw.example"), *[(k.encode(), v.encode()) for k, v in headers]]
    return RequestContext("GET", "/items", "", raw, "gw.example", (remote, 40000),
                          ("10.0.0.1", 9080), "1.1")


def plugin(store=None, **conf):
    model, _, errors = validate_plugin("limit-req", conf, PATH)
    assert errors == []
    instance = LimitReq(model, PluginEnv())
    instance.store = store if store is not None else InProcessStore()
    return instance


def errors_of(conf):
    return validate_plugin("limit-req", conf, PATH)[2]


def settle(result):
    """What a hook's result comes to: the response (or None), and the seconds it took."""
    started = time.monotonic()
    if inspect.isawaitable(result):
        async def wait():
            return await result
        result = asyncio.run(wait())
    return result, time.monotonic() - started


# -- config -------------------------------------------------------------------------------


def test_limit_req_config_errors_name_the_field():
    assert errors_of({"rate": 0, "burst": 1}) == [f"{PATH}.rate: must be > 0"]
    assert errors_of({"rate": 1, "burst": -1}) == [f"{PATH}.burst: must be >= 0"]
    assert errors_of({"rate": 1}) == [f"{PATH}.burst: Field required"]
    assert errors_of({"rate": 1, "burst": 0, "policy": "redis-cluster"})[0].startswith(
        f"{PATH}.policy: 'redis-cluster' is not supported")


def test_limit_req_defaults_are_apisix_defaults():
    model, _, _ = validate_plugin("limit-req", {"rate": 1, "burst": 0}, PATH)
    assert (model.nodelay, model.rejected_code, model.key_type, model.key) == (
        False, 503, "var", "remote_addr")
    assert LimitReq.priority == 1001


# -- hooks --------------------------------------------------------------------------------


def test_limit_req_delays_a_request_within_the_burst_to_match_the_rate():
    limit = plugin(rate=20, burst=2)
    assert limit.access(make_ctx()) is None  # the first passes at once
    result, took = settle(limit.access(make_ctx()))
    assert result is None
    assert took >= 0.045  # 1 / 20 s, less timer slack


def test_limit_req_nodelay_lets_a_request_within_the_burst_pass_at_once():
    limit = plugin(rate=20, burst=2, nodelay=True)
    assert [limit.access(make_ctx()) for _ in range(3)] == [None, None, None]


def test_limit_req_rejects_beyond_the_burst_with_rejected_code_and_msg():
    limit = plugin(rate=1, burst=1, nodelay=True, rejected_code=429, rejected_msg="too fast")
    limit.access(make_ctx())
    limit.access(make_ctx())
    rejected = limit.access(make_ctx())
    assert rejected.status == 429
    assert json.loads(rejected.body) == {"error_msg": "too fast"}


def test_limit_req_counts_each_key_in_its_own_bucket():
    limit = plugin(rate=1, burst=0, key="http_x_user")
    assert limit.access(make_ctx(headers=[("X-User", "jack")])) is None
    assert limit.access(make_ctx(headers=[("X-User", "rose")])) is None
    assert limit.access(make_ctx(headers=[("X-User", "jack")])).status == 503


# -- through a running gateway -------------------------------------------------------------


def wait_for_workers(gateway, count, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = gateway.log()
        if all(f"worker {index} (pid" in log for index in range(count)):
            return
        time.sleep(0.05)
    raise AssertionError(f"workers not serving:\n{gateway.log()}")


def timed_get(gateway, path="/"):
    """(status, seconds) of one request on a new connection."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status, time.monotonic() - started
    finally:
        connection.close()


@pytest.fixture
def gateway_with(echo, start_gateway, tmp_path, monkeypatch):
    """gateway_with(limit-req conf) -> a gateway with two workers sharing one bucket."""
    # Until the supervisor creates the table's directory for its workers, give it one.
    monkeypatch.setenv(LIMITS_DIR_ENV, str(tmp_path / "limits"))

    def start(**conf):
        gateway = start_gateway({"routes": [{
            "id": "r1", "uri": "/*", "upstream": {"nodes": {echo.address: 1}},
            "plugins": {"limit-req": {"key_type": "constant", "key": "all", **conf}}}]},
            workers=2)
        wait_for_workers(gateway, 2)
        return gateway

    return start


def test_limit_req_delays_a_concurrent_burst_to_the_rate_across_workers(gateway_with):
    gateway = gateway_with(rate=2, burst=3)
    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(lambda _: timed_get(gateway), range(5)))
    admitted = sorted(took for status, took in replies if status == 200)
    assert sorted(status for status, _ in replies) == [200] * 4 + [503]
    # Served at 0, 0.5, 1.0 and 1.5 s: the last waited at least 1.5 s (less timer slack).
    assert admitted[-1] >= 1.4
    assert admitted[-2] >= 0.9


def test_limit_req_without_nodelay_paces_back_to_back_requests_instead_of_rejecting(
        gateway_with):
    gateway = gateway_with(rate=2, burst=1)
    started = time.monotonic()
    codes = [timed_get(gateway)[0] for _ in range(4)]
    assert codes == [200] * 4
    assert time.monotonic() - started >= 1.4  # 3 waits of 0.5 s


def test_limit_req_nodelay_admits_the_burst_and_rejects_back_to_back_requests_beyond_it(
        gateway_with):
    gateway = gateway_with(rate=1, burst=2, nodelay=True)
    codes = [timed_get(gateway)[0] for _ in range(5)]
    assert codes == [200, 200, 200, 503, 503]
