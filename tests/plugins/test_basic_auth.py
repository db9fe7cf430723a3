import base64
import json

from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Consumer, PluginEnv, validate_plugin
from sluicegate.plugins.basic_auth import BasicAuth


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
