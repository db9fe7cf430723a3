"""jwt-auth: hooks driven with real request contexts and real tokens (HS256, HS512, RS256,
ES256 keys made here), then the same behaviours through a running gateway."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sluicegate.config.load import ConfigError, validate_config
from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Consumer, PluginEnv, build_chain, validate_plugin
from sluicegate.plugins.jwt_auth import JwtAuth

HS256_SECRET = "jack-hs256-secret-0123456789abcdef"
HS512_SECRET = "mia-hs512-secret-" + "x" * 60
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())


def public_pem(private_key: Any) -> str:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def private_pem(private_key: Any) -> str:
    return private_key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode()


RSA_PUBLIC_PEM = public_pem(RSA_KEY)
EC_PUBLIC_PEM = public_pem(EC_KEY)

CREDENTIALS = {
    "jack": {"key": "jack-key", "secret": HS256_SECRET},
    "tom": {"key": "tom-key", "secret": "tom-hs256-secret-0123456789abcdef"},
    "mia": {"key": "mia-key", "secret": HS512_SECRET, "algorithm": "HS512"},
    "rose": {"key": "rose-key", "algorithm": "RS256", "public_key": RSA_PUBLIC_PEM},
    "ella": {"key": "ella-key", "algorithm": "ES256", "public_key": EC_PUBLIC_PEM},
}


def token(key: str = "jack-key", *, signer: Any = HS256_SECRET, algorithm: str = "HS256",
          lifetime: float | None = 3600, **claims: Any) -> str:
    payload: dict[str, Any] = {"key": key, **claims}
    if lifetime is not None:
        payload.setdefault("exp", int(time.time() + lifetime))
    return jwt.encode(payload, signer, algorithm=algorithm)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: Any, payload: Any, secret: bytes | None = None,
              digest: Any = hashlib.sha256) -> str:
    """A token built by hand: anything in header and payload, HMAC-signed with any bytes
    (pyjwt refuses to make the hostile ones)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = b"" if secret is None else hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


def make_ctx(headers=(), query="", method="GET"):
    raw = [(b"Host", b"api.example"), *[(k.encode(), v.encode()) for k, v in headers]]
    return RequestContext(method, "/orders", query, raw, "api.example", ("10.0.0.7", 50000),
                          ("10.0.0.1", 9080), "1.1")


def bearer(value):
    return make_ctx([("Authorization", f"Bearer {value}")])


def credential(conf):
    model, _, errors = validate_plugin("jwt-auth", conf, "consumers[0].plugins.jwt-auth",
                                       for_consumer=True)
    assert errors == []
    return model


def env(credentials=None):
    credentials = CREDENTIALS if credentials is None else credentials
    return PluginEnv({name: Consumer(name, {"jwt-auth": credential(conf)})
                      for name, conf in credentials.items()})


def plugin(credentials=None, **conf):
    model, _, errors = validate_plugin("jwt-auth", conf, "routes[0].plugins.jwt-auth")
    assert errors == []
    return JwtAuth(model, env(credentials))


def message(response):
    assert ("Content-Type", "application/json") in response.headers
    return json.loads(response.body)["message"]


def consumer_errors(conf):
    _, _, errors = validate_plugin("jwt-auth", conf, "consumers[0].plugins.jwt-auth",
                                   for_consumer=True)
    return errors


def forwarded(ctx):
    return [(k.decode(), v.decode()) for k, v in ctx.raw_headers]


# -- finding the token --------------------------------------------------------------------


def test_jwt_auth_rejects_missing_token():
    response = plugin().access(make_ctx())
    assert response.status == 401
    assert message(response) == "Missing JWT token in request"


def test_jwt_auth_admits_hs256_bearer_token_and_identifies_consumer():
    ctx = bearer(token())
    assert plugin().access(ctx) is None
    assert ctx.consumer_name == "jack"
    assert ctx.consumer.username == "jack"
    assert ctx.var("consumer_name") == "jack"


def test_jwt_auth_accepts_bare_token_and_any_case_of_bearer():
    auth = plugin()
    for value in (token(), f"bearer {token()}", f"BEARER  {token()}"):
        ctx = make_ctx([("Authorization", value)])
        assert auth.access(ctx) is None, value
        assert ctx.consumer_name == "jack"


def test_jwt_auth_reads_token_from_query_argument():
    ctx = make_ctx(query=f"page=2&jwt={token()}")
    assert plugin().access(ctx) is None
    assert ctx.consumer_name == "jack"


def test_jwt_auth_reads_token_from_cookie():
    ctx = make_ctx([("Cookie", f"theme=dark; jwt={token()}")])
    assert plugin().access(ctx) is None
    assert ctx.consumer_name == "jack"


def test_jwt_auth_header_takes_precedence_over_query_and_cookie():
    ctx = make_ctx([("Authorization", "Bearer not.a.token"), ("Cookie", f"jwt={token()}")],
                   query=f"jwt={token()}")
    assert plugin().access(ctx).status == 401
    ctx = make_ctx([("Cookie", "jwt=broken")], query=f"jwt={token()}")
    assert plugin().access(ctx) is None  # query before cookie


def test_jwt_auth_uses_configured_header_query_and_cookie_names():
    auth = plugin(header="X-Token", query="access_token", cookie="session")
    for ctx in (make_ctx([("x-token", token())]),
                make_ctx(query=f"access_token={token()}"),
                make_ctx([("Cookie", f"session={token()}")])):
        assert auth.access(ctx) is None
        assert ctx.consumer_name == "jack"
    for ctx in (bearer(token()), make_ctx(query=f"jwt={token()}"),
                make_ctx([("Cookie", f"jwt={token()}")])):
        assert message(auth.access(ctx)) == "Missing JWT token in request"


# -- algorithms ---------------------------------------------------------------------------


def test_jwt_auth_admits_hs512_token():
    ctx = bearer(token("mia-key", signer=HS512_SECRET, algorithm="HS512"))
    assert plugin().access(ctx) is None
    assert ctx.consumer_name == "mia"


def test_jwt_auth_admits_rs256_token():
    ctx = bearer(token("rose-key", signer=RSA_KEY, algorithm="RS256"))
    assert plugin().access(ctx) is None
    assert ctx.consumer_name == "rose"


def test_jwt_auth_admits_es256_token():
    ctx = bearer(token("ella-key", signer=EC_KEY, algorithm="ES256"))
    assert plugin().access(ctx) is None
    assert ctx.consumer_name == "ella"


def test_jwt_auth_base64_secret_verifies_with_the_decoded_bytes():
    raw_secret = bytes(range(48))
    credentials = {"jack": {"key": "jack-key", "secret": base64.b64encode(raw_secret).decode(),
                            "base64_secret": True}}
    assert plugin(credentials).access(bearer(token(signer=raw_secret))) is None
    encoded_as_text = base64.b64encode(raw_secret).decode()
    response = plugin(credentials).access(bearer(token(signer=encoded_as_text)))
    assert message(response) == "JWT signature invalid"


# -- rejected tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    "abc", "a.b", "a.b.c.d", "!!!.e30.sig", "e30.!!!.sig",
    f"{b64url(b'not json')}.{b64url(b'{}')}.c2ln",
    f"{b64url(b'{}')}.{b64url(b'[1, 2]')}.c2ln",
    f"{b64url(b'[]')}.{b64url(b'{}')}.c2ln",
    f"{b64url(b'{}')}.{b64url(b'{}')}.abcde",  # 5 base64 characters cannot be bytes
])
def test_jwt_auth_rejects_malformed_token(value):
    response = plugin().access(bearer(value))
    assert response.status == 401
    assert message(response) == "JWT token invalid"


def test_jwt_auth_rejects_standard_base64_characters_in_a_segment():
    value = token()
    header, payload, signature = value.split(".")
    mangled = signature.replace("-", "+").replace("_", "/")
    if mangled == signature:
        mangled = signature[:-1] + "+"
    assert message(plugin().access(bearer(f"{header}.{payload}.{mangled}"))) == (
        "JWT token invalid")


def test_jwt_auth_rejects_token_without_key_claim():
    value = jwt.encode({"sub": "jack", "exp": int(time.time()) + 60}, HS256_SECRET)
    response = plugin().access(bearer(value))
    assert response.status == 401
    assert message(response) == "missing user key in JWT token"
    assert message(plugin().access(bearer(token(key=42)))) == "missing user key in JWT token"


def test_jwt_auth_rejects_unknown_key():
    response = plugin().access(bearer(token("nobody-key")))
    assert response.status == 401
    assert message(response) == "Invalid user key in JWT token"


def test_jwt_auth_key_claim_name_picks_the_claim():
    auth = plugin(key_claim_name="iss")
    ctx = bearer(jwt.encode({"iss": "rose-key", "key": "jack-key"}, RSA_KEY, algorithm="RS256"))
    assert auth.access(ctx) is None
    assert ctx.consumer_name == "rose"
    assert message(auth.access(bearer(token()))) == "missing user key in JWT token"


def test_jwt_auth_rejects_wrong_signature():
    auth = plugin()
    cases = [
        token(signer="another-secret-0123456789abcdefgh"),
        token("mia-key", signer=HS256_SECRET + "x" * 40, algorithm="HS512"),
        token("rose-key", signer=OTHER_RSA_KEY, algorithm="RS256"),
        token("ella-key", signer=OTHER_EC_KEY, algorithm="ES256"),
    ]
    for value in cases:
        ctx = bearer(value)
        response = auth.access(ctx)
        assert response.status == 401
        assert message(response) == "JWT signature invalid"
        assert ctx.consumer_name is None


def test_jwt_auth_rejects_payload_changed_after_signing():
    header, _, signature = token("jack-key").split(".")
    forged = b64url(json.dumps({"key": "tom-key", "exp": int(time.time()) + 60}).encode())
    assert message(plugin().access(bearer(f"{header}.{forged}.{signature}"))) == (
        "JWT signature invalid")
    forged = b64url(json.dumps({"key": "jack-key", "exp": int(time.time()) + 10**6}).encode())
    assert message(plugin().access(bearer(f"{header}.{forged}.{signature}"))) == (
        "JWT signature invalid")


def test_jwt_auth_rejects_truncated_ecdsa_signature():
    header, payload, signature = token("ella-key", signer=EC_KEY, algorithm="ES256").split(".")
    truncated = b64url(base64.urlsafe_b64decode(signature + "==")[:-1])
    assert message(plugin().access(bearer(f"{header}.{payload}.{truncated}"))) == (
        "JWT signature invalid")


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_jwt_auth_rejects_alg_none(alg):
    payload = {"key": "jack-key", "exp": int(time.time()) + 60}
    for value in (raw_token({"alg": alg, "typ": "JWT"}, payload),
                  raw_token({"alg": alg}, payload, HS256_SECRET.encode())):
        ctx = bearer(value)
        response = plugin().access(ctx)
        assert response.status == 401
        assert message(response) == "JWT algorithm not allowed for this consumer"
        assert ctx.consumer_name is None
    assert message(plugin().access(bearer(jwt.encode(payload, None, algorithm="none")))) == (
        "JWT algorithm not allowed for this consumer")


def test_jwt_auth_rejects_token_without_alg():
    value = raw_token({"typ": "JWT"}, {"key": "jack-key"}, HS256_SECRET.encode())
    assert message(plugin().access(bearer(value))) == "JWT algorithm not allowed for this consumer"


def test_jwt_auth_rejects_hs256_token_signed_with_the_rs256_public_key():
    # Algorithm confusion: the public key is public, so an HS256 token "signed" with it as
    # the HMAC secret must not pass for an RS256 consumer.
    payload = {"key": "rose-key", "exp": int(time.time()) + 60}
    for secret in (RSA_PUBLIC_PEM.encode(), RSA_PUBLIC_PEM.strip().encode()):
        response = plugin().access(bearer(raw_token({"alg": "HS256", "typ": "JWT"}, payload,
                                                    secret)))
        assert response.status == 401
        assert message(response) == "JWT algorithm not allowed for this consumer"
    ec_payload = {"key": "ella-key", "exp": int(time.time()) + 60}
    response = plugin().access(bearer(raw_token({"alg": "HS256"}, ec_payload,
                                                EC_PUBLIC_PEM.encode())))
    assert message(response) == "JWT algorithm not allowed for this consumer"


def test_jwt_auth_accepts_only_the_consumers_configured_algorithm():
    # Right secret, other HMAC algorithm: still refused.
    value = token(signer=HS256_SECRET + "-long-enough-for-hs512" * 3, algorithm="HS512")
    assert message(plugin().access(bearer(value))) == "JWT algorithm not allowed for this consumer"
    value = raw_token({"alg": "HS512"}, {"key": "jack-key"}, HS256_SECRET.encode(),
                      hashlib.sha512)
    assert message(plugin().access(bearer(value))) == "JWT algorithm not allowed for this consumer"
    value = jwt.encode({"key": "rose-key"}, RSA_KEY, algorithm="PS256")
    assert message(plugin().access(bearer(value))) == "JWT algorithm not allowed for this consumer"


def test_jwt_auth_rejects_critical_header_extensions():
    value = raw_token({"alg": "HS256", "crit": ["exp"], "exp": 1}, {"key": "jack-key"},
                      HS256_SECRET.encode())
    assert message(plugin().access(bearer(value))) == "JWT token invalid"


# -- time claims --------------------------------------------------------------------------


def test_jwt_auth_rejects_expired_token():
    ctx = bearer(token(lifetime=-5))
    response = plugin().access(ctx)
    assert response.status == 401
    assert message(response) == "JWT token expired"
    assert ctx.consumer_name is None


def test_jwt_auth_verifies_the_signature_before_reporting_expiry():
    value = token(signer="another-secret-0123456789abcdefgh", lifetime=-5)
    assert message(plugin().access(bearer(value))) == "JWT signature invalid"


def test_jwt_auth_lifetime_grace_period_admits_recently_expired_token():
    lenient = {"jack": {**CREDENTIALS["jack"], "lifetime_grace_period": 60}}
    strict = {"jack": {**CREDENTIALS["jack"], "lifetime_grace_period": 10}}
    value = token(lifetime=-30)
    assert plugin(lenient).access(bearer(value)) is None
    assert message(plugin(strict).access(bearer(value))) == "JWT token expired"
    assert message(plugin(lenient).access(bearer(token(lifetime=-90)))) == "JWT token expired"


def test_jwt_auth_rejects_token_before_nbf():
    value = token(nbf=int(time.time()) + 30)
    assert message(plugin().access(bearer(value))) == "JWT token not yet valid"
    assert plugin().access(bearer(token(nbf=int(time.time()) - 1))) is None


def test_jwt_auth_lifetime_grace_period_applies_to_nbf():
    lenient = {"jack": {**CREDENTIALS["jack"], "lifetime_grace_period": 60}}
    assert plugin(lenient).access(bearer(token(nbf=int(time.time()) + 30))) is None
    assert message(plugin(lenient).access(bearer(token(nbf=int(time.time()) + 90)))) == (
        "JWT token not yet valid")


def test_jwt_auth_accepts_fractional_exp():
    assert plugin().access(bearer(token(exp=time.time() + 60.5))) is None


@pytest.mark.parametrize("claims", [{"exp": "tomorrow"}, {"exp": True}, {"exp": None},
                                    {"nbf": "0"}, {"exp": float("nan")},
                                    {"exp": float("inf")}])
def test_jwt_auth_rejects_non_numeric_time_claims(claims):
    payload = {"key": "jack-key", **claims}
    value = raw_token({"alg": "HS256"}, payload, HS256_SECRET.encode())
    response = plugin().access(bearer(value))
    assert message(response) == "JWT token invalid"


def test_jwt_auth_accepts_token_without_exp_as_apisix_does():
    assert plugin().access(bearer(token(lifetime=None))) is None


def pyjwt_accepts(value):
    """pyjwt's own verdict on a token, with the consumer its `key` claim names."""
    try:
        claims = jwt.decode(value, options={"verify_signature": False})
        conf = next(c for c in CREDENTIALS.values() if c["key"] == claims.get("key"))
        algorithm = conf.get("algorithm", "HS256")
        key = (conf["secret"] if algorithm.startswith("HS") else
               serialization.load_pem_public_key(conf["public_key"].encode()))
        jwt.decode(value, key, algorithms=[algorithm],
                   options={"verify_aud": False, "verify_iat": False})
    except (jwt.PyJWTError, StopIteration):
        return False
    return True


def test_jwt_auth_decides_like_pyjwt_decode():
    now = int(time.time())
    header, _, signature = token().split(".")
    tampered = b64url(json.dumps({"key": "jack-key", "exp": now + 10**6}).encode())
    cases = [
        token(), token("mia-key", signer=HS512_SECRET, algorithm="HS512"),
        token("rose-key", signer=RSA_KEY, algorithm="RS256"),
        token("ella-key", signer=EC_KEY, algorithm="ES256"),
        token(lifetime=None), token(lifetime=-1), token(nbf=now + 60), token(nbf=now - 60),
        token(signer="another-secret-0123456789abcdefgh"),
        token("rose-key", signer=OTHER_RSA_KEY, algorithm="RS256"),
        token("ella-key", signer=OTHER_EC_KEY, algorithm="ES256"),
        token("rose-key", signer=RSA_KEY, algorithm="PS256"),
        token("nobody-key"), f"{header}.{tampered}.{signature}",
        jwt.encode({"key": "jack-key"}, None, algorithm="none"),
        raw_token({"alg": "HS256"}, {"key": "rose-key"}, RSA_PUBLIC_PEM.encode()),
        raw_token({"alg": "HS256"}, {"key": "jack-key"}, HS256_SECRET.encode()),
    ]
    auth = plugin()
    for value in cases:
        assert (auth.access(bearer(value)) is None) == pyjwt_accepts(value), value


# -- hide_credentials ---------------------------------------------------------------------


def test_jwt_auth_keeps_credentials_by_default():
    value = token()
    ctx = bearer(value)
    assert plugin().access(ctx) is None
    assert ("Authorization", f"Bearer {value}") in forwarded(ctx)


def test_jwt_auth_hide_credentials_removes_header():
    ctx = make_ctx([("Authorization", f"Bearer {token()}"), ("Accept", "*/*")])
    assert plugin(hide_credentials=True).access(ctx) is None
    assert forwarded(ctx) == [("Host", "api.example"), ("Accept", "*/*")]
    assert ctx.get_header("authorization") is None
    assert ctx.headers_dirty


def test_jwt_auth_hide_credentials_removes_query_argument():
    ctx = make_ctx(query=f"page=2&jwt={token()}&q=a%20b")
    assert plugin(hide_credentials=True).access(ctx) is None
    assert ctx.query == "page=2&q=a%20b"
    assert ctx.uri == "/orders" and ctx.uri_dirty
    assert ctx.var("arg_jwt") is None


def test_jwt_auth_hide_credentials_removes_only_the_token_cookie():
    ctx = make_ctx([("Cookie", f"theme=dark; jwt={token()}; lang=en")])
    assert plugin(hide_credentials=True).access(ctx) is None
    assert ctx.get_header("cookie") == "theme=dark; lang=en"
    assert ctx.var("cookie_jwt") is None and ctx.var("cookie_lang") == "en"
    assert ctx.headers_dirty


def test_jwt_auth_hide_credentials_drops_a_cookie_header_left_empty():
    ctx = make_ctx([("Cookie", f"jwt={token()}")])
    assert plugin(hide_credentials=True).access(ctx) is None
    assert ctx.get_header("cookie") is None
    assert forwarded(ctx) == [("Host", "api.example")]


def test_jwt_auth_hide_credentials_keeps_the_token_of_a_rejected_request():
    ctx = bearer(token(lifetime=-5))
    assert plugin(hide_credentials=True).access(ctx).status == 401
    assert ctx.get_header("authorization") is not None


# -- configuration ------------------------------------------------------------------------


def test_jwt_auth_route_config_defaults_follow_apisix():
    model, _, errors = validate_plugin("jwt-auth", {}, "routes[0].plugins.jwt-auth")
    assert errors == []
    assert (model.header, model.query, model.cookie, model.hide_credentials,
            model.key_claim_name) == ("authorization", "jwt", "jwt", False, "key")


def test_jwt_auth_consumer_config_defaults_follow_apisix():
    model = credential({"key": "k", "secret": "s"})
    assert (model.algorithm, model.exp, model.base64_secret, model.lifetime_grace_period) == (
        "HS256", 86400, False, 0)


def test_jwt_auth_route_config_errors_name_the_field():
    _, _, errors = validate_plugin("jwt-auth", {"hide_credentials": "sometimes"},
                                   "routes[0].plugins.jwt-auth")
    assert errors and errors[0].startswith("routes[0].plugins.jwt-auth.hide_credentials:")
    _, _, errors = validate_plugin("jwt-auth", {"cookei": "x"}, "routes[0].plugins.jwt-auth")
    assert errors and errors[0].startswith("routes[0].plugins.jwt-auth.cookei:")


def test_jwt_auth_consumer_needs_a_key():
    assert consumer_errors({"secret": "s"}) == [
        "consumers[0].plugins.jwt-auth.key: Field required"]


def test_jwt_auth_hmac_algorithm_needs_a_secret():
    for algorithm in ("HS256", "HS512"):
        assert consumer_errors({"key": "k", "algorithm": algorithm,
                                "public_key": RSA_PUBLIC_PEM}) == [
            f"consumers[0].plugins.jwt-auth.secret: required for algorithm {algorithm}"]


def test_jwt_auth_public_key_algorithm_needs_a_public_key():
    for algorithm in ("RS256", "ES256"):
        assert consumer_errors({"key": "k", "algorithm": algorithm, "secret": "s"}) == [
            f"consumers[0].plugins.jwt-auth.public_key: required for algorithm {algorithm}"]


def test_jwt_auth_rejects_public_key_that_is_not_pem():
    broken = RSA_PUBLIC_PEM.replace(RSA_PUBLIC_PEM.splitlines()[2], "AAAA", 1)
    for value in ("not a key", broken):
        assert consumer_errors({"key": "k", "algorithm": "RS256", "public_key": value}) == [
            "consumers[0].plugins.jwt-auth.public_key: not a PEM public key"]


def test_jwt_auth_rejects_private_key_given_as_public_key():
    errors = consumer_errors({"key": "k", "algorithm": "RS256",
                              "public_key": private_pem(RSA_KEY)})
    assert errors == ["consumers[0].plugins.jwt-auth.public_key: is a private key; "
                      "give the public key"]
    assert "MII" not in errors[0]


def test_jwt_auth_rejects_public_key_of_the_wrong_type():
    assert consumer_errors({"key": "k", "algorithm": "RS256", "public_key": EC_PUBLIC_PEM}) == [
        "consumers[0].plugins.jwt-auth.public_key: RS256 needs an RSA public key"]
    p384 = public_pem(ec.generate_private_key(ec.SECP384R1()))
    for pem in (RSA_PUBLIC_PEM, p384):
        assert consumer_errors({"key": "k", "algorithm": "ES256", "public_key": pem}) == [
            "consumers[0].plugins.jwt-auth.public_key: ES256 needs an EC P-256 public key"]


def test_jwt_auth_rejects_unsupported_algorithm():
    errors = consumer_errors({"key": "k", "secret": "s", "algorithm": "none"})
    assert len(errors) == 1
    assert errors[0].startswith("consumers[0].plugins.jwt-auth.algorithm:")


def test_jwt_auth_rejects_secret_that_is_not_base64_when_base64_secret():
    assert consumer_errors({"key": "k", "secret": "not base64!", "base64_secret": True}) == [
        "consumers[0].plugins.jwt-auth.secret: not valid base64 (base64_secret is true)"]


def test_jwt_auth_secret_never_appears_in_the_credential_repr():
    model = credential(CREDENTIALS["jack"])
    assert HS256_SECRET not in repr(model) and HS256_SECRET not in str(model)


def test_jwt_auth_consumer_key_must_be_unique():
    config = {"consumers": [
        {"username": "jack", "plugins": {"jwt-auth": {"key": "same", "secret": "a"}}},
        {"username": "rose", "plugins": {"jwt-auth": {"key": "same", "secret": "b"}}}],
        "routes": [{"id": "r1", "uri": "/*", "upstream": {"nodes": {"127.0.0.1:1": 1}},
                    "plugins": {"jwt-auth": {}}}]}
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    assert "consumers[1].plugins.jwt-auth.key: already used by consumers[0]" in str(
        caught.value)


def test_jwt_auth_runs_in_access_phase_between_basic_auth_and_key_auth():
    entries = []
    for name in ("key-auth", "jwt-auth", "basic-auth"):
        model, meta, _ = validate_plugin(name, {}, name)
        entries.append((name, model, meta))
    chain = build_chain(entries, env())
    assert [p.name for p in chain.plugins] == ["basic-auth", "jwt-auth", "key-auth"]
    assert JwtAuth.priority == 2510
    auth = chain.plugins[1]
    assert chain.request_hooks[1] == auth.access
    assert chain.header_filter == [] and chain.body_filter == []


# -- through a running gateway ------------------------------------------------------------

GATEWAY_CONSUMERS = [{"username": name, "plugins": {"jwt-auth": conf}}
                     for name, conf in CREDENTIALS.items()]


class Reply:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    def upstream_headers(self) -> dict[str, str]:
        """Headers the echo upstream received, by lower-case name."""
        return {name.lower(): value for name, value in self.json()["headers"]}


def call(gateway: Any, path: str, headers: dict[str, str] | None = None) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def jwt_gateway(start_gateway, upstream, consumers=None, **conf):
    return start_gateway({
        "consumers": GATEWAY_CONSUMERS if consumers is None else consumers,
        "routes": [{"id": "r1", "uri": "/*", "upstream": {"nodes": {upstream.address: 1}},
                    "plugins": {"jwt-auth": conf}}]})


def auth(value):
    return {"Authorization": f"Bearer {value}"}


def test_jwt_auth_gateway_admits_valid_tokens_of_each_algorithm(echo, start_gateway):
    gateway = jwt_gateway(start_gateway, echo)
    for value in (token(), token("mia-key", signer=HS512_SECRET, algorithm="HS512"),
                  token("rose-key", signer=RSA_KEY, algorithm="RS256"),
                  token("ella-key", signer=EC_KEY, algorithm="ES256")):
        reply = call(gateway, "/orders", auth(value))
        assert reply.status == 200, reply.body
        assert reply.json()["target"] == "/orders"
        assert reply.upstream_headers()["authorization"] == f"Bearer {value}"


def test_jwt_auth_gateway_rejects_missing_token(nginx, start_gateway):
    reply = call(jwt_gateway(start_gateway, nginx), "/headers")
    assert reply.status == 401
    assert reply.json() == {"message": "Missing JWT token in request"}
    assert reply.headers["Content-Type"] == "application/json"


def test_jwt_auth_gateway_rejects_expired_token(nginx, start_gateway):
    reply = call(jwt_gateway(start_gateway, nginx), "/headers", auth(token(lifetime=-5)))
    assert reply.status == 401
    assert reply.json() == {"message": "JWT token expired"}
    assert b"method=" not in reply.body  # never reached nginx


def test_jwt_auth_gateway_rejects_wrong_signature(nginx, start_gateway):
    gateway = jwt_gateway(start_gateway, nginx)
    for value in (token(signer="another-secret-0123456789abcdefgh"),
                  token("rose-key", signer=OTHER_RSA_KEY, algorithm="RS256")):
        reply = call(gateway, "/headers", auth(value))
        assert reply.status == 401
        assert reply.json() == {"message": "JWT signature invalid"}


def test_jwt_auth_gateway_rejects_alg_none(nginx, start_gateway):
    value = jwt.encode({"key": "jack-key", "exp": int(time.time()) + 60}, None,
                       algorithm="none")
    reply = call(jwt_gateway(start_gateway, nginx), "/headers", auth(value))
    assert reply.status == 401
    assert reply.json() == {"message": "JWT algorithm not allowed for this consumer"}


def test_jwt_auth_gateway_rejects_hs256_token_signed_with_rs256_public_key(
        nginx, start_gateway):
    value = raw_token({"alg": "HS256", "typ": "JWT"},
                      {"key": "rose-key", "exp": int(time.time()) + 60},
                      RSA_PUBLIC_PEM.encode())
    reply = call(jwt_gateway(start_gateway, nginx), "/headers", auth(value))
    assert reply.status == 401
    assert reply.json() == {"message": "JWT algorithm not allowed for this consumer"}


def test_jwt_auth_gateway_honours_lifetime_grace_period(echo, start_gateway):
    consumers = [
        {"username": "jack", "plugins": {"jwt-auth": {**CREDENTIALS["jack"],
                                                      "lifetime_grace_period": 60}}},
        {"username": "rose", "plugins": {"jwt-auth": {**CREDENTIALS["rose"],
                                                      "lifetime_grace_period": 5}}},
    ]
    gateway = jwt_gateway(start_gateway, echo, consumers)
    assert call(gateway, "/", auth(token(lifetime=-30))).status == 200
    reply = call(gateway, "/", auth(token("rose-key", signer=RSA_KEY, algorithm="RS256",
                                          lifetime=-30)))
    assert reply.status == 401
    assert reply.json() == {"message": "JWT token expired"}


def test_jwt_auth_gateway_reads_token_from_query_and_cookie(echo, start_gateway):
    gateway = jwt_gateway(start_gateway, echo)
    value = token("ella-key", signer=EC_KEY, algorithm="ES256")
    reply = call(gateway, f"/q?jwt={value}&page=2")
    assert reply.status == 200
    assert reply.json()["target"] == f"/q?jwt={value}&page=2"
    reply = call(gateway, "/c", {"Cookie": f"jwt={value}; theme=dark"})
    assert reply.status == 200
    assert reply.upstream_headers()["cookie"] == f"jwt={value}; theme=dark"


def test_jwt_auth_gateway_hide_credentials_keeps_the_token_from_the_upstream(
        echo, start_gateway):
    gateway = jwt_gateway(start_gateway, echo, hide_credentials=True)
    value = token("rose-key", signer=RSA_KEY, algorithm="RS256")
    from_header = call(gateway, "/h", {**auth(value), "X-Kept": "yes"})
    assert from_header.status == 200
    assert "authorization" not in from_header.upstream_headers()
    assert from_header.upstream_headers()["x-kept"] == "yes"
    from_query = call(gateway, f"/q?page=2&jwt={value}&sort=asc")
    assert from_query.status == 200
    assert from_query.json()["target"] == "/q?page=2&sort=asc"
    from_cookie = call(gateway, "/c", {"Cookie": f"theme=dark; jwt={value}"})
    assert from_cookie.status == 200
    assert from_cookie.upstream_headers()["cookie"] == "theme=dark"
    for reply in (from_header, from_query, from_cookie):
        assert value not in reply.body.decode()


def test_jwt_auth_gateway_refuses_config_with_unloadable_public_key(tmp_path):
    from harness import Gateway

    gateway = Gateway(tmp_path, {
        "consumers": [{"username": "rose", "plugins": {"jwt-auth": {
            "key": "rose-key", "algorithm": "RS256", "public_key": "garbage"}}}],
        "routes": [{"id": "r1", "uri": "/*", "upstream": {"nodes": {"127.0.0.1:1": 1}},
                    "plugins": {"jwt-auth": {}}}]}, wait=False)
    try:
        gateway.process.wait(30)
    finally:
        gateway.stop()
    assert gateway.process.returncode != 0
    assert "consumers[0].plugins.jwt-auth.public_key: not a PEM public key" in (
        gateway.log_path.read_text())


# -- remembered tokens ----------------------------------------------------------------------


def test_jwt_auth_rejects_a_remembered_token_once_it_expires():
    instance = plugin()
    value = token(lifetime=None, exp=int(time.time()) + 1)
    assert instance.access(bearer(value)) is None  # verified, then remembered
    assert instance.access(bearer(value)) is None
    time.sleep(max(0.0, int(time.time()) + 1 - time.time()) + 1.05)
    response = instance.access(bearer(value))
    assert response is not None and response.status == 401
    assert "expired" in message(response).lower()


def test_jwt_auth_remembered_token_identifies_and_hides_credentials_every_time():
    instance = plugin(hide_credentials=True)
    value = token()
    for _ in range(3):
        ctx = bearer(value)
        assert instance.access(ctx) is None
        assert ctx.consumer_name == "jack"
        assert all(k.lower() != "authorization" for k, _ in forwarded(ctx))


def test_jwt_auth_a_forged_variant_of_a_remembered_token_is_still_refused():
    instance = plugin()
    value = token()
    assert instance.access(bearer(value)) is None
    header, payload, signature = value.split(".")
    forged = f"{header}.{payload}.{signature[:-2]}AA"
    response = instance.access(bearer(forged))
    assert response is not None and response.status == 401
