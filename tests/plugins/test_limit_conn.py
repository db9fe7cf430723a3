"""limit-conn: requests in flight counted up in access and down in log, over a request
context, then through a running gateway with two workers and a slow upstream."""

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
from sluicegate.plugins.limit_conn import LimitConn

PATH = "routes[0].plugins.limit-conn"


def make_ctx(remote="192.0.2.9"):
    return RequestContext("GET", "/items", "", [(b"Host", b"gw.example")], "gw.example",
                          (remote, 40000), ("10.0.0.1", 9080), "1.1")


def plugin(store=None, **conf):
    conf = {"default_conn_delay": 0.05, **conf}
    model, _, errors = validate_plugin("limit-conn", conf, PATH)
    assert errors == []
    instance = LimitConn(model, PluginEnv())
    instance.store = store if store is not None else InProcessStore()
    return instance


def errors_of(conf):
    return validate_plugin("limit-conn", conf, PATH)[2]


def settle(result):
    """What a hook's result comes to: the response (or None), and the seconds it took."""
    started = time.monotonic()
    if inspect.isawaitable(result):
        async def wait():
            return await result
        result = asyncio.run(wait())
    return result, time.monotonic() - started


# -- config -------------------------------------------------------------------------------


def test_limit_conn_config_errors_name_the_field():
    base = {"conn": 1, "burst": 0, "default_conn_delay": 0.1}
    assert errors_of({**base, "conn": 0}) == [f"{PATH}.conn: must be > 0"]
    assert errors_of({**base, "burst": -1}) == [f"{PATH}.burst: must be >= 0"]
    assert errors_of({**base, "default_conn_delay": 0}) == [
        f"{PATH}.default_conn_delay: must be > 0"]
    assert errors_of({"conn": 1, "burst": 0}) == [f"{PATH}.default_conn_delay: Field required"]
    assert errors_of({**base, "key_type": "var_combination", "key": "x"})[0].startswith(
        f"{PATH}.key: 'x' has no $variable")


def test_limit_conn_defaults_are_apisix_defaults():
    model, _, _ = validate_plugin("limit-conn", {"conn": 1, "burst": 0,
                                                 "default_conn_delay": 0.1}, PATH)
    assert (model.only_use_default_delay, model.rejected_code, model.key) == (
        False, 503, "remote_addr")
    assert LimitConn.priority == 1003


# -- hooks --------------------------------------------------------------------------------


def test_limit_conn_rejects_requests_beyond_conn_plus_burst_while_others_are_in_flight():
    limit = plugin(conn=1, burst=1, only_use_default_delay=True)
    first, second, third = make_ctx(), make_ctx(), make_ctx()
    assert limit.access(first) is None
    result, took = settle(limit.access(second))  # over conn, within burst: delayed
    assert result is None
    assert took >= 0.045
    rejected = limit.access(third)
    assert rejected.status == 503
    assert json.loads(rejected.body) == {"error_msg": "503 Service Unavailable"}


def test_limit_conn_log_gives_the_place_back():
    limit = plugin(conn=1, burst=0)
    first = make_ctx()
    assert limit.access(first) is None
    assert limit.access(make_ctx()).status == 503
    limit.log(first)
    assert limit.access(make_ctx()) is None


def test_limit_conn_log_of_a_rejected_request_gives_nothing_back():
    limit = plugin(conn=1, burst=0)
    assert limit.access(make_ctx()) is None
    rejected = make_ctx()
    assert limit.access(rejected).status == 503
    limit.log(rejected)  # the data plane runs log hooks for every request
    assert limit.access(make_ctx()).status == 503


def test_limit_conn_counts_each_client_address_apart():
    limit = plugin(conn=1, burst=0)
    assert limit.access(make_ctx("192.0.2.1")) is None
    assert limit.access(make_ctx("192.0.2.2")) is None
    assert limit.access(make_ctx("192.0.2.1")).status == 503


def test_limit_conn_rejects_with_rejected_code_and_msg():
    limit = plugin(conn=1, burst=0, rejected_code=429, rejected_msg="one at a time")
    limit.access(make_ctx())
    rejected = limit.access(make_ctx())
    assert (rejected.status, json.loads(rejected.body)) == (429, {"error_msg": "one at a time"})


def test_limit_conn_unit_delay_follows_request_latency_unless_only_default_delay():
    adaptive = plugin(conn=1, burst=1, default_conn_delay=1.0)
    fixed = plugin(conn=1, burst=1, default_conn_delay=1.0, only_use_default_delay=True)
    for limit in (adaptive, fixed):
        ctx = make_ctx()
        limit.access(ctx)
        limit.log(ctx)  # a request of ~0 s
    assert adaptive.unit_delay < 0.6  # (1.0 + ~0) / 2
    assert fixed.unit_delay == 1.0


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
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.fixture
def gateway_with(echo, start_gateway, tmp_path, monkeypatch):
    """gateway_with(limit-conn conf) -> a gateway with two workers sharing one count."""
    # Until the supervisor creates the table's directory for its workers, give it one.
    monkeypatch.setenv(LIMITS_DIR_ENV, str(tmp_path / "limits"))

    def start(**conf):
        gateway = start_gateway({"routes": [{
            "id": "r1", "uri": "/*", "upstream": {"nodes": {echo.address: 1}},
            "plugins": {"limit-conn": conf}}]}, workers=2)
        wait_for_workers(gateway, 2)
        return gateway

    return start


def test_limit_conn_rejects_over_conn_plus_burst_with_a_slow_upstream_across_workers(
        gateway_with):
    gateway = gateway_with(conn=2, burst=1, default_conn_delay=0.1,
                           only_use_default_delay=True)
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: get(gateway, "/slow?delay=1.5"), range(8)))
    assert sorted(codes) == [200] * 3 + [503] * 5
    # All finished: every place was given back, in whichever worker took it.
    with ThreadPoolExecutor(3) as pool:
        codes = list(pool.map(lambda _: get(gateway, "/fast"), range(3)))
    assert codes == [200] * 3
