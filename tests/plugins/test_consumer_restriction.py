"""consumer-restriction: hooks driven with real request contexts and routes, then through a
running gateway behind key-auth and jwt-auth."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import jwt
import pytest

from sluicegate.http.context import RequestContext
from sluicegate.http.snapshot import CompiledRoute
from sluicegate.plugins.base import (
    EMPTY_CHAIN,
    Consumer,
    PluginEnv,
    build_chain,
    validate_plugin,
)
from sluicegate.plugins.consumer_restriction import ConsumerRestriction

PATH = "routes[0].plugins.consumer-restriction"


def make_ctx(consumer=None, route_id="r1", service_id=None, method="GET"):
    ctx = RequestContext(method, "/orders", "", [(b"Host", b"api.example")], "api.example",
                         ("10.0.0.7", 50000), ("10.0.0.1", 9080), "1.1")
    if consumer is not None:
        ctx.consumer = Consumer(consumer)
        ctx.consumer_name = consumer
    if route_id is not None:
        ctx.route = CompiledRoute(route_id, None, service_id, None, EMPTY_CHAIN)
    return ctx


def plugin(**conf):
    model, _, errors = validate_plugin("consumer-restriction", conf, PATH)
    assert errors == []
    return ConsumerRestriction(model, PluginEnv())


def errors_for(conf):
    return validate_plugin("consumer-restriction", conf, PATH)[2]


def message(response):
    assert ("Content-Type", "application/json") in response.headers
    return json.loads(response.body)["message"]


# -- by consumer --------------------------------------------------------------------------


def test_consumer_restriction_whitelist_admits_listed_consumer():
    assert plugin(whitelist=["jack", "rose"]).access(make_ctx("rose")) is None


def test_consumer_restriction_whitelist_rejects_unlisted_consumer():
    response = plugin(whitelist=["jack"]).access(make_ctx("rose"))
    assert response.status == 403
    assert message(response) == "The consumer_name is forbidden."


def test_consumer_restriction_blacklist_rejects_listed_consumer():
    response = plugin(blacklist=["rose"]).access(make_ctx("rose"))
    assert response.status == 403
    assert message(response) == "The consumer_name is forbidden."


def test_consumer_restriction_blacklist_admits_unlisted_consumer():
    assert plugin(blacklist=["rose"]).access(make_ctx("jack")) is None


def test_consumer_restriction_rejects_request_without_consumer_with_401():
    for conf in ({"whitelist": ["jack"]}, {"blacklist": ["rose"]}):
        response = plugin(**conf).access(make_ctx(None))
        assert response.status == 401
        assert message(response) == "Missing authentication or identity verification."


def test_consumer_restriction_rejected_code_and_msg_are_configurable():
    response = plugin(whitelist=["jack"], rejected_code=451,
                      rejected_msg="not for you").access(make_ctx("rose"))
    assert response.status == 451
    assert message(response) == "not for you"


def test_consumer_restriction_each_rejection_is_a_fresh_response():
    auth = plugin(whitelist=["jack"])
    first = auth.access(make_ctx("rose"))
    first.headers.append(("X-Edited", "1"))
    assert ("X-Edited", "1") not in auth.access(make_ctx("rose")).headers


# -- by route and service -----------------------------------------------------------------


def test_consumer_restriction_route_id_whitelist_and_blacklist():
    assert plugin(type="route_id", whitelist=["r1"]).access(make_ctx(route_id="r1")) is None
    response = plugin(type="route_id", whitelist=["r1"]).access(make_ctx(route_id="r2"))
    assert response.status == 403
    assert message(response) == "The route_id is forbidden."
    assert plugin(type="route_id", blacklist=["r2"]).access(make_ctx(route_id="r1")) is None
    assert plugin(type="route_id", blacklist=["r2"]).access(make_ctx(route_id="r2")).status == 403


def test_consumer_restriction_route_id_needs_no_consumer():
    assert plugin(type="route_id", whitelist=["r1"]).access(make_ctx(None)) is None


def test_consumer_restriction_numeric_ids_match_their_text():
    assert plugin(type="route_id", whitelist=[1]).access(make_ctx(route_id="1")) is None
    assert plugin(type="service_id", blacklist=[7]).access(
        make_ctx(service_id="7")).status == 403


def test_consumer_restriction_service_id_whitelist_and_blacklist():
    whitelist = plugin(type="service_id", whitelist=["billing"])
    assert whitelist.access(make_ctx(service_id="billing")) is None
    response = whitelist.access(make_ctx(service_id="search"))
    assert response.status == 403
    assert message(response) == "The service_id is forbidden."
    blacklist = plugin(type="service_id", blacklist=["search"])
    assert blacklist.access(make_ctx(service_id="billing")) is None
    assert blacklist.access(make_ctx(service_id="search")).status == 403


def test_consumer_restriction_route_without_service_is_not_on_a_service_whitelist():
    assert plugin(type="service_id", whitelist=["billing"]).access(
        make_ctx(service_id=None)).status == 403
    assert plugin(type="service_id", blacklist=["billing"]).access(
        make_ctx(service_id=None)) is None


# -- allowed_by_methods -------------------------------------------------------------------


def test_consumer_restriction_allowed_by_methods_limits_a_named_consumer():
    auth = plugin(blacklist=["eve"], allowed_by_methods=[{"user": "jack",
                                                         "methods": ["GET", "HEAD"]}])
    assert auth.access(make_ctx("jack", method="GET")) is None
    assert auth.access(make_ctx("jack", method="HEAD")) is None
    response = auth.access(make_ctx("jack", method="POST"))
    assert response.status == 403
    assert message(response) == "The consumer_name is forbidden."
    # Consumers it does not name are unaffected.
    assert auth.access(make_ctx("rose", method="DELETE")) is None


def test_consumer_restriction_allowed_by_methods_narrows_a_whitelisted_consumer():
    auth = plugin(whitelist=["jack", "rose"],
                  allowed_by_methods=[{"user": "jack", "methods": ["GET"]}])
    assert auth.access(make_ctx("jack", method="GET")) is None
    assert auth.access(make_ctx("jack", method="PUT")).status == 403
    assert auth.access(make_ctx("rose", method="PUT")) is None


def test_consumer_restriction_allowed_by_methods_entries_for_one_user_add_up():
    auth = plugin(blacklist=["eve"], allowed_by_methods=[
        {"user": "jack", "methods": ["GET"]}, {"user": "jack", "methods": ["POST"]}])
    assert auth.access(make_ctx("jack", method="POST")) is None
    assert auth.access(make_ctx("jack", method="PATCH")).status == 403


# -- configuration ------------------------------------------------------------------------


def test_consumer_restriction_defaults_follow_apisix():
    model, _, errors = validate_plugin("consumer-restriction", {"whitelist": ["jack"]}, PATH)
    assert errors == []
    assert (model.type, model.rejected_code, model.rejected_msg, model.allowed_by_methods) == (
        "consumer_name", 403, None, None)


@pytest.mark.parametrize("conf", [{}, {"whitelist": ["a"], "blacklist": ["b"]},
                                  {"allowed_by_methods": [{"user": "a", "methods": ["GET"]}]}])
def test_consumer_restriction_needs_exactly_one_of_whitelist_and_blacklist(conf):
    assert errors_for(conf) == [f"{PATH}: set exactly one of whitelist and blacklist"]


def test_consumer_restriction_config_errors_name_the_field():
    assert errors_for({"whitelist": []})[0].startswith(f"{PATH}.whitelist:")
    assert errors_for({"whitelist": ["a"], "type": "consumer_group_id"})[0].startswith(
        f"{PATH}.type:")
    assert errors_for({"whitelist": ["a"], "rejected_code": 99})[0].startswith(
        f"{PATH}.rejected_code:")
    assert errors_for({"whitelist": ["a"], "allowed_by_methods": [
        {"user": "a", "methods": ["FETCH"]}]})[0].startswith(
        f"{PATH}.allowed_by_methods[0].methods[0]:")
    assert errors_for({"whitelist": ["a"], "allowed_by_methods": [{"user": "a"}]}) == [
        f"{PATH}.allowed_by_methods[0].methods: Field required"]
    assert errors_for({"whitelist": ["a"], "whitelst": ["b"]})[0].startswith(f"{PATH}.whitelst:")


def test_consumer_restriction_runs_after_the_auth_plugins():
    entries = []
    for name, conf in (("consumer-restriction", {"whitelist": ["jack"]}), ("key-auth", {}),
                       ("jwt-auth", {}), ("basic-auth", {})):
        model, meta, _ = validate_plugin(name, conf, name)
        entries.append((name, model, meta))
    chain = build_chain(entries, PluginEnv())
    assert [p.name for p in chain.plugins] == ["basic-auth", "jwt-auth", "key-auth",
                                               "consumer-restriction"]


# -- through a running gateway ------------------------------------------------------------

JWT_SECRET = "jack-hs256-secret-0123456789abcdef"
CONSUMERS = [
    {"username": "jack", "plugins": {"key-auth": {"key": "jack-key"},
                                     "jwt-auth": {"key": "jack-jwt", "secret": JWT_SECRET}}},
    {"username": "rose", "plugins": {"key-auth": {"key": "rose-key"}}},
]


def call(gateway: Any, path: str, headers: dict[str, str] | None = None,
         method: str = "GET") -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        is_json = response.headers.get("Content-Type", "").startswith("application/json")
        return response.status, json.loads(body) if is_json else body
    finally:
        connection.close()


def route(upstream, id, uri, plugins, **extra):
    return {"id": id, "uri": uri, "upstream": {"nodes": {upstream.address: 1}},
            "plugins": plugins, **extra}


def test_consumer_restriction_gateway_whitelist_by_consumer(echo, start_gateway):
    gateway = start_gateway({"consumers": CONSUMERS, "routes": [route(echo, "r1", "/*", {
        "key-auth": {}, "consumer-restriction": {"whitelist": ["jack"]}})]})
    status, body = call(gateway, "/orders", {"apikey": "jack-key"})
    assert status == 200 and body["target"] == "/orders"
    assert call(gateway, "/orders", {"apikey": "rose-key"}) == (
        403, {"message": "The consumer_name is forbidden."})
    # Without credentials key-auth answers first.
    assert call(gateway, "/orders") == (401, {"message": "Missing API key in request"})


def test_consumer_restriction_gateway_blacklist_by_consumer_behind_jwt_auth(
        echo, start_gateway):
    gateway = start_gateway({"consumers": CONSUMERS, "routes": [route(echo, "r1", "/*", {
        "jwt-auth": {},
        "consumer-restriction": {"blacklist": ["jack"], "rejected_code": 401,
                                 "rejected_msg": "jack is suspended"}})]})
    token = jwt.encode({"key": "jack-jwt", "exp": int(time.time()) + 60}, JWT_SECRET)
    assert call(gateway, "/", {"Authorization": f"Bearer {token}"}) == (
        401, {"message": "jack is suspended"})
    assert call(gateway, "/") == (401, {"message": "Missing JWT token in request"})


def test_consumer_restriction_gateway_blacklist_admits_other_consumers(echo, start_gateway):
    gateway = start_gateway({"consumers": CONSUMERS, "routes": [route(echo, "r1", "/*", {
        "key-auth": {}, "consumer-restriction": {"blacklist": ["jack"]}})]})
    assert call(gateway, "/", {"apikey": "rose-key"})[0] == 200
    assert call(gateway, "/", {"apikey": "jack-key"}) == (
        403, {"message": "The consumer_name is forbidden."})


def test_consumer_restriction_gateway_by_route_id(echo, start_gateway):
    restriction = {"type": "route_id", "whitelist": ["public"]}
    gateway = start_gateway({"routes": [
        route(echo, "public", "/public/*", {"consumer-restriction": restriction}),
        route(echo, "private", "/private/*", {"consumer-restriction": restriction}),
        route(echo, "blocked", "/blocked/*",
              {"consumer-restriction": {"type": "route_id", "blacklist": ["blocked"]}}),
    ]})
    assert call(gateway, "/public/x")[0] == 200
    assert call(gateway, "/private/x") == (403, {"message": "The route_id is forbidden."})
    assert call(gateway, "/blocked/x") == (403, {"message": "The route_id is forbidden."})


def test_consumer_restriction_gateway_by_service_id_from_the_service(echo, start_gateway):
    gateway = start_gateway({
        "services": [
            {"id": "billing", "upstream": {"nodes": {echo.address: 1}}, "plugins": {
                "consumer-restriction": {"type": "service_id", "blacklist": ["billing"]}}},
            {"id": "search", "upstream": {"nodes": {echo.address: 1}}, "plugins": {
                "consumer-restriction": {"type": "service_id", "blacklist": ["billing"]}}},
        ],
        "routes": [{"id": "b", "uri": "/billing/*", "service_id": "billing"},
                   {"id": "s", "uri": "/search/*", "service_id": "search"}]})
    assert call(gateway, "/search/q")[0] == 200
    assert call(gateway, "/billing/invoices") == (
        403, {"message": "The service_id is forbidden."})


def test_consumer_restriction_gateway_allowed_by_methods(echo, start_gateway):
    gateway = start_gateway({"consumers": CONSUMERS, "routes": [route(echo, "r1", "/*", {
        "key-auth": {}, "consumer-restriction": {
            "whitelist": ["jack", "rose"],
            "allowed_by_methods": [{"user": "rose", "methods": ["GET"]}]}})]})
    assert call(gateway, "/", {"apikey": "rose-key"})[0] == 200
    assert call(gateway, "/", {"apikey": "rose-key"}, method="DELETE")[0] == 403
    assert call(gateway, "/", {"apikey": "jack-key"}, method="DELETE")[0] == 200
