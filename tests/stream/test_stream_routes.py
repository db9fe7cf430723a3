"""Stream route matching and the `stream_routes` config model (pure logic, no sockets)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sluicegate.stream.routes import (
    StreamContext,
    StreamRoute,
    StreamRouteConfig,
    StreamRouteTable,
    StreamUpstream,
    compile_stream_routes,
)


def ids(table: StreamRouteTable, *query: object) -> str | None:
    route = table.match(*query)  # type: ignore[arg-type]
    return None if route is None else route.id


def test_route_matches_by_server_port():
    table = StreamRouteTable([StreamRoute("mysql", server_port=3306),
                              StreamRoute("redis", server_port=6379)])
    assert ids(table, "10.0.0.1", 3306, "192.168.1.5") == "mysql"
    assert ids(table, "10.0.0.1", 6379, "192.168.1.5") == "redis"
    assert ids(table, "10.0.0.1", 80, "192.168.1.5") is None


def test_route_matches_client_by_remote_addr_cidr():
    table = StreamRouteTable([StreamRoute("office", remote_addr="192.168.1.0/24"),
                              StreamRoute("one-host", remote_addr="10.9.8.7")])
    assert ids(table, "10.0.0.1", 22, "192.168.1.200") == "office"
    assert ids(table, "10.0.0.1", 22, "192.168.2.1") is None
    assert ids(table, "10.0.0.1", 22, "10.9.8.7") == "one-host"
    assert ids(table, "10.0.0.1", 22, "10.9.8.6") is None


def test_route_matches_by_server_addr_v4_and_v6():
    table = StreamRouteTable([StreamRoute("v4-net", server_addr="10.0.0.0/8"),
                              StreamRoute("v6-net", server_addr="fd00::/8")])
    assert ids(table, "10.200.1.1", 443, "1.2.3.4") == "v4-net"
    assert ids(table, "fd12::1", 443, "fd99::2") == "v6-net"
    assert ids(table, "11.0.0.1", 443, "1.2.3.4") is None
    assert ids(table, "fe80::1", 443, "fd99::2") is None


def test_ipv4_mapped_ipv6_client_matches_an_ipv4_cidr():
    # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
    table = StreamRouteTable([StreamRoute("lan", remote_addr="192.168.0.0/16")])
    assert ids(table, "::ffff:10.0.0.1", 80, "::ffff:192.168.3.4") == "lan"
    mapped = StreamRouteTable([StreamRoute("mapped", remote_addr="::ffff:192.168.0.0/112")])
    assert ids(mapped, "10.0.0.1", 80, "192.168.3.4") == "mapped"


def test_route_with_more_conditions_wins_whatever_the_config_order():
    table = StreamRouteTable([
        StreamRoute("any"),
        StreamRoute("port", server_port=443),
        StreamRoute("port-and-client", server_port=443, remote_addr="10.0.0.0/8"),
        StreamRoute("all-three", server_port=443, remote_addr="10.0.0.0/8",
                    server_addr="203.0.113.0/24"),
    ])
    assert ids(table, "203.0.113.9", 443, "10.1.1.1") == "all-three"
    assert ids(table, "198.51.100.1", 443, "10.1.1.1") == "port-and-client"
    assert ids(table, "198.51.100.1", 443, "172.16.0.1") == "port"
    assert ids(table, "198.51.100.1", 22, "172.16.0.1") == "any"


def test_narrower_cidr_wins_among_routes_with_as_many_conditions():
    table = StreamRouteTable([StreamRoute("wide", remote_addr="10.0.0.0/8"),
                              StreamRoute("narrow", remote_addr="10.1.0.0/16"),
                              StreamRoute("host", remote_addr="10.1.2.3")])
    assert ids(table, "10.0.0.1", 80, "10.1.2.3") == "host"
    assert ids(table, "10.0.0.1", 80, "10.1.2.4") == "narrow"
    assert ids(table, "10.0.0.1", 80, "10.2.0.1") == "wide"


def test_config_order_breaks_remaining_ties():
    table = StreamRouteTable([StreamRoute("first", server_port=80),
                              StreamRoute("second", server_port=80)])
    assert ids(table, "10.0.0.1", 80, "10.1.2.3") == "first"


def test_route_for_udp_only_does_not_take_tcp():
    udp = StreamUpstream.from_nodes([("10.0.0.53", 53)], scheme="udp")
    table = StreamRouteTable([StreamRoute("dns-udp", server_port=53, protocol="udp",
                                          upstream=udp),
                              StreamRoute("dns-any", server_port=53)])
    assert ids(table, "10.0.0.1", 53, "10.1.2.3", "udp") == "dns-udp"
    assert ids(table, "10.0.0.1", 53, "10.1.2.3", "tcp") == "dns-any"


def test_unparseable_address_matches_no_address_condition():
    table = StreamRouteTable([StreamRoute("lan", remote_addr="10.0.0.0/8"),
                              StreamRoute("port", server_port=9)])
    assert ids(table, "unix", 9, "not-an-ip") == "port"


# -- the config model ----------------------------------------------------------------------

def test_stream_route_config_accepts_apisix_shapes():
    config = StreamRouteConfig.model_validate({
        "id": 1, "server_addr": "127.0.0.1", "server_port": 2000, "remote_addr": "10.0.0.0/8",
        "upstream": {"type": "roundrobin", "nodes": {"127.0.0.1:1995": 1, "[::1]:1996": 2},
                     "timeout": {"connect": 2}},
    })
    assert config.id == "1"
    assert [(n.host, n.port, n.weight) for n in config.upstream.nodes] == [
        ("127.0.0.1", 1995, 1), ("::1", 1996, 2)]
    listed = StreamRouteConfig.model_validate({"upstream": {"nodes": [
        {"host": "db.internal", "port": 5432, "weight": 3, "priority": 1}]}})
    assert listed.upstream.nodes[0].priority == 1


@pytest.mark.parametrize(("config", "message"), [
    ({"remote_addr": "10.0.0.300/8"}, "not an IP address or CIDR"),
    ({"server_addr": "example.com"}, "not an IP address or CIDR"),
    ({"server_port": 70000}, "less than or equal to 65535"),
    ({"upstream": {"nodes": {"10.0.0.1": 1}}}, "expected host:port"),
    ({"upstream": {"nodes": {"10.0.0.1:5": 0}}}, "at least one node needs a weight"),
    ({"upstream": {"type": "chash", "nodes": {"10.0.0.1:5": 1}}}, "needs key"),
    ({"upstream": {"type": "chash", "key": "uri", "nodes": {"10.0.0.1:5": 1}}},
     "hashes on one of"),
    ({"upstream": {"nodes": {"10.0.0.1:5": 1}}, "upstream_id": "u1"}, "not both"),
    ({"upstream": {"nodes": {"10.0.0.1:5": 1}, "scheme": "tls"}}, "scheme"),
    ({"plugins": {}}, "Extra inputs are not permitted"),
])
def test_stream_route_config_rejects_bad_fields_with_the_reason(config, message):
    with pytest.raises(ValidationError, match=message):
        StreamRouteConfig.model_validate(config)


def test_compiled_routes_keep_upstream_settings_and_protocol():
    configs = [StreamRouteConfig.model_validate(c) for c in (
        {"id": "dns", "server_port": 53,
         "upstream": {"scheme": "udp", "nodes": {"10.0.0.53:53": 1, "10.0.0.54:53": 1},
                      "timeout": {"connect": 1.5, "read": 30}, "retries": 0}},
        {"id": "passthrough"},
    )]
    table = compile_stream_routes(configs)
    dns = table.match("10.0.0.1", 53, "10.1.1.1", "udp")
    assert dns is not None and dns.id == "dns" and dns.protocol == "udp"
    assert dns.upstream.connect_timeout == 1.5 and dns.upstream.idle_timeout == 30
    assert dns.upstream.attempts == 1
    assert table.match("10.0.0.1", 53, "10.1.1.1", "tcp").id == "passthrough"
    assert table.match("10.0.0.1", 53, "10.1.1.1", "tcp").upstream is None


def test_upstream_id_refers_to_a_top_level_upstream():
    class Node:
        host, port, weight, priority = "10.0.0.7", 3306, 1, 0

    class Timeout:
        connect, send, read = 3.0, 60.0, 60.0

    class Upstream:  # the shape of config.model.UpstreamConfig
        type, hash_on, key, retries = "roundrobin", "vars", None, None
        nodes = [Node()]
        timeout = Timeout()

    route = StreamRouteConfig.model_validate({"id": "db", "upstream_id": 7})
    table = compile_stream_routes([route], {"7": Upstream()})
    compiled = table.match("10.0.0.1", 3306, "10.1.1.1")
    assert compiled.upstream.nodes[0].address == "10.0.0.7:3306"
    assert compiled.upstream.connect_timeout == 3.0
    with pytest.raises(ValueError, match=r"stream_routes\[0\].upstream_id: no upstream '7'"):
        compile_stream_routes([route], {})


def test_stream_chash_keeps_a_client_on_one_node():
    config = StreamRouteConfig.model_validate({"upstream": {
        "type": "chash", "key": "remote_addr",
        "nodes": {f"10.0.0.{i}:80": 1 for i in range(1, 6)}}})
    balancer = compile_stream_routes([config]).routes[0].upstream.balancer
    picks = {balancer.pick(StreamContext(("192.168.1.9", port), ("10.9.9.9", 80))).address
             for port in range(1000, 1050)}
    assert len(picks) == 1  # the client's port changes per connection, its node does not
    spread = {balancer.pick(StreamContext((f"192.168.1.{i}", 1000), ("10.9.9.9", 80))).address
              for i in range(1, 60)}
    assert len(spread) > 1
