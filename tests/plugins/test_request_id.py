import string
import uuid

from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import PluginEnv, validate_plugin
from sluicegate.plugins.request_id import RequestId


def make_ctx(headers=()):
    raw = [(b"Host", b"gw.example"), *[(k.encode(), v.encode()) for k, v in headers]]
    return RequestContext("GET", "/", "", raw, "gw.example", ("192.0.2.9", 40000),
                          ("10.0.0.1", 9080), "1.1")


def plugin(**conf):
    model, _, errors = validate_plugin("request-id", conf, "routes[0].plugins.request-id")
    assert errors == []
    return RequestId(model, PluginEnv())


def run(plugin, ctx, upstream_headers=()):
    assert plugin.rewrite(ctx) is None
    ctx.response_status = 200
    ctx.response_headers = list(upstream_headers)
    plugin.header_filter(ctx)


def test_request_id_generates_uuid_sent_upstream_and_to_client():
    ctx = make_ctx()
    run(plugin(), ctx)
    request_id = ctx.request_id
    assert uuid.UUID(request_id).version == 4
    assert uuid.UUID(request_id).variant == uuid.RFC_4122
    assert str(uuid.UUID(request_id)) == request_id
    assert ctx.get_header("x-request-id") == request_id
    assert (b"X-Request-Id", request_id.encode()) in ctx.raw_headers
    assert ctx.get_response_header("X-Request-Id") == request_id
    assert ctx.var("request_id") == request_id


def test_request_id_is_new_per_request():
    request_id = plugin()
    first, second = make_ctx(), make_ctx()
    run(request_id, first)
    run(request_id, second)
    assert first.request_id != second.request_id


def test_request_id_keeps_client_sent_id():
    ctx = make_ctx([("x-request-id", "client-abc")])
    run(plugin(), ctx)
    assert ctx.request_id == "client-abc"
    assert ctx.get_response_header("x-request-id") == "client-abc"
    assert [v for k, v in ctx.raw_headers if k.lower() == b"x-request-id"] == [b"client-abc"]


def test_request_id_keeps_upstream_response_header():
    ctx = make_ctx()
    run(plugin(), ctx, [("X-Request-Id", "from-upstream")])
    assert ctx.response_headers == [("X-Request-Id", "from-upstream")]


def test_request_id_not_in_response_when_disabled():
    ctx = make_ctx()
    run(plugin(include_in_response=False), ctx)
    assert ctx.request_id and ctx.response_headers == []


def test_request_id_custom_header_name():
    ctx = make_ctx()
    run(plugin(header_name="X-Trace"), ctx)
    assert ctx.get_header("x-trace") == ctx.request_id
    assert ctx.get_response_header("x-trace") == ctx.request_id
    assert ctx.get_header("x-request-id") is None


def test_request_id_range_id_uses_char_set_and_length():
    ctx = make_ctx()
    run(plugin(algorithm="range_id", range_id={"char_set": "abcdef", "length": 30}), ctx)
    assert len(ctx.request_id) == 30 and set(ctx.request_id) <= set("abcdef")


def test_request_id_nanoid():
    ctx = make_ctx()
    run(plugin(algorithm="nanoid"), ctx)
    assert len(ctx.request_id) == 21
    assert set(ctx.request_id) <= set(string.ascii_letters + string.digits + "_-")


def test_request_id_config_errors_name_the_field():
    _, _, errors = validate_plugin("request-id", {"algorithm": "snowflake"}, "p")
    assert errors[0].startswith("p.algorithm:")
    _, _, errors = validate_plugin("request-id", {"range_id": {"length": 2}}, "p")
    assert errors[0].startswith("p.range_id.length:")
    _, _, errors = validate_plugin("request-id", {"header_name": "X Bad"}, "p")
    assert errors[0].startswith("p.header_name:")
