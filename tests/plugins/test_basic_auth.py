import asyncio
import base64
import http.client
import inspect
import json

import pytest

from sluicegate.config.load import ConfigError, validate_config
from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Consumer, PluginEnv, validate_plugin
from sluicegate.plugins.basic_auth import BasicAuth, PasswordHash, hash_password


def make_ctx(authorization=None):
    raw = [(b"Host", b"api.example"), (b"Accept", b"*/*")]
    if authorization is not None:
        raw.append((b"Authorization", authorization.encode()))
    return RequestContext("GET", "/", "", raw, "api.example", ("10.0.0.7", 50000),
                          ("10.0.0.1", 9080), "1.1")


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def plugin(**conf):
    model, _, errors = validate_plugin("basic-auth", conf, "routes[0].plugins.basic-auth")
    assert errors == []
    consumers = {}
    for name, user, password in [("alice", "alice", "wonder:land"), ("bob", "b0b", "pw")]:
        credential, _, errors = validate_plugin(
            "basic-auth", {"username": user, "password": password}, "c", for_consumer=True)
        assert errors == []
        consumers[name] = Consumer(name, {"basic-auth": credential})
    return BasicAuth(model, PluginEnv(consumers))


def test_basic_auth_rejects_missing_authorization_with_challenge():
    response = plugin().access(make_ctx())
    assert response.status == 401
    assert json.loads(response.body) == {"message": "Missing authorization in request"}
    assert ("WWW-Authenticate", 'Basic realm="sluicegate"') in response.headers


def test_basic_auth_rejects_wrong_password():
    ctx = make_ctx(basic("b0b", "guess"))
    response = plugin().access(ctx)
    assert response.status == 401
    assert json.loads(response.body) == {"message": "Invalid user authorization"}
    assert ctx.consumer is None


def test_basic_auth_rejects_unknown_user():
    response = plugin().access(make_ctx(basic("mallory", "pw")))
    assert response.status == 401
    assert json.loads(response.body) == {"message": "Invalid user authorization"}


def test_basic_auth_rejects_malformed_header():
    for header in ["Bearer abc", "Basic !!!not-base64", "Basic " + base64.b64encode(b"nocolon")
                   .decode()]:
        response = plugin().access(make_ctx(header))
        assert response.status == 401
        assert json.loads(response.body) == {"message": "Invalid authorization in request"}


def test_basic_auth_identifies_consumer():
    ctx = make_ctx(basic("b0b", "pw"))
    assert plugin().access(ctx) is None
    assert ctx.consumer_name == "bob"
    assert ctx.var("consumer_name") == "bob"


def test_basic_auth_accepts_password_containing_colon_and_any_scheme_case():
    ctx = make_ctx(basic("alice", "wonder:land").replace("Basic", "basic"))
    assert plugin().access(ctx) is None
    assert ctx.consumer_name == "alice"


def test_basic_auth_keeps_authorization_by_default():
    ctx = make_ctx(basic("b0b", "pw"))
    plugin().access(ctx)
    assert ctx.get_header("authorization") == basic("b0b", "pw")


def test_basic_auth_hide_credentials_removes_authorization():
    ctx = make_ctx(basic("b0b", "pw"))
    assert plugin(hide_credentials=True).access(ctx) is None
    assert [name for name, _ in ctx.raw_headers] == [b"Host", b"Accept"]


def test_basic_auth_consumer_config_errors_name_the_field():
    _, _, errors = validate_plugin("basic-auth", {"username": "a:b"},
                                   "consumers[0].plugins.basic-auth", for_consumer=True)
    assert any(e.startswith("consumers[0].plugins.basic-auth.username:") for e in errors)
    assert "consumers[0].plugins.basic-auth.password: Field required" in errors


# -- hashed passwords ------------------------------------------------------------------------

# From passlib's documentation of pbkdf2_sha256: the hash of "password".
PASSLIB_HASH = ("$pbkdf2-sha256$6400$0ZrzXitFSGltTQnBWOsdAw"
                "$Y11AchqV4b0sUisdZd0Xr97KWoymNE0LNNrnEgY4H9M")


def hashed_plugin(stored):
    model, _, _ = validate_plugin("basic-auth", {}, "routes[0].plugins.basic-auth")
    credential, _, errors = validate_plugin(
        "basic-auth", {"username": "carol", "password": stored}, "c", for_consumer=True)
    assert errors == []
    return BasicAuth(model, PluginEnv({"carol": Consumer("carol", {"basic-auth": credential})}))


def run_access(auth, ctx):
    """Run the access hook as the data plane does: awaiting it when it returns an awaitable
    (a hashed password not verified yet)."""
    result = auth.access(ctx)
    if inspect.isawaitable(result):
        async def wait():
            return await result
        result = asyncio.run(wait())
    return result


def test_basic_auth_accepts_a_pbkdf2_sha256_hash_made_by_passlib():
    ctx = make_ctx(basic("carol", "password"))
    assert run_access(hashed_plugin(PASSLIB_HASH), ctx) is None
    assert ctx.consumer_name == "carol"


def test_basic_auth_rejects_a_wrong_password_against_a_hash():
    ctx = make_ctx(basic("carol", "Password"))
    response = run_access(hashed_plugin(PASSLIB_HASH), ctx)
    assert response.status == 401
    assert json.loads(response.body) == {"message": "Invalid user authorization"}
    assert ctx.consumer is None


def test_basic_auth_recognises_a_verified_password_without_hashing_again():
    auth = hashed_plugin(hash_password("s3cret", iterations=1000))
    assert run_access(auth, make_ctx(basic("carol", "s3cret"))) is None
    ctx = make_ctx(basic("carol", "s3cret"))
    assert auth.access(ctx) is None  # answered at once: no awaitable
    assert ctx.consumer_name == "carol"


def test_basic_auth_hash_secret_output_round_trips():
    stored = hash_password("correct horse")
    assert stored.startswith("$pbkdf2-sha256$600000$")
    assert PasswordHash.parse(stored).verify(b"correct horse")


def test_basic_auth_plain_password_shaped_like_a_hash_of_no_known_scheme_stays_plain():
    ctx = make_ctx(basic("carol", "$money$123"))
    assert hashed_plugin("$money$123").access(ctx) is None


@pytest.mark.parametrize("stored, reason", [
    ("$pbkdf2-sha256$abc$c2FsdA$aGFzaA", "$pbkdf2-sha256$<iterations>$<salt>$<hash>"),
    ("$pbkdf2-sha256$0$0ZrzXitFSGltTQnBWOsdAw$Y11AchqV4b0sUisdZd0Xr97KWoymNE0LNNrnEgY4H9M",
     "iterations must be"),
    ("$pbkdf2-sha256$6400$0Zr!!$Y11AchqV4b0sUisdZd0Xr97KWoymNE0LNNrnEgY4H9M", "base64"),
    ("$pbkdf2-sha256$6400$0ZrzXitFSGltTQnBWOsdAw$c2hvcnQ", "16 to 64 byte hash"),
    ("$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",
     "unsupported hash scheme '2b'"),
])
def test_basic_auth_bad_stored_hash_is_rejected_with_path_and_without_the_value(stored,
                                                                                reason):
    with pytest.raises(ConfigError) as caught:
        validate_config({"consumers": [{"username": "carol", "plugins": {
            "basic-auth": {"username": "carol", "password": stored}}}]})
    [error] = caught.value.errors
    assert error.startswith("consumers[0].plugins.basic-auth.password: ")
    assert reason in error
    assert stored.rsplit("$", 1)[-1] not in error


# -- hashed passwords through the gateway ----------------------------------------------------


def gateway_call(gateway, authorization=None):
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        headers = {"Authorization": authorization} if authorization else {}
        connection.request("GET", "/orders", headers=headers)
        response = connection.getresponse()
        body = response.read()
        return response.status, json.loads(body)
    finally:
        connection.close()


def hashed_gateway_config(upstream):
    return {
        "consumers": [
            {"username": "carol", "plugins": {"basic-auth": {
                "username": "carol", "password": hash_password("carol-pass", iterations=2000)}}},
            {"username": "dave", "plugins": {"basic-auth": {
                "username": "dave", "password": "dave-plain-pass"}}},
        ],
        "routes": [{"id": "r1", "uri": "/*", "upstream": {"nodes": {upstream.address: 1}},
                    "plugins": {"basic-auth": {}}}],
    }


def test_basic_auth_hashed_password_admits_the_consumer_at_the_gateway(echo, start_gateway):
    gateway = start_gateway(hashed_gateway_config(echo))
    for _ in range(3):  # the first verifies the hash, the others hit the cache
        status, reply = gateway_call(gateway, basic("carol", "carol-pass"))
        assert status == 200
        assert reply["target"] == "/orders"  # the echo upstream answered
    # A plain password next to a hashed one still works.
    assert gateway_call(gateway, basic("dave", "dave-plain-pass"))[0] == 200


def test_basic_auth_hashed_password_rejects_a_wrong_one_at_the_gateway(echo, start_gateway):
    gateway = start_gateway(hashed_gateway_config(echo))
    for _ in range(2):  # the second is answered from the rejected cache
        status, reply = gateway_call(gateway, basic("carol", "carol-pass!"))
        assert status == 401
        assert reply == {"message": "Invalid user authorization"}
    assert gateway_call(gateway, basic("carol", "carol-pass"))[0] == 200
    assert gateway_call(gateway, basic("carol", "carol-pass!"))[0] == 401


def test_basic_auth_never_logs_a_hashed_credential_or_password(echo, start_gateway):
    config = hashed_gateway_config(echo)
    gateway = start_gateway(config)
    gateway_call(gateway, basic("carol", "carol-pass"))
    gateway_call(gateway, basic("carol", "wrong-pass"))
    gateway.stop()
    log = gateway.log_path.read_text(errors="replace")
    stored = config["consumers"][0]["plugins"]["basic-auth"]["password"]
    for secret in ("carol-pass", "wrong-pass", stored.rsplit("$", 1)[-1]):
        assert secret not in log
