"""The `redis` policy of limit-count, limit-req and limit-conn, through real gateway
processes and a real redis-server: limits exact across gateways sharing one Redis, what a
Redis outage does (allow_degradation), Redis authentication, and the config errors."""

from __future__ import annotations

import http.client
import json
import math
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from harness import EchoUpstream, Gateway, free_port, wait_for_port
from servers.redis_server import RedisServerProcess
from sluicegate.config.load import ConfigError, validate_config

Reply = tuple[int, dict[str, str], bytes]
STORE_ERRORS = "sluicegate_limit_store_errors_total"


def redis_policy(server: RedisServerProcess, **options: Any) -> dict[str, Any]:
    # A generous timeout: on a loaded test machine a 1 s answer is possible, and a timed-out
    # call would be counted as a store failure, not as the limit deciding.
    return {"policy": "redis", "redis_host": "127.0.0.1", "redis_port": server.port,
            "redis_timeout": 5000, **options}


def limited(echo: EchoUpstream, plugin: str, conf: dict[str, Any], uri: str = "/*",
            route_id: str = "r1") -> dict[str, Any]:
    return {"id": route_id, "uri": uri, "upstream": {"nodes": {echo.address: 1}},
            "plugins": {plugin: conf}}


def with_metrics(*routes: dict[str, Any]) -> dict[str, Any]:
    """A config of these routes with /metrics served (prometheus enabled)."""
    return {"global_rules": [{"id": "metrics", "plugins": {"prometheus": {}}}],
            "routes": list(routes)}


def get(gateway: Gateway, path: str, headers: dict[str, str] | None = None) -> Reply:
    """One request on a new connection."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=15)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def spread(gateways: list[Gateway], path: str, requests: int,
           concurrency: int = 32) -> list[Reply]:
    """`requests` concurrent requests, alternating between the gateways."""
    targets = [gateways[i % len(gateways)] for i in range(requests)]
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda gateway: get(gateway, path), targets))


def codes(replies: list[Reply]) -> list[int]:
    return [status for status, _, _ in replies]


def store_errors(gateway: Gateway, plugin: str, outcome: str) -> float:
    wait_for_port(gateway.metrics_port, process=gateway.process)
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == STORE_ERRORS and sample.labels == {"plugin": plugin,
                                                                    "outcome": outcome})


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"not {what} after {timeout}s")


@pytest.fixture
def two_gateways(start_gateway: Callable[..., Gateway]) -> Callable[[dict[str, Any]],
                                                                     list[Gateway]]:
    """start(config) -> two separate gateway processes (one worker each) with it: two
    nodes of a cluster, sharing nothing but the Redis server in the config."""

    def start(config: dict[str, Any]) -> list[Gateway]:
        return [start_gateway(config), start_gateway(config)]

    return start


# -- exact across gateways -----------------------------------------------------------------


def test_limit_count_admits_exactly_count_in_total_across_two_gateways(
        echo: EchoUpstream, redis_server: RedisServerProcess, two_gateways: Any) -> None:
    conf = redis_policy(redis_server, count=40, time_window=60, rejected_code=429)
    gateways = two_gateways({"routes": [limited(echo, "limit-count", conf)]})
    replies = spread(gateways, "/n", 120)
    assert codes(replies).count(200) == 40, codes(replies)
    assert codes(replies).count(429) == 80, codes(replies)
    # One counter for the cluster: each remaining value was handed out once, by either node.
    remaining = sorted(int(headers["X-RateLimit-Remaining"])
                       for status, headers, _ in replies if status == 200)
    assert remaining == list(range(40))
    for status, headers, _ in replies:
        assert headers["X-RateLimit-Limit"] == "40"
        assert 0 < int(headers["X-RateLimit-Reset"]) <= 60
        if status == 429:
            assert headers["X-RateLimit-Remaining"] == "0"


def test_redis_policy_keeps_one_expiring_key_per_limit_key_in_the_configured_database(
        echo: EchoUpstream, redis_server: RedisServerProcess, two_gateways: Any) -> None:
    conf = redis_policy(redis_server, redis_database=2, count=5, time_window=30,
                        key="http_x_user")
    gateways = two_gateways({"routes": [limited(echo, "limit-count", conf)]})
    for gateway in gateways:
        for user in ("alice", "bob"):
            assert get(gateway, "/", {"X-User": user})[0] == 200
    client = redis_server.client(db=2)
    keys = sorted(client.keys("*"))
    # Per user, not per node; every key expires with its window.
    assert len(keys) == 2, keys
    assert keys[0].endswith("|alice") and keys[1].endswith("|bob")
    assert all(0 < client.pttl(key) <= 30_000 for key in keys)
    assert redis_server.client(db=0).keys("*") == []


def test_limit_count_sliding_window_across_two_gateways_still_weighs_the_previous_window(
        echo: EchoUpstream, redis_server: RedisServerProcess, two_gateways: Any) -> None:
    gateways = two_gateways({"routes": [
        limited(echo, "limit-count", redis_policy(redis_server, count=10, time_window=3),
                "/fixed", "fixed"),
        limited(echo, "limit-count", redis_policy(redis_server, count=10, time_window=3,
                                                  window_type="sliding"),
                "/sliding", "sliding")]})
    started = time.monotonic()
    for path in ("/fixed", "/sliding"):
        assert sorted(codes(spread(gateways, path, 16))) == [200] * 10 + [503] * 6
    time.sleep(max(0.0, started + 3.4 - time.monotonic()))
    fixed = codes(spread(gateways, "/fixed", 16))
    sliding = codes(spread(gateways, "/sliding", 16))
    assert fixed.count(200) == 10  # a new window: a full count again
    # The previous window (10 counted by both nodes) still weighs most of its count.
    assert sliding.count(200) < 10 // 2, sliding


def test_limit_req_keeps_the_rate_across_two_gateways(
        echo: EchoUpstream, redis_server: RedisServerProcess, two_gateways: Any) -> None:
    conf = redis_policy(redis_server, rate=1, burst=3, nodelay=True, rejected_code=429)
    gateways = two_gateways({"routes": [limited(echo, "limit-req", conf)]})
    started = time.monotonic()
    statuses = codes(spread(gateways, "/", 30))
    elapsed = time.monotonic() - started
    # One bucket for both nodes: the burst plus the one being served, plus what leaked
    # (1 a second) while the requests arrived; a bucket per node would admit twice that.
    admitted = statuses.count(200)
    assert 4 <= admitted <= 4 + math.ceil(elapsed), (statuses, elapsed)
    assert statuses.count(429) == 30 - admitted


def test_limit_conn_bounds_requests_in_flight_across_two_gateways_and_gives_them_back(
        echo: EchoUpstream, redis_server: RedisServerProcess, two_gateways: Any) -> None:
    conf = redis_policy(redis_server, conn=2, burst=0, default_conn_delay=0.1,
                        rejected_code=429)
    gateways = two_gateways({"routes": [limited(echo, "limit-conn", conf)]})
    # Slow requests: all 8 arrive while the first 2 admitted are still in flight.
    statuses = codes(spread(gateways, "/slow?delay=3", 8))
    assert sorted(statuses) == [200] * 2 + [429] * 6, statuses
    client = redis_server.client()
    # Released after the responses: the count drops to 0 and its key is deleted.
    wait_until(lambda: client.keys("*") == [], "released")
    assert codes(spread(gateways, "/", 2)) == [200, 200]


def test_limit_conn_count_in_redis_expires_after_key_ttl(
        echo: EchoUpstream, redis_server: RedisServerProcess,
        start_gateway: Callable[..., Gateway]) -> None:
    conf = redis_policy(redis_server, conn=5, burst=0, default_conn_delay=0.1, key_ttl=30)
    gateway = start_gateway({"routes": [limited(echo, "limit-conn", conf)]})
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(get, gateway, "/slow?delay=2")
        client = redis_server.client()
        wait_until(lambda: bool(client.keys("*")), "counted")
        # A count a crashed gateway never gives back frees itself after key_ttl.
        (key,) = client.keys("*")
        assert 0 < client.pttl(key) <= 30_000
        assert slow.result()[0] == 200


# -- Redis goes away -----------------------------------------------------------------------


def test_redis_down_with_allow_degradation_lets_requests_pass_and_counts_them(
        echo: EchoUpstream, redis_server: RedisServerProcess,
        start_gateway: Callable[..., Gateway]) -> None:
    conf = redis_policy(redis_server, count=3, time_window=60, rejected_code=429,
                        allow_degradation=True)
    gateway = start_gateway(with_metrics(limited(echo, "limit-count", conf)))
    assert [get(gateway, "/")[0] for _ in range(4)] == [200, 200, 200, 429]
    redis_server.kill()
    # Over the limit, but the limit cannot be checked: they pass, without quota headers.
    replies = [get(gateway, "/") for _ in range(10)]
    assert codes(replies) == [200] * 10
    assert all("X-RateLimit-Remaining" not in headers for _, headers, _ in replies)
    assert store_errors(gateway, "limit-count", "allowed") == 10
    assert store_errors(gateway, "limit-count", "rejected") == 0
    redis_server.start()  # back, empty: a fresh window of 3

    def limited_again() -> bool:
        return get(gateway, "/")[0] == 429

    wait_until(limited_again, "limiting again")


@pytest.mark.parametrize(("plugin", "conf", "message"), [
    ("limit-count", {"count": 100, "time_window": 60}, "failed to limit count"),
    ("limit-req", {"rate": 100, "burst": 100}, "failed to limit req"),
    ("limit-conn", {"conn": 100, "burst": 0, "default_conn_delay": 0.1},
     "failed to limit conn"),
])
def test_redis_down_without_allow_degradation_answers_503_until_it_is_back(
        echo: EchoUpstream, redis_server: RedisServerProcess,
        start_gateway: Callable[..., Gateway], plugin: str, conf: dict[str, Any],
        message: str) -> None:
    gateway = start_gateway(with_metrics(limited(echo, plugin,
                                                 redis_policy(redis_server, **conf))))
    assert get(gateway, "/")[0] == 200
    redis_server.kill()
    replies = [get(gateway, "/") for _ in range(5)]
    assert codes(replies) == [503] * 5
    assert all(json.loads(body) == {"error_msg": message} for _, _, body in replies)
    assert store_errors(gateway, plugin, "rejected") == 5
    redis_server.start()
    wait_until(lambda: get(gateway, "/")[0] == 200, "serving again")


def test_gateway_starts_while_redis_is_down_and_limits_once_it_is_up(
        echo: EchoUpstream, redis_server: RedisServerProcess,
        start_gateway: Callable[..., Gateway]) -> None:
    redis_server.kill()
    conf = redis_policy(redis_server, count=2, time_window=60, rejected_code=429)
    gateway = start_gateway({"routes": [limited(echo, "limit-count", conf)]})
    assert get(gateway, "/")[0] == 503
    redis_server.start()
    wait_until(lambda: get(gateway, "/")[0] == 429, "limiting")


class SilentServer:
    """A TCP server that accepts connections and never answers: a Redis that hangs."""

    def __init__(self) -> None:
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.accepted.append(connection)  # kept open, never read

    def close(self) -> None:
        self.listener.close()
        for connection in self.accepted:
            connection.close()


def test_unresponsive_redis_times_out_and_is_not_reconnected_on_every_request(
        echo: EchoUpstream, start_gateway: Callable[..., Gateway]) -> None:
    silent = SilentServer()
    try:
        gateway = start_gateway(with_metrics(limited(echo, "limit-count", {
            "policy": "redis", "redis_host": "127.0.0.1", "redis_port": silent.port,
            "redis_timeout": 200, "count": 10, "time_window": 60})))
        replies = [get(gateway, "/") for _ in range(40)]
        assert codes(replies) == [503] * 40
        assert store_errors(gateway, "limit-count", "rejected") == 40
        # After a timeout the gateway fails fast and probes now and then: a few
        # connections, not one (or two, with the retry) per request.
        assert 1 <= len(silent.accepted) <= 10, len(silent.accepted)
    finally:
        silent.close()


# -- authentication ------------------------------------------------------------------------


def test_redis_password_authenticates_against_requirepass_and_is_never_logged(
        echo: EchoUpstream, start_redis: Callable[..., RedisServerProcess],
        start_gateway: Callable[..., Gateway]) -> None:
    server = start_redis(password="s3cret-pw")
    right = start_gateway({"routes": [limited(echo, "limit-count", redis_policy(
        server, redis_password="s3cret-pw", count=2, time_window=60))]})
    wrong = start_gateway({"routes": [limited(echo, "limit-count", redis_policy(
        server, redis_password="not-the-pw", count=2, time_window=60))]})
    assert [get(right, "/")[0] for _ in range(3)] == [200, 200, 503]
    assert len(server.client().keys("*")) == 1
    status, _, body = get(wrong, "/")
    assert (status, json.loads(body)) == (503, {"error_msg": "failed to limit count"})
    assert "redis 127.0.0.1" in wrong.log()  # the outage is logged...
    assert "not-the-pw" not in wrong.log()  # ...without the password
    assert "s3cret-pw" not in right.log()


def test_redis_username_authenticates_an_acl_user(
        echo: EchoUpstream, start_redis: Callable[..., RedisServerProcess],
        start_gateway: Callable[..., Gateway]) -> None:
    server = start_redis(users=["limiter on >limiter-pw ~sluicegate:* +@all"])
    gateway = start_gateway({"routes": [limited(echo, "limit-count", redis_policy(
        server, redis_username="limiter", redis_password="limiter-pw", count=1,
        time_window=60))]})
    assert [get(gateway, "/")[0] for _ in range(2)] == [200, 503]


# -- config --------------------------------------------------------------------------------


def config_errors(plugin: str, conf: dict[str, Any]) -> list[str]:
    config = {"routes": [{"id": "r1", "uri": "/*", "upstream": {"nodes": {"127.0.0.1:1": 1}},
                          "plugins": {plugin: conf}}]}
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    return caught.value.errors


def test_policy_redis_without_redis_host_is_a_config_error_with_its_path() -> None:
    assert config_errors("limit-count", {"count": 1, "time_window": 1, "policy": "redis"}) \
        == ["routes[0].plugins.limit-count.redis_host: required when policy is redis"]
    assert config_errors("limit-conn", {"conn": 1, "burst": 0, "default_conn_delay": 1,
                                        "policy": "redis"}) \
        == ["routes[0].plugins.limit-conn.redis_host: required when policy is redis"]


def test_policy_redis_cluster_is_refused_with_a_clear_reason() -> None:
    (error,) = config_errors("limit-req", {"rate": 1, "burst": 0, "policy": "redis-cluster",
                                           "redis_host": "127.0.0.1"})
    assert error.startswith("routes[0].plugins.limit-req.policy: 'redis-cluster' is not "
                            "supported: use 'redis'")


def test_bad_redis_options_name_their_field() -> None:
    errors = config_errors("limit-count", {
        "count": 1, "time_window": 1, "policy": "redis", "redis_host": "",
        "redis_port": 70000, "redis_timeout": 0, "redis_database": -1})
    path = "routes[0].plugins.limit-count"
    assert sorted(errors) == sorted([
        f"{path}.redis_host: must not be empty",
        f"{path}.redis_port: must be between 1 and 65535",
        f"{path}.redis_timeout: must be > 0",
        f"{path}.redis_database: must be >= 0"])


def test_validate_command_reports_a_redis_policy_without_host(tmp_path: Path) -> None:
    config = {"routes": [{"id": "r1", "uri": "/*", "upstream": {"nodes": {"127.0.0.1:1": 1}},
                          "plugins": {"limit-count": {"count": 1, "time_window": 1,
                                                      "policy": "redis",
                                                      "redis_password": "hush"}}}]}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "sluicegate", "validate", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "routes[0].plugins.limit-count.redis_host: required when policy is redis" in output
    assert "hush" not in output
