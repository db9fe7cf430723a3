"""Route matching: the RouteTable on its own (fed through the config loader and the snapshot
compiler, as the gateway builds it), its cost with 10,000 routes, and routing through a
running gateway."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest

from harness import EchoUpstream
from sluicegate.config.load import ConfigError, validate_config
from sluicegate.http.context import RequestContext
from sluicegate.http.router import Candidate, RouteTable
from sluicegate.http.snapshot import compile_snapshot
from sluicegate.plugins.base import PluginEnv

NOWHERE = {"nodes": {"127.0.0.1:9": 1}}


def compile_routes(routes: list[dict[str, Any]],
                   services: list[dict[str, Any]] | None = None) -> RouteTable:
    """The route table the gateway would build for these routes."""
    routes = [route if "upstream" in route or "service_id" in route
              else {**route, "upstream": NOWHERE} for route in routes]
    validated = validate_config({"routes": routes, "services": services or []})
    return compile_snapshot(validated.config, PluginEnv()).table


def make_ctx(method: str = "GET", path: str = "/", host: str = "", query: str = "",
             headers: dict[str, str] | None = None, remote: str = "127.0.0.1"
             ) -> RequestContext:
    raw = [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    return RequestContext(method, path, query, raw, host, (remote, 40000),
                          ("127.0.0.1", 9080), "1.1")


def lookup(table: RouteTable, path: str, host: str = "", method: str = "GET", **ctx: Any
           ) -> str | None:
    """The id of the route a request goes to, or None (404)."""
    found = table.match(method, path, host, make_ctx(method, path, host, **ctx))
    return None if found is None else found.id


# -- uri ----------------------------------------------------------------------------------


def test_exact_uri_matches_only_that_path():
    table = compile_routes([{"id": "a", "uri": "/a"}])
    assert lookup(table, "/a") == "a"
    assert lookup(table, "/a/") is None
    assert lookup(table, "/a/b") is None
    assert lookup(table, "/ab") is None


def test_prefix_uri_matches_every_path_below_it():
    table = compile_routes([{"id": "a", "uri": "/a/*"}])
    assert lookup(table, "/a/") == "a"
    assert lookup(table, "/a/b") == "a"
    assert lookup(table, "/a/b/c.json") == "a"
    assert lookup(table, "/ab") is None
    assert lookup(table, "/b/a/x") is None


def test_root_prefix_catches_every_path():
    table = compile_routes([{"id": "all", "uri": "/*"}])
    for path in ("/", "/x", "/x/y/z"):
        assert lookup(table, path) == "all"


@pytest.mark.parametrize("order", ["short-first", "long-first"])
def test_longest_prefix_wins_whatever_the_config_order(order):
    routes = [{"id": "short", "uri": "/a/*"}, {"id": "long", "uri": "/a/b/*"}]
    if order == "long-first":
        routes.reverse()
    table = compile_routes(routes)
    assert lookup(table, "/a/b/c") == "long"
    assert lookup(table, "/a/b/") == "long"
    assert lookup(table, "/a/c") == "short"
    assert lookup(table, "/a/bc") == "short"


def test_exact_uri_beats_prefix_even_with_lower_priority():
    table = compile_routes([{"id": "prefix", "uri": "/a/*", "priority": 100},
                            {"id": "exact", "uri": "/a/b"}])
    assert lookup(table, "/a/b") == "exact"
    assert lookup(table, "/a/b/c") == "prefix"


def test_uris_list_matches_any_of_its_paths():
    table = compile_routes([{"id": "multi", "uris": ["/x", "/y/*"]},
                            {"id": "other", "uri": "/*"}])
    assert lookup(table, "/x") == "multi"
    assert lookup(table, "/y/1") == "multi"
    assert lookup(table, "/x/1") == "other"
    assert lookup(table, "/z") == "other"


# -- host ---------------------------------------------------------------------------------


def test_host_route_matches_only_its_host_in_any_case():
    table = compile_routes([{"id": "api", "uri": "/*", "host": "API.example.com"}])
    assert lookup(table, "/v1", host="api.example.com") == "api"
    assert lookup(table, "/v1", host="www.example.com") is None
    assert lookup(table, "/v1") is None


def test_hosts_list_matches_any_of_its_hosts():
    table = compile_routes([{"id": "both", "uri": "/*", "hosts": ["a.test", "b.test"]}])
    assert lookup(table, "/", host="a.test") == "both"
    assert lookup(table, "/", host="b.test") == "both"
    assert lookup(table, "/", host="c.test") is None


def test_wildcard_host_matches_subdomains_but_not_the_bare_domain():
    table = compile_routes([{"id": "wild", "uri": "/*", "host": "*.example.com"}])
    assert lookup(table, "/", host="api.example.com") == "wild"
    assert lookup(table, "/", host="a.b.example.com") == "wild"
    assert lookup(table, "/", host="example.com") is None
    assert lookup(table, "/", host="notexample.com") is None
    assert lookup(table, "/", host="api.example.org") is None


def test_exact_host_beats_wildcard_host():
    table = compile_routes([{"id": "wild", "uri": "/*", "host": "*.example.com"},
                            {"id": "exact", "uri": "/*", "host": "api.example.com"}])
    assert lookup(table, "/", host="api.example.com") == "exact"
    assert lookup(table, "/", host="www.example.com") == "wild"


def test_longer_wildcard_host_beats_shorter_one():
    table = compile_routes([{"id": "short", "uri": "/*", "host": "*.example.com"},
                            {"id": "long", "uri": "/*", "host": "*.eu.example.com"}])
    assert lookup(table, "/", host="api.eu.example.com") == "long"
    assert lookup(table, "/", host="api.us.example.com") == "short"


def test_host_routes_are_tried_before_host_less_routes():
    # The host-less route has the more specific uri, yet the host route wins (APISIX's
    # radixtree_host_uri): host first, then uri.
    table = compile_routes([{"id": "any-host", "uri": "/a/b"},
                            {"id": "api", "uri": "/a/*", "host": "api.example.com"}])
    assert lookup(table, "/a/b", host="api.example.com") == "api"
    assert lookup(table, "/a/b", host="other.example.com") == "any-host"


def test_host_less_route_serves_a_host_whose_routes_do_not_match_the_path():
    table = compile_routes([{"id": "api", "uri": "/v1/*", "host": "api.example.com"},
                            {"id": "fallback", "uri": "/*"}])
    assert lookup(table, "/v1/x", host="api.example.com") == "api"
    assert lookup(table, "/v2/x", host="api.example.com") == "fallback"


def test_route_without_hosts_takes_its_services_hosts():
    table = compile_routes(
        [{"id": "r", "uri": "/*", "service_id": "s"}],
        services=[{"id": "s", "hosts": ["svc.test"], "upstream": NOWHERE}])
    assert lookup(table, "/", host="svc.test") == "r"
    assert lookup(table, "/", host="other.test") is None


# -- methods, vars, remote_addrs ----------------------------------------------------------


def test_methods_restrict_a_route_to_those_methods():
    table = compile_routes([{"id": "read", "uri": "/items", "methods": ["GET", "HEAD"]},
                            {"id": "write", "uri": "/items", "methods": ["POST", "PUT"]}])
    assert lookup(table, "/items", method="GET") == "read"
    assert lookup(table, "/items", method="HEAD") == "read"
    assert lookup(table, "/items", method="POST") == "write"
    assert lookup(table, "/items", method="DELETE") is None


def test_vars_equality_on_query_argument():
    table = compile_routes([{"id": "v", "uri": "/*", "vars": [["arg_x", "==", "1"]]}])
    assert lookup(table, "/", query="x=1") == "v"
    assert lookup(table, "/", query="y=2&x=1") == "v"
    assert lookup(table, "/", query="x=2") is None
    assert lookup(table, "/") is None


def test_vars_regex_on_header():
    table = compile_routes([{"id": "v", "uri": "/*", "vars": [["http_x_client", "~~", "^mob"]]}])
    assert lookup(table, "/", headers={"X-Client": "mobile-app"}) == "v"
    assert lookup(table, "/", headers={"X-Client": "desktop-mobile"}) is None
    assert lookup(table, "/") is None


def test_vars_every_condition_must_hold():
    table = compile_routes([{"id": "v", "uri": "/*",
                             "vars": [["arg_x", "==", "1"], ["http_h", "~~", "re"]]}])
    assert lookup(table, "/", query="x=1", headers={"H": "prefix-re-suffix"}) == "v"
    assert lookup(table, "/", query="x=1", headers={"H": "nothing"}) is None
    assert lookup(table, "/", query="x=2", headers={"H": "re"}) is None


def test_vars_negation_in_apisix_form():
    # lua-resty-expr (what APISIX route `vars` are) negates with a separate "!":
    # ["arg_weight", "!", ">", 15].
    table = compile_routes([{"id": "not-one", "uri": "/*", "vars": [["arg_x", "!", "==", "1"]]}])
    assert lookup(table, "/", query="x=2") == "not-one"
    assert lookup(table, "/") == "not-one"
    assert lookup(table, "/", query="x=1") is None


def test_vars_not_equal_operator():
    table = compile_routes([{"id": "v", "uri": "/*", "vars": [["arg_env", "~=", "prod"]]}])
    assert lookup(table, "/", query="env=dev") == "v"
    assert lookup(table, "/") == "v"
    assert lookup(table, "/", query="env=prod") is None


def test_vars_in_matches_any_listed_value():
    table = compile_routes([{"id": "v", "uri": "/*",
                             "vars": [["http_x_region", "in", ["eu", "us"]]]}])
    assert lookup(table, "/", headers={"X-Region": "eu"}) == "v"
    assert lookup(table, "/", headers={"X-Region": "us"}) == "v"
    assert lookup(table, "/", headers={"X-Region": "ap"}) is None
    assert lookup(table, "/") is None


def test_vars_greater_than_compares_numbers_not_strings():
    table = compile_routes([{"id": "big", "uri": "/*", "vars": [["arg_n", ">", 10]]}])
    assert lookup(table, "/", query="n=11") == "big"
    assert lookup(table, "/", query="n=100") == "big"  # "100" < "11" as strings
    assert lookup(table, "/", query="n=9") is None
    assert lookup(table, "/", query="n=10") is None
    assert lookup(table, "/", query="n=abc") is None


def test_remote_addrs_restrict_a_route_to_client_networks():
    table = compile_routes([{"id": "internal", "uri": "/*",
                             "remote_addrs": ["10.0.0.0/8", "192.168.1.5"]},
                            {"id": "public", "uri": "/*", "priority": -1}])
    assert lookup(table, "/", remote="10.1.2.3") == "internal"
    assert lookup(table, "/", remote="192.168.1.5") == "internal"
    assert lookup(table, "/", remote="192.168.1.6") == "public"
    assert lookup(table, "/", remote="127.0.0.1") == "public"


# -- priority and status ------------------------------------------------------------------


def test_higher_priority_wins_among_routes_on_the_same_path():
    table = compile_routes([{"id": "low", "uri": "/p", "priority": 1},
                            {"id": "high", "uri": "/p", "priority": 5},
                            {"id": "default", "uri": "/p"}])
    assert lookup(table, "/p") == "high"


def test_equal_priority_routes_on_the_same_path_keep_config_order():
    table = compile_routes([{"id": "first", "uri": "/p/*"}, {"id": "second", "uri": "/p/*"}])
    assert lookup(table, "/p/x") == "first"


def test_priority_does_not_beat_a_longer_prefix():
    table = compile_routes([{"id": "short", "uri": "/a/*", "priority": 100},
                            {"id": "long", "uri": "/a/b/*"}])
    assert lookup(table, "/a/b/c") == "long"


def test_higher_priority_route_whose_conditions_fail_gives_way_to_the_next():
    table = compile_routes([{"id": "canary", "uri": "/p", "priority": 10,
                             "vars": [["http_x_canary", "==", "1"]]},
                            {"id": "stable", "uri": "/p"}])
    assert lookup(table, "/p", headers={"X-Canary": "1"}) == "canary"
    assert lookup(table, "/p") == "stable"


def test_route_with_status_0_is_disabled():
    table = compile_routes([{"id": "off", "uri": "/p", "status": 0},
                            {"id": "on", "uri": "/q", "status": 1}])
    assert lookup(table, "/p") is None
    assert lookup(table, "/q") == "on"


def test_disabled_route_lets_a_lower_priority_route_match():
    table = compile_routes([{"id": "off", "uri": "/p", "priority": 9, "status": 0},
                            {"id": "on", "uri": "/p"}])
    assert lookup(table, "/p") == "on"


def test_unknown_vars_operator_is_a_config_error():
    with pytest.raises(ConfigError, match=r"routes\[0\]\.vars"):
        compile_routes([{"id": "r", "uri": "/*", "vars": [["arg_x", "=~", "1"]]}])


# -- 10,000 routes ------------------------------------------------------------------------


def big_table(count: int) -> RouteTable:
    """`count` routes, half exact and half prefix, all names the same width so that 10 and
    10,000 routes have the same path lengths."""
    table = RouteTable()
    for i in range(count // 2):
        table.add(f"exact-{i}", [f"/svc/{i:05d}/item"], None, 0, 2 * i)
        table.add(f"prefix-{i}", [f"/api/{i:05d}/*"], None, 0, 2 * i + 1)
    return table.freeze()


def test_ten_thousand_routes_each_reach_their_own_route():
    table = big_table(10_000)
    ctx = make_ctx()
    for i in range(5_000):
        assert table.match("GET", f"/svc/{i:05d}/item", "", ctx) == f"exact-{i}"
        assert table.match("GET", f"/api/{i:05d}/x/y", "", ctx) == f"prefix-{i}"
    assert table.match("GET", "/svc/05000/item", "", ctx) is None
    assert table.match("GET", "/svc/00001/item/more", "", ctx) is None
    assert table.match("GET", "/api/05000/x", "", ctx) is None


class CountingDict(dict):
    """A dict that counts `get` calls: one probe of the prefix index."""

    probes = 0

    def get(self, key, default=None):
        CountingDict.probes += 1
        return super().get(key, default)


@pytest.fixture
def counted(monkeypatch) -> Iterator[dict[str, int]]:
    """Counts candidates examined (Candidate.accepts calls) and prefix index probes."""
    counts = {"candidates": 0}
    original = Candidate.accepts

    def accepts(self, method, ctx):
        counts["candidates"] += 1
        return original(self, method, ctx)

    monkeypatch.setattr(Candidate, "accepts", accepts)
    yield counts


def lookup_cost(table: RouteTable, path: str, counts: dict[str, int]) -> tuple[Any, int, int]:
    table.any_host.prefix = CountingDict(table.any_host.prefix)
    counts["candidates"] = 0
    CountingDict.probes = 0
    found = table.match("GET", path, "", make_ctx(path=path))
    return found, counts["candidates"], CountingDict.probes


@pytest.mark.parametrize("path, expected, examined", [
    ("/svc/00003/item", "exact-3", 1),
    ("/api/00004/deep/path", "prefix-4", 1),
    ("/nothing/here", None, 0),
])
def test_lookup_work_is_the_same_for_10_and_10000_routes(counted, path, expected, examined):
    small = lookup_cost(big_table(10), path, counted)
    large = lookup_cost(big_table(10_000), path, counted)
    assert small[0] == large[0] == expected
    # One candidate examined (none on a miss) and the same number of prefix-index
    # probes, however many routes there are.
    assert small[1] == large[1] == examined
    assert small[2] == large[2]


def test_prefix_probes_are_bounded_by_path_length_not_route_count(counted):
    # Prefixes of many lengths (/p0/ ... /p9999/): each lookup probes at most one
    # dict entry per distinct prefix length, and examines one candidate.
    table = RouteTable()
    for i in range(10_000):
        table.add(f"p{i}", [f"/p{i}/*"], None, 0, i)
    table.freeze()
    path = "/p42/x"
    found, candidates, probes = lookup_cost(table, path, counted)
    assert found == "p42"
    assert candidates == 1
    assert probes <= len(path)


# -- through the gateway ------------------------------------------------------------------


@pytest.fixture(scope="module")
def named() -> Iterator[dict[str, EchoUpstream]]:
    """Four upstreams, each answering with its name: the name says which route served."""
    servers = {name: EchoUpstream(name=name) for name in ("a", "b", "c", "d")}
    yield servers
    for server in servers.values():
        server.stop()


def to(server: EchoUpstream) -> dict[str, Any]:
    return {"nodes": {server.address: 1}}


def request(gateway: Any, path: str, method: str = "GET", host: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any] | None]:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        all_headers = dict(headers or {})
        if host is not None:
            all_headers["Host"] = host
        connection.request(method, path, headers=all_headers)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(body) if body else None
    except ValueError:
        return response.status, None


def served_by(gateway: Any, path: str, **options: Any) -> str | None:
    status, body = request(gateway, path, **options)
    if status == 404:
        return None
    assert status == 200, (status, body)
    return body["name"]


def test_gateway_routes_exact_prefix_and_longest_prefix(named, start_gateway):
    gateway = start_gateway({"routes": [
        {"id": "short", "uri": "/a/*", "upstream": to(named["a"])},
        {"id": "long", "uri": "/a/b/*", "upstream": to(named["b"])},
        {"id": "exact", "uri": "/a/b/c", "upstream": to(named["c"])},
    ]})
    assert served_by(gateway, "/a/x") == "a"
    assert served_by(gateway, "/a/b/x?q=1") == "b"
    assert served_by(gateway, "/a/b/c") == "c"
    assert served_by(gateway, "/a/b/c?q=1") == "c"
    assert served_by(gateway, "/a/b/c/d") == "b"


def test_gateway_answers_404_json_when_no_route_matches(named, start_gateway):
    gateway = start_gateway({"routes": [
        {"id": "on", "uri": "/on", "upstream": to(named["a"])},
        {"id": "off", "uri": "/off", "status": 0, "upstream": to(named["b"])},
    ]})
    assert served_by(gateway, "/on") == "a"
    for path in ("/off", "/nothing"):
        status, body = request(gateway, path)
        assert status == 404
        assert body == {"error_msg": "404 Route Not Found"}


def test_gateway_routes_by_host_header_with_port_and_wildcard(named, start_gateway):
    gateway = start_gateway({"routes": [
        {"id": "any", "uri": "/*", "upstream": to(named["a"])},
        {"id": "api", "uri": "/*", "host": "api.example.com", "upstream": to(named["b"])},
        {"id": "wild", "uri": "/*", "host": "*.example.com", "upstream": to(named["c"])},
    ]})
    assert served_by(gateway, "/", host="api.example.com") == "b"
    assert served_by(gateway, "/", host="API.example.com:9080") == "b"
    assert served_by(gateway, "/", host="www.example.com") == "c"
    assert served_by(gateway, "/", host="example.com") == "a"
    assert served_by(gateway, "/", host="127.0.0.1") == "a"


def test_gateway_routes_by_method_vars_and_priority(named, start_gateway):
    gateway = start_gateway({"routes": [
        {"id": "write", "uri": "/items", "methods": ["POST"], "upstream": to(named["a"])},
        {"id": "beta", "uri": "/items", "priority": 5, "upstream": to(named["b"]),
         "vars": [["arg_beta", "==", "1"], ["http_x_team", "~~", "^core"]]},
        {"id": "read", "uri": "/items", "upstream": to(named["c"])},
        {"id": "remote", "uri": "/internal", "remote_addrs": ["10.0.0.0/8"],
         "upstream": to(named["d"])},
    ]})
    assert served_by(gateway, "/items", method="POST") == "a"
    assert served_by(gateway, "/items") == "c"
    assert served_by(gateway, "/items?beta=1", headers={"X-Team": "core-api"}) == "b"
    assert served_by(gateway, "/items?beta=1", headers={"X-Team": "web"}) == "c"
    assert served_by(gateway, "/items?beta=0", headers={"X-Team": "core"}) == "c"
    assert served_by(gateway, "/internal") is None  # the test client is 127.0.0.1
