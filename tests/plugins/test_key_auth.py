import http.client
import json

import pytest

from sluicegate.config.load import ConfigError, validate_config
from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Consumer, PluginEnv, build_chain, validate_plugin
from sluicegate.plugins.key_auth import KeyAuth, hash_key


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


# -- hashed keys -----------------------------------------------------------------------------


def hashed_plugin():
    """jack's key stored as its SHA-256, rose's in plain text."""
    model, _, _ = validate_plugin("key-auth", {}, "routes[0].plugins.key-auth")
    env = PluginEnv({"jack": consumer("jack", hash_key("jack-key")),
                     "rose": consumer("rose", "rose-key")})
    return KeyAuth(model, env)


def test_key_auth_accepts_a_key_stored_as_its_sha256():
    ctx = make_ctx([("apikey", "jack-key")])
    assert hashed_plugin().access(ctx) is None
    assert ctx.consumer_name == "jack"


def test_key_auth_plain_keys_still_work_next_to_hashed_ones():
    ctx = make_ctx(query="apikey=rose-key")
    assert hashed_plugin().access(ctx) is None
    assert ctx.consumer_name == "rose"


def test_key_auth_rejects_the_stored_hash_presented_as_the_key():
    for key in ("nope", hash_key("jack-key"), hash_key("jack-key").removeprefix("sha256:")):
        response = hashed_plugin().access(make_ctx([("apikey", key)]))
        assert response.status == 401
        assert json.loads(response.body) == {"message": "Invalid API key in request"}


def test_key_auth_hash_key_is_sha256_hex_of_the_key():
    assert hash_key("abc") == ("sha256:ba7816bf8f01cfea414140de5dae2223"
                               "b00361a396177a9cb410ff61f20015ad")


@pytest.mark.parametrize("stored", ["sha256:", "sha256:abc", "sha256:" + "g" * 64])
def test_key_auth_malformed_sha256_key_is_rejected_with_path_and_without_the_value(stored):
    with pytest.raises(ConfigError) as caught:
        validate_config({"consumers": [{"username": "jack",
                                        "plugins": {"key-auth": {"key": stored}}}]})
    [error] = caught.value.errors
    assert error.startswith("consumers[0].plugins.key-auth.key: a 'sha256:' key needs 64 "
                            "hex digits")
    digits = stored.removeprefix("sha256:")
    assert not digits or digits not in error


def test_key_auth_same_hashed_key_in_two_consumers_is_rejected():
    stored = hash_key("shared")
    with pytest.raises(ConfigError) as caught:
        validate_config({"consumers": [
            {"username": "a", "plugins": {"key-auth": {"key": stored}}},
            {"username": "b", "plugins": {"key-auth": {"key": stored.upper().replace(
                "SHA256:", "sha256:")}}}]})
    assert caught.value.errors == [
        "consumers[1].plugins.key-auth.key: already used by consumers[0]"]


# -- hashed keys through the gateway ---------------------------------------------------------


def test_key_auth_hashed_key_admits_and_wrong_key_is_refused_at_the_gateway(echo,
                                                                           start_gateway):
    gateway = start_gateway({
        "consumers": [{"username": "jack", "plugins": {"key-auth": {
            "key": hash_key("jack-long-random-key")}}},
                      {"username": "rose", "plugins": {"key-auth": {"key": "rose-key"}}}],
        "routes": [{"id": "r1", "uri": "/*", "upstream": {"nodes": {echo.address: 1}},
                    "plugins": {"key-auth": {}}}]})

    def status(key):
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        try:
            connection.request("GET", "/orders", headers={"apikey": key})
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    assert status("jack-long-random-key") == 200
    assert status("rose-key") == 200
    assert status("jack-long-random-kex") == 401
    assert status(hash_key("jack-long-random-key")) == 401
