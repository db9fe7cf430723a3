"""redirect: unit tests over real request contexts, then through a running gateway."""

import http.client
import json

import pytest

from sluicegate.http import context
from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import PluginEnv, load_plugins, validate_plugin
from sluicegate.plugins.redirect import Redirect, encode_path

PATH = "routes[0].plugins.redirect"


def make_ctx(uri="/old/page", query="", method="GET", host="shop.example", headers=()):
    raw = [(b"Host", host.encode()), *[(k.encode(), v.encode()) for k, v in headers]]
    return RequestContext(method, uri, query, raw, host, ("192.0.2.9", 40000),
                          ("10.0.0.1", 9080), "1.1")


def plugin(**conf):
    model, _, errors = validate_plugin("redirect", conf, PATH)
    assert errors == []
    return Redirect(model, PluginEnv())


def errors_of(conf):
    return validate_plugin("redirect", conf, PATH)[2]


def location(response):
    assert response is not None
    (value,) = [v for name, v in response.headers if name == "Location"]
    return value


# -- config ------------------------------------------------------------------------------


def test_redirect_has_apisix_name_priority_and_defaults():
    assert load_plugins()["redirect"].priority == 900
    model, _, _ = validate_plugin("redirect", {"uri": "/new"}, PATH)
    assert model.ret_code == 302
    assert model.encode_uri is False
    assert model.append_query_string is False
    assert model.https_port == 443


def test_redirect_needs_exactly_one_of_http_to_https_uri_and_regex_uri():
    assert errors_of({}) == [f"{PATH}: set exactly one of http_to_https, uri or regex_uri"]
    assert errors_of({"uri": "/a", "regex_uri": ["^/b", "/c"]}) == [
        f"{PATH}: set exactly one of http_to_https, uri or regex_uri (got uri, regex_uri)"]
    assert errors_of({"http_to_https": True, "uri": "/a"}) == [
        f"{PATH}: set exactly one of http_to_https, uri or regex_uri "
        "(got http_to_https, uri)"]


def test_redirect_http_to_https_cannot_append_the_query_string():
    assert errors_of({"http_to_https": True, "append_query_string": True}) == [
        f"{PATH}: only one of http_to_https and append_query_string can be set"]


def test_redirect_regex_uri_errors_name_the_element():
    (error,) = errors_of({"regex_uri": ["^/(a", "/b"]})
    assert error.startswith(f"{PATH}.regex_uri[0]: invalid regex:")
    assert errors_of({"regex_uri": ["^/(a)", "/$2"]}) == [
        f"{PATH}.regex_uri[1]: refers to capture $2 but the regex has 1 group(s)"]
    (error,) = errors_of({"regex_uri": ["^/a", "/b", "^/c", "/d"]})
    assert error.startswith(f"{PATH}.regex_uri:")


def test_redirect_rejects_bad_uri_and_ret_code():
    (error,) = errors_of({"uri": "/a\r\nSet-Cookie: x=1"})
    assert error == f"{PATH}.uri: header values may not contain CR, LF or NUL"
    (error,) = errors_of({"uri": "/"})
    assert error.startswith(f"{PATH}.uri:")
    (error,) = errors_of({"uri": "/new", "ret_code": 199})
    assert error.startswith(f"{PATH}.ret_code:")
    (error,) = errors_of({"http_to_https": True, "https_port": 70000})
    assert error.startswith(f"{PATH}.https_port:")


# -- http_to_https -----------------------------------------------------------------------


def test_redirect_http_to_https_keeps_host_path_and_query_with_301():
    response = plugin(http_to_https=True).rewrite(make_ctx("/cart/items", "page=2&sort=asc"))
    assert response.status == 301
    assert response.body == b""
    assert location(response) == "https://shop.example/cart/items?page=2&sort=asc"


def test_redirect_http_to_https_uses_308_for_methods_other_than_get_and_head():
    redirect = plugin(http_to_https=True)
    assert redirect.rewrite(make_ctx(method="HEAD")).status == 301
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert redirect.rewrite(make_ctx(method=method)).status == 308, method


def test_redirect_http_to_https_ignores_ret_code():
    assert plugin(http_to_https=True, ret_code=307).rewrite(make_ctx()).status == 301


def test_redirect_http_to_https_adds_a_non_default_https_port():
    response = plugin(http_to_https=True, https_port=9443).rewrite(make_ctx("/x"))
    assert location(response) == "https://shop.example:9443/x"


def test_redirect_http_to_https_drops_the_requests_port():
    # ctx.host is the Host header without its port, as nginx's $host.
    ctx = make_ctx("/x", host="[2001:db8::1]")
    assert location(plugin(http_to_https=True).rewrite(ctx)) == "https://[2001:db8::1]/x"


def test_redirect_http_to_https_without_host_uses_the_local_address():
    assert location(plugin(http_to_https=True).rewrite(make_ctx("/x", host=""))) == \
        "https://10.0.0.1/x"


def test_redirect_http_to_https_re_encodes_the_decoded_path():
    # The data plane decodes the path; the Location carries it encoded again.
    ctx = make_ctx("/files/a b/100%/caf\u00e9#1", "q=a%20b")
    assert location(plugin(http_to_https=True).rewrite(ctx)) == \
        "https://shop.example/files/a%20b/100%25/caf%C3%A9%231?q=a%20b"


def test_redirect_http_to_https_lets_requests_that_came_over_tls_pass(monkeypatch):
    monkeypatch.setitem(context._VARS, "scheme", lambda ctx: "https")
    assert plugin(http_to_https=True).rewrite(make_ctx()) is None


def test_redirect_http_to_https_ignores_a_clients_forwarded_proto():
    # The data plane does not trust (and drops) a client's X-Forwarded-Proto.
    ctx = make_ctx(headers=[("X-Forwarded-Proto", "https")])
    assert plugin(http_to_https=True).rewrite(ctx).status == 301


def test_redirect_http_to_https_false_does_nothing():
    assert plugin(http_to_https=False).rewrite(make_ctx()) is None


# -- uri ---------------------------------------------------------------------------------


def test_redirect_uri_answers_with_ret_code_and_location():
    response = plugin(uri="/new/home").rewrite(make_ctx())
    assert response.status == 302
    assert location(response) == "/new/home"
    assert plugin(uri="https://elsewhere.example/", ret_code=301).rewrite(
        make_ctx()).status == 301


def test_redirect_uri_substitutes_variables():
    redirect = plugin(uri="https://$host/v2${uri}?id=$arg_id&from=$remote_addr&x=$unset")
    response = redirect.rewrite(make_ctx("/items/7", "id=42"))
    assert location(response) == "https://shop.example/v2/items/7?id=42&from=192.0.2.9&x="


def test_redirect_uri_with_request_uri_variable_keeps_the_query():
    response = plugin(uri="https://new.example$request_uri").rewrite(make_ctx("/a", "b=1"))
    assert location(response) == "https://new.example/a?b=1"


def test_redirect_append_query_string_adds_the_query_after_question_mark_or_ampersand():
    assert location(plugin(uri="/new", append_query_string=True).rewrite(
        make_ctx(query="a=1&b=2"))) == "/new?a=1&b=2"
    assert location(plugin(uri="/new?src=old", append_query_string=True).rewrite(
        make_ctx(query="a=1"))) == "/new?src=old&a=1"
    assert location(plugin(uri="/new", append_query_string=True).rewrite(make_ctx())) == "/new"


def test_redirect_without_append_query_string_drops_the_query():
    assert location(plugin(uri="/new").rewrite(make_ctx(query="a=1"))) == "/new"


def test_redirect_encode_uri_percent_encodes_the_path_as_nginx_does():
    redirect = plugin(uri="/to$uri?keep=a b", encode_uri=True)
    assert location(redirect.rewrite(make_ctx("/x y/caf\u00e9/50%/#"))) == \
        "/to/x%20y/caf%C3%A9/50%25/%23?keep=a%20b"
    assert encode_path("/a-b_c.d~e!$&'()*+,;=:@/") == "/a-b_c.d~e!$&'()*+,;=:@/"


def test_redirect_location_never_carries_raw_control_or_non_ascii_characters():
    # Without encode_uri the target is kept as written, except what cannot go in a header.
    ctx = make_ctx("/caf\u00e9/\u65e5\u672c/a\x01b")
    assert location(plugin(uri="/to$uri").rewrite(ctx)) == \
        "/to/caf%C3%A9/%E6%97%A5%E6%9C%AC/a%01b"


# -- regex_uri ---------------------------------------------------------------------------


def test_redirect_regex_uri_replaces_the_match_with_captures():
    redirect = plugin(regex_uri=["^/old/(\\w+)/(\\d+)$", "/new/$2/$1"], ret_code=301)
    response = redirect.rewrite(make_ctx("/old/item/42"))
    assert response.status == 301
    assert location(response) == "/new/42/item"


def test_redirect_regex_uri_replaces_only_the_matched_part():
    redirect = plugin(regex_uri=["/v1/", "/v2/"])
    assert location(redirect.rewrite(make_ctx("/api/v1/users"))) == "/api/v2/users"


def test_redirect_regex_uri_without_match_lets_the_request_through():
    assert plugin(regex_uri=["^/old/(.*)", "/new/$1"]).rewrite(make_ctx("/other")) is None


def test_redirect_regex_uri_can_target_another_host_and_append_the_query():
    redirect = plugin(regex_uri=["^/docs/(.*)", "https://docs.example/$1"],
                      append_query_string=True)
    assert location(redirect.rewrite(make_ctx("/docs/intro", "lang=en"))) == \
        "https://docs.example/intro?lang=en"


# -- through the gateway -----------------------------------------------------------------


class Reply:
    def __init__(self, response):
        self.status = response.status
        self.headers = response.headers
        self.body = response.read()


def call(gateway, path, headers=None, method="GET"):
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        return Reply(connection.getresponse())
    finally:
        connection.close()


def redirect_route(upstream, conf, uri="/*", route_id="r1"):
    return {"id": route_id, "uri": uri, "upstream": {"nodes": {upstream.address: 1}},
            "plugins": {"redirect": conf}}


def test_redirect_http_to_https_through_the_gateway(echo, start_gateway):
    gateway = start_gateway({"routes": [redirect_route(echo, {"http_to_https": True})]})
    reply = call(gateway, "/checkout/a%20b?step=2", {"Host": "shop.example:9080"})
    assert reply.status == 301
    assert reply.headers["Location"] == "https://shop.example/checkout/a%20b?step=2"
    assert reply.body == b""
    post = call(gateway, "/checkout", {"Host": "shop.example"}, method="POST")
    assert post.status == 308
    assert post.headers["Location"] == "https://shop.example/checkout"
    # A client cannot talk its way past the redirect with X-Forwarded-Proto.
    spoofed = call(gateway, "/checkout", {"Host": "shop.example", "X-Forwarded-Proto": "https"})
    assert spoofed.status == 301


def test_redirect_http_to_https_with_https_port_through_the_gateway(echo, start_gateway):
    gateway = start_gateway({"routes": [
        redirect_route(echo, {"http_to_https": True, "https_port": 9443})]})
    reply = call(gateway, "/x", {"Host": "shop.example"})
    assert reply.headers["Location"] == "https://shop.example:9443/x"


def test_redirect_uri_through_the_gateway_does_not_call_the_upstream(nginx, start_gateway):
    gateway = start_gateway({"routes": [
        redirect_route(nginx, {"uri": "/welcome?from=$uri", "ret_code": 301,
                               "append_query_string": True}, uri="/headers")]})
    reply = call(gateway, "/headers?marker=redirect-uri-7f3a")
    assert reply.status == 301
    assert reply.headers["Location"] == "/welcome?from=/headers&marker=redirect-uri-7f3a"
    assert b"method=" not in reply.body


def test_redirect_regex_uri_through_the_gateway(echo, start_gateway):
    gateway = start_gateway({"routes": [
        redirect_route(echo, {"regex_uri": ["^/blog/(\\d{4})/(.*)$", "/posts/$2?year=$1"]})]})
    reply = call(gateway, "/blog/2024/hello-world")
    assert reply.status == 302
    assert reply.headers["Location"] == "/posts/hello-world?year=2024"
    passed = call(gateway, "/about")
    assert passed.status == 200
    assert json.loads(passed.body)["target"] == "/about"


@pytest.mark.parametrize("bad", [{"regex_uri": ["^/(a", "/b"]}, {}])
def test_redirect_invalid_config_stops_the_gateway_from_starting(echo, start_gateway, bad):
    gateway = start_gateway({"routes": [redirect_route(echo, bad)]}, wait=False)
    assert gateway.process.wait(30) != 0
    assert "plugins.redirect" in gateway.log()
