import json

from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Consumer, PluginEnv, build_chain, validate_plugin
from sluicegate.plugins.key_auth import KeyAuth


def make_ctx(headers=(), query=""):
    raw = [(b"Host", b"api.example"), *[(k.encode(), v.encode()) for k, v in headers]]
    return RequestContext("GET", "/orders", query, raw, "api.example", ("10.0.0.7", 50000),
                          ("10.0.0.1", 9080), "1.1")


def consumer(username, key):
    credential, _, errors = validate_plugin("key-auth", {"key": key}, "c", for_consumer=True)
    assert errors == []
    return Consumer(username, {"key-auth": credential})


def plugin(**conf):
    model, _, errors = validate_plugin("key-auth", conf, "routes[0].plugins.key-auth")
    assert errors == []
    env = PluginEnv({"jack": consumer("jack", "jack-key"), "rose": consumer("rose", "rose-key")})
    return KeyAuth(model, env)


def forwarded(ctx):
    return [(k.decode(), v.decode()) for k, v in ctx.raw_headers]


def test_key_auth_rejects_missing_key():
    response = plugin().access(make_ctx())
    assert response.status == 401
    assert json.loads(response.body) == {"message": "Missing API key in request"}
    assert ("Content-Type", "application/json") in response.headers


def test_key_auth_rejects_wrong_key():
    ctx = make_ctx([("apikey", "nope")])
    response = plugin().access(ctx)
    assert response.status == 401
    assert json.loads(response.body) == {"message": "Invalid API key in request"}
    assert ctx.consumer_name is None


def test_key_auth_identifies_consumer():
    ctx = make_ctx([("apikey", "rose-key")])
    assert plugin().access(ctx) is None
    assert ctx.consumer_name == "rose"
    assert ctx.consumer.username == "rose"
    assert ctx.var("consumer_name") == "rose"


def test_key_auth_reads_key_from_query_argument():
    ctx = make_ctx(query="page=2&apikey=jack-key")
    assert plugin().access(ctx) is None
    assert ctx.consumer_name == "jack"


def test_key_auth_header_takes_precedence_over_query():
    ctx = make_ctx([("apikey", "wrong")], query="apikey=jack-key")
    assert plugin().access(ctx).status == 401


def test_key_auth_uses_configured_header_and_query_names():
    auth = plugin(header="X-Api-Key", query="token")
    ctx = make_ctx([("x-api-key", "jack-key")])
    assert auth.access(ctx) is None and ctx.consumer_name == "jack"
    ctx = make_ctx(query="token=rose-key")
    assert auth.access(ctx) is None and ctx.consumer_name == "rose"
    assert auth.access(make_ctx([("apikey", "jack-key")])).status == 401


def test_key_auth_keeps_credentials_by_default():
    ctx = make_ctx([("apikey", "jack-key")])
    plugin().access(ctx)
    assert ("apikey", "jack-key") in forwarded(ctx)


def test_key_auth_hide_credentials_removes_header():
    ctx = make_ctx([("apikey", "jack-key"), ("Accept", "*/*")])
    assert plugin(hide_credentials=True).access(ctx) is None
    assert forwarded(ctx) == [("Host", "api.example"), ("Accept", "*/*")]
    assert ctx.get_header("apikey") is None
    assert ctx.headers_dirty


def test_key_auth_hide_credentials_removes_query_argument():
    ctx = make_ctx(query="page=2&apikey=jack-key&q=a%20b")
    assert plugin(hide_credentials=True).access(ctx) is None
    assert ctx.query == "page=2&q=a%20b"
    assert ctx.uri == "/orders" and ctx.uri_dirty
    assert ctx.var("arg_apikey") is None


def test_key_auth_config_errors_name_the_field():
    _, _, errors = validate_plugin("key-auth", {"hide_credentials": "sometimes"},
                                   "routes[0].plugins.key-auth")
    assert errors and errors[0].startswith("routes[0].plugins.key-auth.hide_credentials:")
    _, _, errors = validate_plugin("key-auth", {"hedaer": "x"}, "routes[0].plugins.key-auth")
    assert errors and errors[0].startswith("routes[0].plugins.key-auth.hedaer:")


def test_key_auth_consumer_needs_a_key():
    _, _, errors = validate_plugin("key-auth", {}, "consumers[0].plugins.key-auth",
                                   for_consumer=True)
    assert errors == ["consumers[0].plugins.key-auth.key: Field required"]


def test_key_auth_runs_in_access_phase_of_a_chain():
    model, meta, _ = validate_plugin("key-auth", {}, "p")
    chain = build_chain([("key-auth", model, meta)], PluginEnv())
    assert len(chain.request_hooks) == 1
    assert chain.request_hooks[0](make_ctx([("apikey", "x")])).status == 401
    assert chain.body_filter == [] and chain.header_filter == []
