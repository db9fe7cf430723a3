"""cors: unit tests over real request contexts, then through a running gateway."""

import http.client
import json
import time
import uuid

from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import (
    PluginEnv,
    PluginMeta,
    build_chain,
    load_plugins,
    validate_plugin,
)
from sluicegate.plugins.cors import ALL_METHODS, Cors

PATH = "routes[0].plugins.cors"
APP = "https://app.example"
CORS_NAMES = ("access-control-allow-origin", "access-control-allow-methods",
              "access-control-allow-headers", "access-control-expose-headers",
              "access-control-max-age", "access-control-allow-credentials")


def make_ctx(method="GET", headers=()):
    raw = [(b"Host", b"api.example"), *[(k.encode(), v.encode()) for k, v in headers]]
    return RequestContext(method, "/items", "", raw, "api.example", ("192.0.2.9", 40000),
                          ("10.0.0.1", 9080), "1.1")


def plugin(**conf):
    model, _, errors = validate_plugin("cors", conf, PATH)
    assert errors == []
    return Cors(model, PluginEnv())


def errors_of(conf):
    return validate_plugin("cors", conf, PATH)[2]


def preflight_ctx(origin=APP, method="PUT", request_headers=None):
    headers = [("Origin", origin), ("Access-Control-Request-Method", method)]
    if request_headers is not None:
        headers.append(("Access-Control-Request-Headers", request_headers))
    return make_ctx("OPTIONS", headers)


def respond(cors, ctx, upstream_headers=(("Content-Type", "application/json"),)):
    """Run a request through the plugin as the data plane does: rewrite, then (unless it
    answered) the upstream's response through header_filter. Returns (status, headers by
    lower-case name; repeated names joined with ', ')."""
    answer = cors.rewrite(ctx)
    if answer is None:
        ctx.response_status = 200
        ctx.response_headers = list(upstream_headers)
    else:
        ctx.response_status = answer.status
        ctx.response_headers = list(answer.headers)
    cors.header_filter(ctx)
    headers = {}
    for name, value in ctx.response_headers:
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return ctx.response_status, headers, answer


def cors_headers(headers):
    return {name: value for name, value in headers.items() if name in CORS_NAMES}


# -- config ------------------------------------------------------------------------------


def test_cors_has_apisix_name_priority_and_defaults():
    assert load_plugins()["cors"].priority == 4000
    model, _, _ = validate_plugin("cors", {}, PATH)
    assert (model.allow_origins, model.allow_methods, model.allow_headers) == ("*", "*", "*")
    assert model.expose_headers is None
    assert model.max_age == 5
    assert model.allow_credential is False
    assert model.allow_origins_by_regex is None


def test_cors_credentials_with_a_wildcard_is_an_error_naming_each_field():
    assert errors_of({"allow_credential": True}) == [
        f"{PATH}.{field}: '*' is not allowed when allow_credential is true; list the values "
        "(or use '**' to allow any)" for field in ("allow_origins", "allow_methods",
                                                   "allow_headers")]
    (error,) = errors_of({"allow_credential": True, "allow_origins": APP,
                          "allow_methods": "GET", "allow_headers": "X-Token",
                          "expose_headers": "*"})
    assert error.startswith(f"{PATH}.expose_headers: '*' is not allowed")


def test_cors_credentials_accept_listed_values_and_double_star():
    assert errors_of({"allow_credential": True, "allow_origins": APP,
                      "allow_methods": "GET,POST", "allow_headers": "X-Token"}) == []
    assert errors_of({"allow_credential": True, "allow_origins": "**",
                      "allow_methods": "**", "allow_headers": "**"}) == []


def test_cors_rejects_malformed_origins_and_regexes():
    (error,) = errors_of({"allow_origins": "app.example"})
    assert error.startswith(f"{PATH}.allow_origins: expected '*', '**', 'null' or")
    assert errors_of({"allow_origins": f"{APP},http://b.example:8080"}) == []
    assert errors_of({"allow_origins_by_regex": ["https://ok", "(unclosed"]}) == [
        f"{PATH}.allow_origins_by_regex[1]: invalid regex: missing ), unterminated "
        "subpattern at position 0"]
    (error,) = errors_of({"allow_origins_by_regex": []})
    assert error.startswith(f"{PATH}.allow_origins_by_regex:")


def test_cors_rejects_header_values_that_would_break_the_response():
    (error,) = errors_of({"expose_headers": "X-A\r\nSet-Cookie: x=1"})
    assert error.startswith(f"{PATH}.expose_headers:")


# -- preflight ---------------------------------------------------------------------------


def test_cors_preflight_is_answered_by_the_gateway_with_apisix_defaults():
    _, headers, answer = respond(plugin(), preflight_ctx())
    assert answer is not None and answer.status == 200 and answer.body == b""
    assert cors_headers(headers) == {
        "access-control-allow-origin": "*",
        "access-control-allow-methods": "*",
        "access-control-allow-headers": "*",
        "access-control-max-age": "5",
    }
    assert "vary" not in headers  # `*` is the same answer for every origin


def test_cors_options_without_request_method_goes_to_the_upstream():
    # Not a preflight (Fetch standard): a plain OPTIONS, e.g. for the server's Allow.
    cors = plugin()
    assert cors.rewrite(make_ctx("OPTIONS", [("Origin", APP)])) is None
    assert cors.rewrite(make_ctx("OPTIONS", [("Access-Control-Request-Method", "GET")])) \
        is None


def test_cors_preflight_from_a_disallowed_origin_gets_200_without_cors_headers():
    status, headers, answer = respond(plugin(allow_origins=APP),
                                      preflight_ctx("https://evil.example"))
    assert answer is not None and status == 200
    assert cors_headers(headers) == {}
    assert headers["vary"] == "Origin"


def test_cors_preflight_lists_configured_methods_headers_and_max_age():
    cors = plugin(allow_origins=APP, allow_methods="GET,PUT", allow_headers="X-Token,X-Trace",
                  max_age=600)
    _, headers, _ = respond(cors, preflight_ctx(request_headers="x-token"))
    assert headers["access-control-allow-origin"] == APP
    assert headers["access-control-allow-methods"] == "GET,PUT"
    assert headers["access-control-allow-headers"] == "X-Token,X-Trace"
    assert headers["access-control-max-age"] == "600"


def test_cors_double_star_methods_expand_and_headers_echo_the_request():
    cors = plugin(allow_methods="**", allow_headers="**")
    _, headers, _ = respond(cors, preflight_ctx(request_headers="X-Token, Content-Type"))
    assert headers["access-control-allow-methods"] == ALL_METHODS
    assert headers["access-control-allow-headers"] == "X-Token, Content-Type"
    _, headers, _ = respond(cors, preflight_ctx())
    assert "access-control-allow-headers" not in headers  # nothing requested


def test_cors_max_age_minus_one_disables_preflight_caching():
    _, headers, _ = respond(plugin(max_age=-1), preflight_ctx())
    assert headers["access-control-max-age"] == "-1"


# -- actual requests ---------------------------------------------------------------------


def test_cors_actual_request_goes_upstream_and_its_response_gets_the_headers():
    cors = plugin(expose_headers="X-Request-Id,X-Total")
    _, headers, answer = respond(cors, make_ctx("GET", [("Origin", APP)]),
                                 [("Content-Type", "text/plain"),
                                  ("Access-Control-Allow-Origin", "https://stale")])
    assert answer is None
    assert headers["content-type"] == "text/plain"
    assert headers["access-control-allow-origin"] == "*"  # the upstream's is replaced
    assert headers["access-control-expose-headers"] == "X-Request-Id,X-Total"


def test_cors_expose_headers_unset_sends_no_expose_header():
    _, headers, _ = respond(plugin(), make_ctx("GET", [("Origin", APP)]),
                            [("Access-Control-Expose-Headers", "X-From-Upstream")])
    assert headers["access-control-expose-headers"] == "X-From-Upstream"


def test_cors_listed_origins_are_echoed_and_others_get_nothing():
    cors = plugin(allow_origins=f"{APP},http://localhost:3000")
    for origin in (APP, "http://localhost:3000"):
        _, headers, _ = respond(cors, make_ctx("GET", [("Origin", origin)]))
        assert headers["access-control-allow-origin"] == origin
        assert headers["vary"] == "Origin"
    for origin in ("https://app.example.evil", "http://localhost:3001", "null"):
        _, headers, _ = respond(cors, make_ctx("GET", [("Origin", origin)]))
        assert cors_headers(headers) == {}, origin
        assert headers["vary"] == "Origin"


def test_cors_request_without_origin_gets_no_headers_from_an_origin_list():
    _, headers, _ = respond(plugin(allow_origins=APP), make_ctx("GET"))
    assert cors_headers(headers) == {}


def test_cors_star_origin_is_sent_even_without_an_origin_header():
    # APISIX: `*` allows every request, so the answer is the same with or without Origin.
    _, headers, _ = respond(plugin(), make_ctx("GET"))
    assert headers["access-control-allow-origin"] == "*"


def test_cors_double_star_origin_echoes_any_origin():
    cors = plugin(allow_origins="**", allow_methods="GET", allow_headers="X-Token",
                  allow_credential=True)
    _, headers, _ = respond(cors, make_ctx("GET", [("Origin", "https://any.example")]))
    assert headers["access-control-allow-origin"] == "https://any.example"
    assert headers["access-control-allow-credentials"] == "true"
    assert headers["vary"] == "Origin"
    _, headers, _ = respond(cors, make_ctx("GET"))
    assert headers["access-control-allow-origin"] == "*"


def test_cors_null_origin_can_be_allowed_explicitly():
    _, headers, _ = respond(plugin(allow_origins="null"), make_ctx("GET", [("Origin", "null")]))
    assert headers["access-control-allow-origin"] == "null"


def test_cors_allow_credential_sends_credentials_header_and_the_exact_origin():
    cors = plugin(allow_origins=APP, allow_methods="GET,POST", allow_headers="Authorization",
                  allow_credential=True)
    _, headers, _ = respond(cors, preflight_ctx(method="POST"))
    assert headers["access-control-allow-credentials"] == "true"
    assert headers["access-control-allow-origin"] == APP
    _, headers, _ = respond(plugin(), make_ctx("GET", [("Origin", APP)]))
    assert "access-control-allow-credentials" not in headers


def test_cors_vary_origin_is_merged_into_the_upstreams_vary():
    cors = plugin(allow_origins=APP)
    ctx = make_ctx("GET", [("Origin", APP)])
    _, headers, _ = respond(cors, ctx, [("Vary", "Accept-Encoding")])
    assert headers["vary"] == "Accept-Encoding, Origin"
    _, headers, _ = respond(cors, make_ctx("GET", [("Origin", APP)]), [("vary", "origin")])
    assert headers["vary"] == "origin"
    _, headers, _ = respond(cors, make_ctx("GET", [("Origin", APP)]), [("Vary", "*")])
    assert headers["vary"] == "*"


# -- regex origins -----------------------------------------------------------------------


def test_cors_regex_origins_allow_matching_origins_only():
    cors = plugin(allow_origins_by_regex=[r"https://[a-z]+\.example\.com",
                                          r"http://localhost:\d+"])
    for origin in ("https://a.example.com", "https://shop.example.com", "http://localhost:8080"):
        _, headers, _ = respond(cors, make_ctx("GET", [("Origin", origin)]))
        assert headers["access-control-allow-origin"] == origin, origin
        assert headers["vary"] == "Origin"
    for origin in ("https://example.com", "http://a.example.com", "https://a.b.example.com"):
        _, headers, _ = respond(cors, make_ctx("GET", [("Origin", origin)]))
        assert cors_headers(headers) == {}, origin


def test_cors_regex_must_match_the_whole_origin():
    cors = plugin(allow_origins_by_regex=[r"https://.*\.example\.com"])
    for origin in ("https://a.example.com.evil.net", "evilhttps://a.example.com"):
        _, headers, _ = respond(cors, make_ctx("GET", [("Origin", origin)]))
        assert cors_headers(headers) == {}, origin


def test_cors_regex_origins_override_allow_origins():
    # APISIX docs: when allow_origins_by_regex is set, allow_origins is ignored, so the
    # default `*` does not let every origin through.
    cors = plugin(allow_origins_by_regex=[r"https://.*\.example\.com"])
    _, headers, _ = respond(cors, make_ctx("GET", [("Origin", "https://other.net")]))
    assert cors_headers(headers) == {}
    cors = plugin(allow_origins="https://listed.net",
                  allow_origins_by_regex=[r"https://.*\.example\.com"])
    _, headers, _ = respond(cors, make_ctx("GET", [("Origin", "https://listed.net")]))
    assert cors_headers(headers) == {}


def test_cors_regex_preflight_without_origin_match_gets_no_headers():
    cors = plugin(allow_origins_by_regex=[r"https://.*\.example\.com"])
    _, headers, answer = respond(cors, preflight_ctx("https://x.example.com"))
    assert answer is not None and headers["access-control-allow-origin"] == \
        "https://x.example.com"
    _, headers, answer = respond(cors, preflight_ctx("https://x.other.com"))
    assert answer is not None and cors_headers(headers) == {}


# -- order with other plugins ------------------------------------------------------------


def test_cors_uses_the_origin_the_client_sent_even_if_a_later_plugin_changes_it():
    proxy_rewrite, _, _ = validate_plugin("proxy-rewrite",
                                          {"headers": {"set": {"Origin": "https://internal"}}},
                                          "p")
    cors, _, _ = validate_plugin("cors", {"allow_origins": APP}, "c")
    chain = build_chain([("proxy-rewrite", proxy_rewrite, PluginMeta()),
                         ("cors", cors, PluginMeta())], PluginEnv())
    assert [p.name for p in chain.plugins] == ["cors", "proxy-rewrite"]
    ctx = make_ctx("GET", [("Origin", APP)])
    for hook in chain.request_hooks:
        assert hook(ctx) is None
    assert ctx.get_header("Origin") == "https://internal"
    ctx.response_headers = []
    for hook in chain.header_filter:
        hook(ctx)
    assert dict(ctx.response_headers)["Access-Control-Allow-Origin"] == APP


def test_cors_headers_are_added_when_the_gateway_itself_answers_before_cors_ran():
    # E.g. a higher-priority plugin answered in rewrite: header_filter reads the header.
    cors = plugin(allow_origins=APP)
    ctx = make_ctx("GET", [("Origin", APP)])
    ctx.response_headers = [("Content-Type", "application/json")]
    cors.header_filter(ctx)
    assert ("Access-Control-Allow-Origin", APP) in ctx.response_headers


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


def logged_after(nginx, mark):
    """nginx's access log once it holds `mark` (nginx logs after answering)."""
    deadline = time.monotonic() + 5
    while mark not in (log := nginx.access_log()):
        assert time.monotonic() < deadline, f"{mark} never reached nginx"
        time.sleep(0.02)
    return log


def cors_route(upstream, conf, uri="/*", route_id="r1", extra=None):
    return {"id": route_id, "uri": uri, "upstream": {"nodes": {upstream.address: 1}},
            "plugins": {"cors": conf, **(extra or {})}}


def test_cors_preflight_is_answered_without_reaching_the_upstream(nginx, start_gateway):
    gateway = start_gateway({"routes": [cors_route(nginx, {
        "allow_origins": APP, "allow_methods": "GET,PUT", "allow_headers": "X-Token",
        "max_age": 60})]})
    marker = uuid.uuid4().hex
    reply = call(gateway, f"/headers?preflight={marker}", {
        "Origin": APP, "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "x-token"}, method="OPTIONS")
    assert reply.status == 200
    assert reply.body == b""
    assert reply.headers["Access-Control-Allow-Origin"] == APP
    assert reply.headers["Access-Control-Allow-Methods"] == "GET,PUT"
    assert reply.headers["Access-Control-Allow-Headers"] == "X-Token"
    assert reply.headers["Access-Control-Max-Age"] == "60"
    assert reply.headers["Vary"] == "Origin"
    # The same route does proxy an actual request, which nginx logs; the preflight it
    # never saw.
    actual = call(gateway, f"/headers?actual={marker}", {"Origin": APP})
    assert actual.status == 200 and b"method=GET" in actual.body
    assert actual.headers["Access-Control-Allow-Origin"] == APP
    assert f"preflight={marker}" not in logged_after(nginx, f"actual={marker}")


def test_cors_plain_options_request_is_proxied(echo, start_gateway):
    gateway = start_gateway({"routes": [cors_route(echo, {})]})
    reply = call(gateway, "/things", {"Origin": APP}, method="OPTIONS")
    assert reply.status == 200
    assert json.loads(reply.body)["method"] == "OPTIONS"
    assert reply.headers["Access-Control-Allow-Origin"] == "*"


def test_cors_actual_request_gets_headers_on_the_upstream_response(echo, start_gateway):
    gateway = start_gateway({"routes": [cors_route(echo, {
        "allow_origins": f"{APP},https://admin.example", "expose_headers": "X-Total"})]})
    reply = call(gateway, "/list?header=Vary:Accept-Encoding", {"Origin": APP})
    assert reply.status == 200
    assert json.loads(reply.body)["target"] == "/list?header=Vary:Accept-Encoding"
    assert reply.headers["Access-Control-Allow-Origin"] == APP
    assert reply.headers["Access-Control-Expose-Headers"] == "X-Total"
    assert reply.headers["Access-Control-Allow-Methods"] == "*"
    assert reply.headers["Vary"] == "Accept-Encoding, Origin"


def test_cors_disallowed_origin_gets_no_cors_headers_through_the_gateway(echo, start_gateway):
    gateway = start_gateway({"routes": [cors_route(echo, {"allow_origins": APP})]})
    reply = call(gateway, "/list", {"Origin": "https://evil.example"})
    assert reply.status == 200  # the request is served; the browser withholds it
    assert not [name for name in reply.headers if name.lower().startswith("access-control-")]
    preflight = call(gateway, "/list", {"Origin": "https://evil.example",
                                        "Access-Control-Request-Method": "DELETE"},
                     method="OPTIONS")
    assert preflight.status == 200 and preflight.body == b""
    assert not [name for name in preflight.headers
                if name.lower().startswith("access-control-")]


def test_cors_regex_origins_through_the_gateway(echo, start_gateway):
    gateway = start_gateway({"routes": [cors_route(echo, {
        "allow_origins_by_regex": [r"https://[a-z0-9-]+\.example\.com"]})]})
    allowed = call(gateway, "/", {"Origin": "https://shop-1.example.com"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://shop-1.example.com"
    denied = call(gateway, "/", {"Origin": "https://shop.example.com.evil.net"})
    assert denied.headers["Access-Control-Allow-Origin"] is None


def test_cors_credentials_through_the_gateway(echo, start_gateway):
    gateway = start_gateway({"routes": [cors_route(echo, {
        "allow_origins": APP, "allow_methods": "GET,POST", "allow_headers": "Authorization",
        "allow_credential": True})]})
    preflight = call(gateway, "/me", {"Origin": APP, "Access-Control-Request-Method": "POST",
                                      "Access-Control-Request-Headers": "authorization"},
                     method="OPTIONS")
    assert preflight.status == 200
    assert preflight.headers["Access-Control-Allow-Credentials"] == "true"
    assert preflight.headers["Access-Control-Allow-Origin"] == APP
    actual = call(gateway, "/me", {"Origin": APP, "Cookie": "session=1"})
    assert actual.headers["Access-Control-Allow-Credentials"] == "true"


def test_cors_credentials_with_wildcards_stop_the_gateway_from_starting(echo, start_gateway):
    gateway = start_gateway({"routes": [cors_route(echo, {"allow_credential": True})]},
                            wait=False)
    assert gateway.process.wait(30) != 0
    assert "plugins.cors.allow_origins" in gateway.log()


def test_cors_preflight_passes_an_auth_plugin_and_its_401_carries_cors_headers(
        echo, start_gateway):
    # cors (4000) answers the preflight before key-auth (2500) asks for a key, and a
    # browser can read the 401 of an actual request because it has CORS headers.
    gateway = start_gateway({
        "consumers": [{"username": "jack", "plugins": {"key-auth": {"key": "jack-key-123"}}}],
        "routes": [cors_route(echo, {"allow_origins": APP}, extra={"key-auth": {}})]})
    preflight = call(gateway, "/private", {"Origin": APP,
                                           "Access-Control-Request-Method": "GET"},
                     method="OPTIONS")
    assert preflight.status == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == APP
    rejected = call(gateway, "/private", {"Origin": APP})
    assert rejected.status == 401
    assert rejected.headers["Access-Control-Allow-Origin"] == APP
