import base64
import gzip

import pytest

from sluicegate.config.expr import compile_vars
from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import PluginEnv, build_chain, validate_plugin
from sluicegate.plugins.response_rewrite import ResponseRewrite

UPSTREAM_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", "11"),
                    ("ETag", '"v1"'), ("Server", "backend")]


def make_ctx(query="", headers=()):
    raw = [(b"Host", b"gw.example"), *[(k.encode(), v.encode()) for k, v in headers]]
    return RequestContext("GET", "/items", query, raw, "gw.example", ("192.0.2.9", 40000),
                          ("10.0.0.1", 9080), "1.1")


def plugin(**conf):
    model, _, errors = validate_plugin("response-rewrite", conf,
                                       "routes[0].plugins.response-rewrite")
    assert errors == []
    return ResponseRewrite(model, PluginEnv())


def respond(plugin, ctx=None, status=200, headers=UPSTREAM_HEADERS, chunks=(b"hello", b" world")):
    """Run the response through the plugin as the data plane does; returns (ctx, body)."""
    ctx = ctx or make_ctx()
    ctx.response_status = ctx.upstream_status = status
    ctx.response_headers = list(headers)
    plugin.header_filter(ctx)
    if not hasattr(plugin, "body_filter"):
        return ctx, b"".join(chunks)
    body = b""
    for index, chunk in enumerate(chunks):
        body += plugin.body_filter(ctx, chunk, index == len(chunks) - 1)
    return ctx, body


def errors_of(conf):
    return validate_plugin("response-rewrite", conf, "routes[0].plugins.response-rewrite")[2]


def test_response_rewrite_replaces_body_and_status():
    ctx, body = respond(plugin(status_code=503, body='{"maintenance":true}'),
                        headers=[*UPSTREAM_HEADERS, ("Content-Encoding", "gzip")])
    assert ctx.response_status == 503
    assert body == b'{"maintenance":true}'
    names = [name.lower() for name, _ in ctx.response_headers]
    assert "content-length" not in names and "etag" not in names
    assert "content-encoding" not in names
    assert ctx.get_response_header("server") == "backend"


def test_response_rewrite_body_is_sent_once_at_end_of_stream():
    rewrite = plugin(body="new")
    ctx = make_ctx()
    ctx.response_headers = []
    rewrite.header_filter(ctx)
    assert rewrite.body_filter(ctx, b"a", False) == b""
    assert rewrite.body_filter(ctx, b"b", False) == b""
    assert rewrite.body_filter(ctx, b"", True) == b"new"


def test_response_rewrite_decodes_base64_body():
    png = bytes(range(256))
    _, body = respond(plugin(body=base64.b64encode(png).decode(), body_base64=True))
    assert body == png


def test_response_rewrite_status_only_keeps_body_and_length():
    rewrite = plugin(status_code=299)
    assert not hasattr(rewrite, "body_filter")
    ctx, body = respond(rewrite)
    assert ctx.response_status == 299
    assert body == b"hello world"
    assert ctx.get_response_header("content-length") == "11"


def test_response_rewrite_header_only_config_adds_no_body_filter_to_chain():
    model, meta, _ = validate_plugin("response-rewrite", {"headers": {"set": {"X-A": "1"}}}, "p")
    chain = build_chain([("response-rewrite", model, meta)], PluginEnv())
    assert chain.body_filter == [] and len(chain.header_filter) == 1
    model, meta, _ = validate_plugin("response-rewrite", {"body": "x"}, "p")
    chain = build_chain([("response-rewrite", model, meta)], PluginEnv())
    assert len(chain.body_filter) == 1


def test_response_rewrite_headers_add_remove_set():
    rewrite = plugin(headers={"add": ["X-Served-By: gw", "Set-Cookie: a=1"],
                              "remove": ["Server"],
                              "set": {"Content-Type": "application/json",
                                      "X-Client": "$remote_addr"}})
    ctx, body = respond(rewrite, headers=[*UPSTREAM_HEADERS, ("Set-Cookie", "b=2")])
    assert body == b"hello world"
    assert ctx.response_headers == [
        ("Content-Length", "11"), ("ETag", '"v1"'), ("Set-Cookie", "b=2"),
        ("X-Served-By", "gw"), ("Set-Cookie", "a=1"),
        ("Content-Type", "application/json"), ("X-Client", "192.0.2.9")]


def test_response_rewrite_flat_headers_form_sets_and_empty_removes():
    ctx, _ = respond(plugin(headers={"X-Version": 2, "Server": ""}))
    assert ctx.get_response_header("x-version") == "2"
    assert ctx.get_response_header("server") is None


def test_response_rewrite_applies_only_when_vars_match():
    rewrite = plugin(vars=[["status", "==", 500]], status_code=200, body="fallback",
                     headers={"set": {"X-Rewritten": "yes"}})
    ctx, body = respond(rewrite, status=200)
    assert (ctx.response_status, body) == (200, b"hello world")
    assert ctx.get_response_header("x-rewritten") is None
    assert ctx.get_response_header("content-length") == "11"
    ctx, body = respond(rewrite, status=500)
    assert (ctx.response_status, body) == (200, b"fallback")
    assert ctx.get_response_header("x-rewritten") == "yes"


def test_response_rewrite_filters_replace_once_or_globally_with_captures():
    rewrite = plugin(filters=[{"regex": "(l+)o", "scope": "global", "replace": "[$1]"},
                              {"regex": "WORLD", "replace": "there", "options": "ji"}])
    ctx, body = respond(rewrite, chunks=(b"hello wor", b"ld, hello world"))
    assert body == b"he[ll] there, he[ll] world"
    assert ctx.get_response_header("content-length") is None

    ctx, body = respond(plugin(filters=[{"regex": "o", "replace": "0"}]))
    assert body == b"hell0 world"


def test_response_rewrite_filters_gzip_body_and_keep_encoding():
    rewrite = plugin(filters=[{"regex": "secret", "scope": "global", "replace": "***"}])
    packed = gzip.compress(b"a secret and another secret")
    ctx, body = respond(rewrite, headers=[("Content-Encoding", "gzip")],
                        chunks=(packed[:10], packed[10:]))
    assert ctx.get_response_header("content-encoding") == "gzip"
    assert gzip.decompress(body) == b"a *** and another ***"


def test_response_rewrite_filters_leave_unknown_encodings_alone():
    rewrite = plugin(filters=[{"regex": "x", "replace": "y"}])
    _, body = respond(rewrite, headers=[("Content-Encoding", "br")], chunks=(b"xx",))
    assert body == b"xx"


@pytest.mark.parametrize(("conditions", "expected"), [
    ([["status", "==", 200]], True),
    ([["status", "==", "200"]], True),
    ([["status", "~=", 200]], False),
    ([["status", ">=", 500]], False),
    ([["status", "<", 300], ["status", ">", 199]], True),
    ([["status", "in", [200, 201]]], True),
    ([["arg_mode", "in", ["debug", "trace"]]], True),
    ([["arg_mode", "~~", "^deb"]], True),
    ([["http_x_flag", "~*", "^YES$"]], True),
    ([["http_x_flag", "!", "~~", "^yes$"]], False),
    ([["http_x_missing", "==", "x"]], False),
    ([["http_x_missing", "~=", "x"]], True),
    ([["http_x_missing", ">", 1]], False),
    (["OR", ["status", "==", 404], ["arg_mode", "==", "debug"]], True),
    (["!AND", ["status", "==", 200], ["arg_mode", "==", "debug"]], False),
])
def test_response_rewrite_vars_operators(conditions, expected):
    ctx = make_ctx(query="mode=debug", headers=[("X-Flag", "yes")])
    ctx.response_status = 200
    assert compile_vars(conditions)(ctx) is expected


def test_response_rewrite_config_errors_name_the_field():
    assert errors_of({"status_code": 99})[0].startswith(
        "routes[0].plugins.response-rewrite.status_code:")
    assert errors_of({"body": "x", "filters": [{"regex": "a", "replace": "b"}]}) == [
        "routes[0].plugins.response-rewrite: body and filters cannot be used together"]
    assert errors_of({"filters": [{"regex": "a"}]}) == [
        "routes[0].plugins.response-rewrite.filters[0].replace: Field required"]
    assert errors_of({"filters": [{"regex": "a", "replace": "b", "scope": "all"}]})[0] \
        .startswith("routes[0].plugins.response-rewrite.filters[0].scope:")
    assert errors_of({"headers": {"add": ["X-Ok: 1", "no colon"]}})[0].startswith(
        "routes[0].plugins.response-rewrite.headers.add[1]:")
    assert "not valid base64" in errors_of({"body": "%%%", "body_base64": True})[0]


def test_response_rewrite_semantic_errors_name_the_element():
    assert errors_of({"vars": [["status", "=~", 200]]}) == [
        "routes[0].plugins.response-rewrite.vars[0]: unknown operator '=~' (supported: ==, "
        "~=, >, <, >=, <=, ~~, ~*, in, has, ipmatch, each may follow '!')"]
    assert "vars[0]: invalid regex" in errors_of({"vars": [["uri", "~~", "(("]]})[0]
    assert "filters[0].regex: invalid regex" in errors_of(
        {"filters": [{"regex": "((", "replace": ""}]})[0]
    assert "filters[0].replace: refers to capture $1" in errors_of(
        {"filters": [{"regex": "a", "replace": "$1"}]})[0]
