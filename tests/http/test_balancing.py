"""Load balancing through a running gateway, over upstreams that answer with their name."""

from __future__ import annotations

import http.client
import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from harness import EchoUpstream


@pytest.fixture(scope="module")
def nodes() -> Iterator[dict[str, EchoUpstream]]:
    servers = {name: EchoUpstream(name=name) for name in ("a", "b", "c")}
    yield servers
    for server in servers.values():
        server.stop()


class Client:
    """One keep-alive connection to the gateway."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)

    def get(self, path: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
        self.connection.request("GET", path, headers=headers or {})
        response = self.connection.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body)
        return json.loads(body)

    def names(self, count: int, path: str = "/", headers: dict[str, str] | None = None
              ) -> list[str]:
        return [self.get(path, headers)["name"] for _ in range(count)]

    def close(self) -> None:
        self.connection.close()


def upstream(type: str, weights: dict[EchoUpstream, int], **extra: Any) -> dict[str, Any]:
    return {"type": type, "nodes": {server.address: w for server, w in weights.items()},
            **extra}


def test_roundrobin_follows_weights_3_to_1_exactly(nodes, start_gateway):
    a, b = nodes["a"], nodes["b"]
    gateway = start_gateway({"routes": [
        {"id": "rr", "uri": "/*", "upstream": upstream("roundrobin", {a: 3, b: 1})}]})
    client = Client(gateway.port)
    names = client.names(400)
    client.close()
    assert Counter(names) == {"a": 300, "b": 100}
    # Smooth weighted round robin: every run of 4 requests has exactly one for b.
    for start in range(0, 400, 4):
        assert names[start:start + 4].count("b") == 1, names[start:start + 4]


def test_roundrobin_spreads_equal_weights_evenly(nodes, start_gateway):
    gateway = start_gateway({"routes": [
        {"id": "rr", "uri": "/*",
         "upstream": upstream("roundrobin", {nodes["a"]: 1, nodes["b"]: 1, nodes["c"]: 1})}]})
    client = Client(gateway.port)
    names = client.names(90)
    client.close()
    assert Counter(names) == {"a": 30, "b": 30, "c": 30}


def test_roundrobin_applies_per_request_across_new_connections(nodes, start_gateway):
    gateway = start_gateway({"routes": [
        {"id": "rr", "uri": "/*", "upstream": upstream("roundrobin", {nodes["a"]: 1,
                                                                      nodes["b"]: 1})}]})
    names = []
    for _ in range(20):
        client = Client(gateway.port)
        names += client.names(1)
        client.close()
    assert Counter(names) == {"a": 10, "b": 10}


def test_chash_on_header_sends_each_user_to_one_node_and_spreads_users(nodes, start_gateway):
    gateway = start_gateway({"routes": [
        {"id": "sticky", "uri": "/*",
         "upstream": upstream("chash", {nodes["a"]: 1, nodes["b"]: 1, nodes["c"]: 1},
                              hash_on="header", key="X-User")}]})
    client = Client(gateway.port)
    placement: dict[str, set[str]] = {}
    for round_ in range(4):
        for user in range(30):
            name = client.get(f"/r{round_}", {"X-User": f"user-{user}"})["name"]
            placement.setdefault(f"user-{user}", set()).add(name)
    client.close()
    assert all(len(names) == 1 for names in placement.values()), placement
    owners = Counter(next(iter(names)) for names in placement.values())
    assert len(owners) == 3, owners  # 30 users on 3 nodes: every node gets some


def test_chash_same_user_keeps_its_node_on_a_new_connection(nodes, start_gateway):
    gateway = start_gateway({"routes": [
        {"id": "sticky", "uri": "/*",
         "upstream": upstream("chash", {nodes["a"]: 1, nodes["b"]: 1, nodes["c"]: 1},
                              hash_on="header", key="X-User")}]})
    first = {}
    for attempt in range(3):
        client = Client(gateway.port)
        for user in ("ann", "bob", "cyd", "dan"):
            name = client.get("/", {"X-User": user})["name"]
            assert first.setdefault(user, name) == name, (attempt, user)
        client.close()


def test_least_conn_avoids_the_node_with_a_request_in_flight(nodes, start_gateway):
    a, b = nodes["a"], nodes["b"]
    gateway = start_gateway({"routes": [
        {"id": "lc", "uri": "/*", "upstream": upstream("least_conn", {a: 1, b: 1})}]})
    slow: dict[str, Any] = {}

    def slow_request() -> None:
        client = Client(gateway.port)
        slow["body"] = client.get("/slow?delay=1")
        client.close()

    thread = threading.Thread(target=slow_request)
    thread.start()
    try:
        # Wait until the slow request has reached a node: then that node is busy.
        client = Client(gateway.port)
        busy = None
        for _ in range(100):
            names = set(client.names(2))
            if len(names) == 1:
                (free,) = names
                busy = "b" if free == "a" else "a"
                break
        assert busy is not None, "the slow request never occupied a node"
        quick = client.names(20)
        client.close()
    finally:
        thread.join(10)
    assert slow["body"]["name"] == busy
    assert busy not in quick, quick


def test_least_conn_serves_both_nodes_when_idle(nodes, start_gateway):
    gateway = start_gateway({"routes": [
        {"id": "lc", "uri": "/*",
         "upstream": upstream("least_conn", {nodes["a"]: 1, nodes["b"]: 1})}]})
    client = Client(gateway.port)
    counts = Counter(client.names(40))
    client.close()
    assert counts == {"a": 20, "b": 20}


def test_ewma_sends_traffic_to_every_node(nodes, start_gateway):
    gateway = start_gateway({"routes": [
        {"id": "ewma", "uri": "/*",
         "upstream": upstream("ewma", {nodes["a"]: 1, nodes["b"]: 1, nodes["c"]: 1})}]})
    client = Client(gateway.port)
    counts = Counter(client.names(90))
    client.close()
    assert set(counts) == {"a", "b", "c"}, counts


@pytest.mark.parametrize("type", ["roundrobin", "chash", "least_conn", "ewma"])
def test_node_with_weight_0_never_receives_traffic(nodes, start_gateway, type):
    extra = {"hash_on": "header", "key": "X-User"} if type == "chash" else {}
    gateway = start_gateway({"routes": [
        {"id": "w0", "uri": "/*",
         "upstream": upstream(type, {nodes["a"]: 1, nodes["b"]: 1, nodes["c"]: 0}, **extra)}]})
    client = Client(gateway.port)
    names = [client.get("/", {"X-User": f"user-{i}"})["name"] for i in range(60)]
    client.close()
    counts = Counter(names)
    assert "c" not in counts, counts
    assert set(counts) == {"a", "b"}, counts
