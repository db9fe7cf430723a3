"""The plugin pipeline as a user sees it: a running gateway in front of nginx (`/headers`
echoes what nginx received) or the echo upstream (JSON description of the request)."""

from __future__ import annotations

import base64
import http.client
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

from harness import wait_for_port

CONSUMERS = [
    {"username": "jack", "plugins": {"key-auth": {"key": "jack-secret-key-123"},
                                     "basic-auth": {"username": "jack",
                                                    "password": "jack-pass-456"}}},
    {"username": "rose", "plugins": {"key-auth": {"key": "rose-secret-key-789"}}},
]
JACK_KEY = "jack-secret-key-123"
ROSE_KEY = "rose-secret-key-789"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def echoed_headers(self) -> dict[str, str]:
        """Headers the echo upstream received, by lower-case name."""
        return {name.lower(): value for name, value in self.json()["headers"]}

    def nginx_saw(self) -> dict[str, str]:
        """nginx `/headers`: `name=value` pairs of what nginx received."""
        return dict(re.findall(r"(\w+)=(\S*)", self.body.decode()))


def call(gateway: Any, path: str, headers: dict[str, str] | None = None,
         method: str = "GET") -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def basic(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def log_lines(gateway: Any, path: Path, count: int) -> list[dict[str, Any]]:
    """The file-logger lines, after stopping the gateway (which flushes them; a running
    gateway writes them within 0.5 s)."""
    assert gateway.stop() == 0
    text = path.read_text() if path.exists() else ""
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == count, text
    return lines


def route(upstream: Any, plugins: dict[str, Any], uri: str = "/*", **extra: Any
          ) -> dict[str, Any]:
    return {"id": extra.pop("id", "r1"), "uri": uri,
            "upstream": {"nodes": {upstream.address: 1}}, "plugins": plugins, **extra}


# -- key-auth -----------------------------------------------------------------------------


def test_key_auth_rejects_missing_key_at_the_gateway(nginx, start_gateway):
    gateway = start_gateway({"consumers": CONSUMERS,
                             "routes": [route(nginx, {"key-auth": {}})]})
    reply = call(gateway, "/headers")
    assert reply.status == 401
    assert reply.json() == {"message": "Missing API key in request"}
    assert reply.headers["Content-Type"] == "application/json"


def test_key_auth_rejects_wrong_key_at_the_gateway(nginx, start_gateway):
    gateway = start_gateway({"consumers": CONSUMERS,
                             "routes": [route(nginx, {"key-auth": {}})]})
    reply = call(gateway, "/headers", {"apikey": "not-a-key"})
    assert reply.status == 401
    assert reply.json() == {"message": "Invalid API key in request"}
    assert "method=" not in reply.body.decode()  # never reached nginx


def test_key_auth_admits_a_consumer_and_forwards_the_request(nginx, start_gateway):
    gateway = start_gateway({"consumers": CONSUMERS,
                             "routes": [route(nginx, {"key-auth": {}})]})
    for key in (JACK_KEY, ROSE_KEY):
        reply = call(gateway, "/headers", {"apikey": key})
        assert reply.status == 200
        assert reply.nginx_saw()["uri"] == "/headers"
        assert reply.nginx_saw()["apikey"] == key  # hide_credentials is off by default


def test_key_auth_accepts_the_key_as_a_query_argument(echo, start_gateway):
    gateway = start_gateway({"consumers": CONSUMERS, "routes": [route(echo, {"key-auth": {}})]})
    reply = call(gateway, f"/x?apikey={ROSE_KEY}&page=2")
    assert reply.status == 200
    assert reply.json()["target"] == f"/x?apikey={ROSE_KEY}&page=2"


def test_key_auth_hide_credentials_keeps_the_key_from_the_upstream(nginx, start_gateway):
    gateway = start_gateway({"consumers": CONSUMERS, "routes": [
        route(nginx, {"key-auth": {"hide_credentials": True}})]})
    reply = call(gateway, "/headers", {"apikey": JACK_KEY})
    assert reply.status == 200
    assert reply.nginx_saw()["apikey"] == ""
    assert JACK_KEY not in reply.body.decode()


def test_key_auth_hide_credentials_removes_the_key_from_the_query(echo, start_gateway):
    gateway = start_gateway({"consumers": CONSUMERS, "routes": [
        route(echo, {"key-auth": {"hide_credentials": True}})]})
    reply = call(gateway, f"/x?page=2&apikey={ROSE_KEY}&sort=asc")
    assert reply.status == 200
    assert reply.json()["target"] == "/x?page=2&sort=asc"


def test_key_auth_identifies_each_consumer(echo, start_gateway, tmp_path):
    log = tmp_path / "access.log"
    gateway = start_gateway({"consumers": CONSUMERS, "routes": [
        route(echo, {"key-auth": {}, "file-logger": {"path": str(log)}})]})
    assert call(gateway, "/a", {"apikey": JACK_KEY}).status == 200
    assert call(gateway, "/b", {"apikey": ROSE_KEY}).status == 200
    assert call(gateway, "/c", {"apikey": "nope"}).status == 401
    lines = log_lines(gateway, log, 3)
    assert [(line["uri"], line["consumer"], line["status"]) for line in lines] == [
        ("/a", "jack", 200), ("/b", "rose", 200), ("/c", None, 401)]


# -- basic-auth ---------------------------------------------------------------------------


def test_basic_auth_challenges_a_request_without_credentials(nginx, start_gateway):
    gateway = start_gateway({"consumers": CONSUMERS,
                             "routes": [route(nginx, {"basic-auth": {}})]})
    reply = call(gateway, "/headers")
    assert reply.status == 401
    assert reply.headers["WWW-Authenticate"].startswith("Basic realm=")


def test_basic_auth_rejects_a_wrong_password(nginx, start_gateway):
    gateway = start_gateway({"consumers": CONSUMERS,
                             "routes": [route(nginx, {"basic-auth": {}})]})
    assert call(gateway, "/headers", basic("jack", "wrong")).status == 401
    assert call(gateway, "/headers", basic("nobody", "jack-pass-456")).status == 401


def test_basic_auth_admits_the_consumer(echo, start_gateway, tmp_path):
    log = tmp_path / "access.log"
    gateway = start_gateway({"consumers": CONSUMERS, "routes": [
        route(echo, {"basic-auth": {}, "file-logger": {"path": str(log)}})]})
    reply = call(gateway, "/private", basic("jack", "jack-pass-456"))
    assert reply.status == 200
    assert reply.json()["target"] == "/private"
    assert log_lines(gateway, log, 1)[0]["consumer"] == "jack"


# -- proxy-rewrite ------------------------------------------------------------------------


def test_proxy_rewrite_uri_replaces_the_path_and_keeps_the_query(echo, start_gateway):
    gateway = start_gateway({"routes": [
        route(echo, {"proxy-rewrite": {"uri": "/new/path"}}, uri="/old/*")]})
    assert call(gateway, "/old/thing?q=1").json()["target"] == "/new/path?q=1"


def test_proxy_rewrite_regex_uri_uses_captures(echo, start_gateway):
    gateway = start_gateway({"routes": [
        route(echo, {"proxy-rewrite": {"regex_uri": ["^/api/(.*)", "/v2/$1"]}})]})
    assert call(gateway, "/api/users/7?x=1").json()["target"] == "/v2/users/7?x=1"
    # A path the regex does not match goes upstream unchanged.
    assert call(gateway, "/other").json()["target"] == "/other"


def test_proxy_rewrite_host_sets_the_host_header_sent_upstream(nginx, start_gateway):
    gateway = start_gateway({"routes": [
        route(nginx, {"proxy-rewrite": {"host": "backend.internal"}})]})
    reply = call(gateway, "/headers", {"Host": "public.example.com"})
    assert reply.nginx_saw()["host"] == "backend.internal"


def test_proxy_rewrite_method_changes_the_method_sent_upstream(echo, start_gateway):
    gateway = start_gateway({"routes": [route(echo, {"proxy-rewrite": {"method": "POST"}})]})
    reply = call(gateway, "/m")
    assert reply.status == 200
    assert reply.json()["method"] == "POST"


def test_proxy_rewrite_sets_adds_and_removes_request_headers(echo, start_gateway):
    gateway = start_gateway({"routes": [route(echo, {"proxy-rewrite": {"headers": {
        "set": {"X-Api-Version": "2", "X-Client": "$remote_addr"},
        "add": {"X-Tag": "added"},
        "remove": ["X-Secret"],
    }}})]})
    reply = call(gateway, "/", {"X-Api-Version": "1", "X-Tag": "original",
                                "X-Secret": "hush", "X-Kept": "yes"})
    headers = reply.json()["headers"]
    names = [name.lower() for name, _ in headers]
    seen = reply.echoed_headers()
    assert seen["x-api-version"] == "2"
    assert names.count("x-api-version") == 1
    assert seen["x-client"] == "127.0.0.1"
    assert sorted(v for n, v in headers if n.lower() == "x-tag") == ["added", "original"]
    assert "x-secret" not in seen
    assert seen["x-kept"] == "yes"


# -- response-rewrite ---------------------------------------------------------------------


def test_response_rewrite_replaces_status_body_and_headers(echo, start_gateway):
    gateway = start_gateway({"routes": [route(echo, {"response-rewrite": {
        "status_code": 203,
        "body": "rewritten body\n",
        "headers": {"set": {"X-Served-By": "sluicegate"}, "remove": ["Content-Type"]},
    }})]})
    reply = call(gateway, "/anything")
    assert reply.status == 203
    assert reply.body == b"rewritten body\n"
    assert reply.headers["X-Served-By"] == "sluicegate"
    assert reply.headers["Content-Type"] is None


def test_response_rewrite_headers_only_keeps_the_upstream_body(echo, start_gateway):
    gateway = start_gateway({"routes": [route(echo, {"response-rewrite": {
        "headers": {"add": ["X-Added: 1"], "set": {"X-Set": "$remote_addr"}}}})]})
    reply = call(gateway, "/kept")
    assert reply.status == 200
    assert reply.json()["target"] == "/kept"
    assert reply.headers["X-Added"] == "1"
    assert reply.headers["X-Set"] == "127.0.0.1"


# -- request-id ---------------------------------------------------------------------------


def test_request_id_is_returned_and_sent_upstream(echo, start_gateway):
    gateway = start_gateway({"routes": [route(echo, {"request-id": {}})]})
    first = call(gateway, "/")
    second = call(gateway, "/")
    request_id = first.headers["X-Request-Id"]
    assert UUID.match(request_id), request_id
    assert first.echoed_headers()["x-request-id"] == request_id
    assert second.headers["X-Request-Id"] != request_id


def test_request_id_keeps_the_clients_id(nginx, start_gateway):
    gateway = start_gateway({"routes": [route(nginx, {"request-id": {}})]})
    reply = call(gateway, "/headers", {"X-Request-Id": "client-chosen-42"})
    assert reply.headers["X-Request-Id"] == "client-chosen-42"
    assert reply.nginx_saw()["requestid"] == "client-chosen-42"


# -- file-logger --------------------------------------------------------------------------


def test_file_logger_writes_one_json_line_per_request_without_credentials(
        echo, start_gateway, tmp_path):
    log = tmp_path / "access.log"
    logger = {"file-logger": {"path": str(log)}}
    gateway = start_gateway({"consumers": CONSUMERS, "routes": [
        route(echo, {"key-auth": {}, **logger}, uri="/key/*", id="key"),
        route(echo, {"basic-auth": {}, **logger}, uri="/basic/*", id="basic"),
    ]})
    replies = [
        call(gateway, "/key/a", {"apikey": JACK_KEY, "User-Agent": "tester/1"}),
        call(gateway, f"/key/b?apikey={ROSE_KEY}&x=1"),
        call(gateway, "/key/c", {"apikey": "wrong-key-000"}),
        call(gateway, "/basic/d", basic("jack", "jack-pass-456")),
        call(gateway, "/basic/e", basic("jack", "bad-password-000")),
    ]
    assert [r.status for r in replies] == [200, 200, 401, 200, 401]
    lines = log_lines(gateway, log, 5)
    assert [line["uri"] for line in lines] == ["/key/a", "/key/b", "/key/c", "/basic/d",
                                               "/basic/e"]
    assert [line["route_id"] for line in lines] == ["key", "key", "key", "basic", "basic"]
    assert [line["status"] for line in lines] == [200, 200, 401, 200, 401]
    assert lines[0]["method"] == "GET"
    assert lines[0]["client_ip"] == "127.0.0.1"
    assert lines[0]["user_agent"] == "tester/1"
    assert lines[0]["upstream_status"] == 200
    assert lines[0]["upstream_addr"] == echo.address
    assert lines[2]["upstream_status"] is None  # answered by key-auth
    text = log.read_text()
    for secret in (JACK_KEY, ROSE_KEY, "wrong-key-000", "jack-pass-456", "bad-password-000",
                   base64.b64encode(b"jack:jack-pass-456").decode(), "Basic "):
        assert secret not in text
    assert "authorization" not in text.lower()
    assert "apikey" not in text.lower()


def test_file_logger_records_the_request_id(echo, start_gateway, tmp_path):
    log = tmp_path / "access.log"
    gateway = start_gateway({"routes": [
        route(echo, {"request-id": {}, "file-logger": {"path": str(log)}})]})
    reply = call(gateway, "/with-id")
    (line,) = log_lines(gateway, log, 1)
    assert line["request_id"] == reply.headers["X-Request-Id"]
    assert line["route_id"] == "r1"


# -- global rules, services, _meta --------------------------------------------------------


def test_global_rule_plugins_run_for_every_route(nginx, echo, start_gateway):
    gateway = start_gateway({
        "global_rules": [{"id": 1, "plugins": {
            "request-id": {},
            "response-rewrite": {"headers": {"set": {"X-Global": "on"}}}}}],
        "routes": [
            {"id": "n", "uri": "/headers", "upstream": {"nodes": {nginx.address: 1}}},
            {"id": "e", "uri": "/echo/*", "upstream": {"nodes": {echo.address: 1}},
             "plugins": {"proxy-rewrite": {"headers": {"set": {"X-Route": "e"}}}}},
        ]})
    from_nginx = call(gateway, "/headers")
    from_echo = call(gateway, "/echo/x")
    for reply in (from_nginx, from_echo):
        assert reply.status == 200
        assert reply.headers["X-Global"] == "on"
        assert UUID.match(reply.headers["X-Request-Id"])
    assert from_nginx.nginx_saw()["requestid"] == from_nginx.headers["X-Request-Id"]
    assert from_echo.echoed_headers()["x-route"] == "e"


def test_global_rule_plugins_run_for_requests_no_route_matches(echo, start_gateway):
    # APISIX runs global rules before answering 404, so a global request-id and
    # response-rewrite apply to that answer too.
    gateway = start_gateway({
        "global_rules": [{"id": 1, "plugins": {
            "request-id": {},
            "response-rewrite": {"headers": {"set": {"X-Global": "on"}}}}}],
        "routes": [{"id": "e", "uri": "/echo/*", "upstream": {"nodes": {echo.address: 1}}}]})
    reply = call(gateway, "/no/such/route")
    assert reply.status == 404
    assert reply.headers["X-Global"] == "on"
    assert reply.headers["X-Request-Id"] is not None
    assert UUID.match(reply.headers["X-Request-Id"])


def test_route_meta_disable_turns_off_a_plugin_inherited_from_the_service(
        nginx, start_gateway):
    gateway = start_gateway({
        "consumers": CONSUMERS,
        "services": [{"id": "s", "plugins": {"key-auth": {}},
                      "upstream": {"nodes": {nginx.address: 1}}}],
        "routes": [
            {"id": "guarded", "uri": "/headers", "service_id": "s"},
            {"id": "open", "uri": "/*", "service_id": "s",
             "plugins": {"key-auth": {"_meta": {"disable": True}}}},
        ]})
    assert call(gateway, "/headers").status == 401
    assert call(gateway, "/headers", {"apikey": JACK_KEY}).status == 200
    open_reply = call(gateway, "/status/201")
    assert open_reply.status == 201


def test_meta_priority_decides_which_of_two_answering_plugins_answers(nginx, start_gateway):
    # Both auth plugins answer 401 without credentials; basic-auth (2520) runs before
    # key-auth (2500) unless a route raises key-auth's priority.
    gateway = start_gateway({"consumers": CONSUMERS, "routes": [
        route(nginx, {"key-auth": {}, "basic-auth": {}}, uri="/default/*", id="default"),
        route(nginx, {"key-auth": {"_meta": {"priority": 3000}}, "basic-auth": {}},
              uri="/raised/*", id="raised"),
    ]})
    default = call(gateway, "/default/x")
    raised = call(gateway, "/raised/x")
    assert default.status == raised.status == 401
    assert default.json() == {"message": "Missing authorization in request"}
    assert raised.json() == {"message": "Missing API key in request"}


def test_service_plugins_merge_with_route_plugins_and_the_route_wins(echo, start_gateway):
    gateway = start_gateway({
        "services": [{"id": "s", "upstream": {"nodes": {echo.address: 1}}, "plugins": {
            "request-id": {},
            "response-rewrite": {"headers": {"set": {"X-From": "service",
                                                     "X-Service-Only": "yes"}}}}}],
        "routes": [
            {"id": "plain", "uri": "/plain", "service_id": "s"},
            {"id": "override", "uri": "/override", "service_id": "s", "plugins": {
                "response-rewrite": {"headers": {"set": {"X-From": "route"}}},
                "proxy-rewrite": {"uri": "/rewritten"}}},
        ]})
    plain = call(gateway, "/plain")
    assert plain.headers["X-From"] == "service"
    assert plain.headers["X-Service-Only"] == "yes"
    override = call(gateway, "/override")
    assert override.headers["X-From"] == "route"
    # The route's response-rewrite replaces the service's whole config for that plugin.
    assert override.headers["X-Service-Only"] is None
    # Plugins only the service has still run, and the route's own plugins too.
    assert UUID.match(override.headers["X-Request-Id"])
    assert override.json()["target"] == "/rewritten"


def test_consumer_is_reported_in_metrics(echo, start_gateway):
    gateway = start_gateway({"consumers": CONSUMERS, "routes": [
        route(echo, {"key-auth": {}, "prometheus": {}}, id="metered")]})
    for _ in range(3):
        assert call(gateway, "/", {"apikey": JACK_KEY}).status == 200
    assert call(gateway, "/", {"apikey": ROSE_KEY}).status == 200
    wait_for_port(gateway.metrics_port, timeout=5)
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("sluicegate_http_requests_total{"):
            consumer = re.search(r'consumer="([^"]*)"', line).group(1)
            counts[consumer] = counts.get(consumer, 0) + float(line.rsplit(" ", 1)[1])
    assert counts == {"jack": 3.0, "rose": 1.0}


# -- headers a plugin sets before the response exists --------------------------------------


def test_limit_count_quota_headers_replace_the_upstreams_on_the_raw_response_path(
        echo, start_gateway):
    # No plugin here filters headers, so the upstream's head is copied as bytes: the quota
    # headers must still replace an upstream header of the same name, not duplicate it.
    limit = {"count": 5, "time_window": 60, "key_type": "constant", "key": "all"}
    gateway = start_gateway({"routes": [route(echo, {"limit-count": limit})]})
    reply = call(gateway, "/x?header=X-RateLimit-Limit:999")
    assert reply.status == 200
    assert reply.headers.get_all("X-RateLimit-Limit") == ["5"]
    assert reply.headers["X-RateLimit-Remaining"] == "4"
    assert reply.headers["Content-Type"]  # the upstream's other headers are kept


def test_limit_count_quota_headers_reach_a_response_that_other_plugins_filter(
        echo, start_gateway):
    limit = {"count": 5, "time_window": 60, "key_type": "constant", "key": "all"}
    rewrite = {"headers": {"set": {"X-Rewritten": "yes"}}}
    gateway = start_gateway({"routes": [route(echo, {"limit-count": limit,
                                                     "response-rewrite": rewrite})]})
    reply = call(gateway, "/x?header=X-RateLimit-Limit:999")
    assert reply.headers.get_all("X-RateLimit-Limit") == ["5"]
    assert reply.headers["X-Rewritten"] == "yes"
