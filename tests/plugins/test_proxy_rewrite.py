from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import PluginEnv, validate_plugin
from sluicegate.plugins.proxy_rewrite import ProxyRewrite


def make_ctx(uri="/api/v1/users/42", query="", headers=()):
    raw = [(b"Host", b"gw.example"), *[(k.encode(), v.encode()) for k, v in headers]]
    return RequestContext("GET", uri, query, raw, "gw.example", ("192.0.2.9", 40000),
                          ("10.0.0.1", 9080), "1.1")


def plugin(**conf):
    model, _, errors = validate_plugin("proxy-rewrite", conf, "routes[0].plugins.proxy-rewrite")
    assert errors == []
    return ProxyRewrite(model, PluginEnv())


def forwarded(ctx):
    return [(k.decode(), v.decode()) for k, v in ctx.raw_headers]


def errors_of(conf):
    return validate_plugin("proxy-rewrite", conf, "routes[0].plugins.proxy-rewrite")[2]


def test_proxy_rewrite_replaces_uri_keeping_query():
    ctx = make_ctx(query="page=2")
    assert plugin(uri="/v2/users").rewrite(ctx) is None
    assert (ctx.uri, ctx.query, ctx.uri_dirty) == ("/v2/users", "page=2", True)


def test_proxy_rewrite_uri_with_variables_and_own_query():
    ctx = make_ctx(query="version=3&page=2")
    plugin(uri="/api/v$arg_version?from=${remote_addr}").rewrite(ctx)
    assert ctx.uri == "/api/v3"
    assert ctx.query == "from=192.0.2.9&version=3&page=2"


def test_proxy_rewrite_regex_uri_with_captures():
    ctx = make_ctx(query="x=1")
    plugin(regex_uri=["^/api/v1/(\\w+)/(\\d+)$", "/$1/by-id/${2}"]).rewrite(ctx)
    assert (ctx.uri, ctx.query) == ("/users/by-id/42", "x=1")


def test_proxy_rewrite_regex_uri_replaces_only_the_match():
    ctx = make_ctx()
    plugin(regex_uri=["/v1/", "/v2/"]).rewrite(ctx)
    assert ctx.uri == "/api/v2/users/42"


def test_proxy_rewrite_regex_uri_first_matching_pair_wins():
    rewrite = plugin(regex_uri=["^/nomatch/(.*)", "/a/$1", "^/api/(.*)", "/b/$1",
                                "^/(.*)", "/c/$1"])
    ctx = make_ctx()
    rewrite.rewrite(ctx)
    assert ctx.uri == "/b/v1/users/42"


def test_proxy_rewrite_regex_uri_without_match_keeps_path():
    ctx = make_ctx()
    plugin(regex_uri=["^/other/(.*)", "/$1"]).rewrite(ctx)
    assert ctx.uri == "/api/v1/users/42" and not ctx.uri_dirty


def test_proxy_rewrite_uri_takes_precedence_over_regex_uri():
    ctx = make_ctx()
    plugin(uri="/fixed", regex_uri=["^/(.*)", "/regex/$1"]).rewrite(ctx)
    assert ctx.uri == "/fixed"


def test_proxy_rewrite_sets_upstream_host_and_method():
    ctx = make_ctx()
    plugin(host="backend.internal:8080", method="POST").rewrite(ctx)
    assert ctx.upstream_host == "backend.internal:8080"
    assert ctx.method == "POST" and ctx.uri_dirty
    assert ctx.host == "gw.example"  # the client's Host stays what routing and logs see


def test_proxy_rewrite_headers_add_remove_set():
    ctx = make_ctx(headers=[("X-Tag", "a"), ("X-Secret", "s"), ("X-Mode", "old")])
    plugin(headers={"add": {"X-Tag": "b", "X-Via": ["gw1", "gw2"]},
                    "remove": ["X-Secret"],
                    "set": {"X-Mode": "new", "X-Client": "$remote_addr"}}).rewrite(ctx)
    assert forwarded(ctx) == [("Host", "gw.example"), ("X-Tag", "a"), ("X-Tag", "b"),
                              ("X-Via", "gw1"), ("X-Via", "gw2"), ("X-Mode", "new"),
                              ("X-Client", "192.0.2.9")]
    assert ctx.get_header("x-tag") == "a, b"
    assert ctx.get_header("x-secret") is None
    assert ctx.headers_dirty


def test_proxy_rewrite_flat_headers_form_sets():
    ctx = make_ctx(headers=[("X-Mode", "old")])
    plugin(headers={"X-Mode": "new", "X-Num": 7}).rewrite(ctx)
    assert ctx.get_header("x-mode") == "new"
    assert ctx.get_header("x-num") == "7"


def test_proxy_rewrite_header_values_use_regex_uri_captures_and_variables():
    ctx = make_ctx(headers=[("User-Agent", "curl/8")])
    plugin(regex_uri=["^/api/(v\\d)/(.*)", "/$2"],
           headers={"set": {"X-Api-Version": "$1", "X-UA": "${http_user_agent}",
                            "X-Missing": "[$http_x_nothing]", "X-Price": "$$5"}}).rewrite(ctx)
    assert ctx.uri == "/users/42"
    assert ctx.get_header("x-api-version") == "v1"
    assert ctx.get_header("x-ua") == "curl/8"
    assert ctx.get_header("x-missing") == "[]"
    assert ctx.get_header("x-price") == "$5"


def test_proxy_rewrite_rejects_odd_regex_uri():
    assert errors_of({"regex_uri": ["^/a", "/b", "^/c"]}) == [
        "routes[0].plugins.proxy-rewrite.regex_uri: must hold [regex, template] pairs "
        "(an even number of strings)"]


def test_proxy_rewrite_rejects_bad_regex_and_missing_capture():
    (error,) = errors_of({"regex_uri": ["^/(a", "/b"]})
    assert error.startswith("routes[0].plugins.proxy-rewrite.regex_uri[0]: invalid regex")
    (error,) = errors_of({"regex_uri": ["^/(a)", "/$2"]})
    assert "regex_uri[1]: refers to capture $2" in error


def test_proxy_rewrite_config_errors_name_the_field():
    assert errors_of({"method": "FETCH"})[0].startswith("routes[0].plugins.proxy-rewrite.method:")
    assert errors_of({"uri": "no-slash"})[0].startswith("routes[0].plugins.proxy-rewrite.uri:")
    assert errors_of({"headers": {"set": {"Bad Name": "x"}}})[0].startswith(
        "routes[0].plugins.proxy-rewrite.headers.set.Bad Name")
    assert "header values may not contain CR" in errors_of(
        {"headers": {"X-A": "a\r\nInjected: yes"}})[0]
    assert errors_of({"headers": {"add": {}, "X-A": "b"}})[0].startswith(
        "routes[0].plugins.proxy-rewrite.headers.X-A:")
