"""What the upstream receives and what the client gets back through a plain proxy route:
request line, forwarding headers, hop-by-hop filtering in both directions, the Host header
policy (pass_host), and the gateway's own 404 answer."""

from __future__ import annotations

import http.client
import json
import re
from urllib.parse import quote

TIMEOUT = 10.0


def echo_route(echo, uri: str = "/*", **upstream) -> dict:
    return {"routes": [{"id": "r1", "uri": uri,
                        "upstream": {"nodes": {echo.address: 1}, **upstream}}]}


def send(gateway, method: str, path: str, headers: list[tuple[str, str]] = (),
         body: bytes | None = None, host: str | None = None):
    """One request with exactly these header lines; returns (response, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    conn.putrequest(method, path, skip_host=host is not None, skip_accept_encoding=True)
    if host is not None:
        conn.putheader("Host", host)
    for name, value in headers:
        conn.putheader(name, value)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response, data


def received(gateway, path: str = "/h", headers: list[tuple[str, str]] = (),
             host: str | None = None) -> dict:
    """What the echo upstream saw, with headers grouped by lower-case name."""
    response, data = send(gateway, "GET", path, headers, host=host)
    assert response.status == 200, data
    info = json.loads(data)
    grouped: dict[str, list[str]] = {}
    for name, value in info["headers"]:
        grouped.setdefault(name.lower(), []).append(value)
    info["by_name"] = grouped
    return info


# -- request line ------------------------------------------------------------------------


def test_method_target_and_body_reach_the_upstream_unchanged(echo, start_gateway):
    gateway = start_gateway(echo_route(echo))
    target = "/api/a%20b/%E2%82%AC;p=1?q=%2F&x=1&x=2&empty="
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        body = b'{"k": "v"}' if method in ("POST", "PUT", "PATCH") else None
        response, data = send(gateway, method, target, body=body)
        assert response.status == 200, method
        info = json.loads(data)
        assert (info["method"], info["target"]) == (method, target)
        assert info["body_length"] == (len(body) if body else 0), method


def test_end_to_end_headers_are_forwarded_in_order_with_repeats(echo, start_gateway):
    gateway = start_gateway(echo_route(echo))
    info = received(gateway, headers=[("X-Custom", "one"), ("Accept", "text/plain"),
                                      ("X-Custom", "two"), ("Cookie", "a=1; b=2")])
    assert info["by_name"]["x-custom"] == ["one", "two"]
    assert info["by_name"]["accept"] == ["text/plain"]
    assert info["by_name"]["cookie"] == ["a=1; b=2"]


# -- forwarding headers ------------------------------------------------------------------


def test_x_forwarded_for_is_appended_to_the_incoming_one(echo, start_gateway):
    gateway = start_gateway(echo_route(echo))
    info = received(gateway, headers=[("X-Forwarded-For", "203.0.113.7")])
    assert info["by_name"]["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]


def test_repeated_x_forwarded_for_headers_are_joined_then_appended(echo, start_gateway):
    gateway = start_gateway(echo_route(echo))
    info = received(gateway, headers=[("X-Forwarded-For", "198.51.100.1, 198.51.100.2"),
                                      ("X-Forwarded-For", "203.0.113.7")])
    assert info["by_name"]["x-forwarded-for"] == [
        "198.51.100.1, 198.51.100.2, 203.0.113.7, 127.0.0.1"]


def test_x_forwarded_for_is_the_client_address_when_none_came_in(echo, start_gateway):
    gateway = start_gateway(echo_route(echo))
    info = received(gateway)
    assert info["by_name"]["x-forwarded-for"] == ["127.0.0.1"]


def test_x_real_ip_proto_and_host_are_set_once(echo, start_gateway):
    gateway = start_gateway(echo_route(echo))
    info = received(gateway, host="api.example.com:8080")
    assert info["by_name"]["x-real-ip"] == ["127.0.0.1"]
    assert info["by_name"]["x-forwarded-proto"] == ["http"]
    assert info["by_name"]["x-forwarded-host"] == ["api.example.com:8080"]


def test_client_cannot_spoof_x_real_ip(echo, start_gateway):
    gateway = start_gateway(echo_route(echo))
    info = received(gateway, headers=[("X-Real-IP", "10.9.9.9")])
    assert info["by_name"]["x-real-ip"] == ["127.0.0.1"]


# -- hop-by-hop headers ------------------------------------------------------------------


def test_hop_by_hop_request_headers_are_not_forwarded(echo, start_gateway):
    gateway = start_gateway(echo_route(echo))
    info = received(gateway, headers=[
        ("Connection", "keep-alive, X-Client-Token"),
        ("Keep-Alive", "timeout=5, max=100"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),  # no "upgrade" in Connection: not an upgrade request
        ("Proxy-Connection", "keep-alive"),
        ("Trailer", "X-Checksum"),
        ("X-End-To-End", "kept"),
    ])
    names = info["by_name"]
    assert names["x-end-to-end"] == ["kept"]
    for name in ("keep-alive", "te", "upgrade", "proxy-connection", "trailer"):
        assert name not in names, f"{name} was forwarded: {names[name]}"
    for value in names.get("connection", []):
        assert "x-client-token" not in value.lower(), f"client's Connection forwarded: {value}"


def test_headers_named_in_connection_are_not_forwarded(echo, start_gateway):
    # RFC 9110 §7.6.1: a proxy removes the header fields the Connection header lists.
    gateway = start_gateway(echo_route(echo))
    info = received(gateway, headers=[("Connection", "X-Hop-Private"),
                                      ("X-Hop-Private", "for the gateway only"),
                                      ("X-End-To-End", "kept")])
    assert info["by_name"]["x-end-to-end"] == ["kept"]
    assert "x-hop-private" not in info["by_name"]


def test_hop_by_hop_response_headers_are_not_passed_back(echo, start_gateway):
    gateway = start_gateway(echo_route(echo))
    leaked = []
    for name, value in [("Keep-Alive", "timeout=5, max=100"), ("Proxy-Connection", "keep-alive"),
                        ("Trailer", "X-Checksum"), ("Upgrade", "h2,h2c"), ("TE", "trailers"),
                        ("Connection", "X-Upstream-Token")]:
        response, _ = send(gateway, "GET", "/r?header=" + quote(f"{name}:{value}"))
        assert response.status == 200
        passed = [v for n, v in response.getheaders() if n.lower() == name.lower()]
        if name == "Connection":
            passed = [v for v in passed if "x-upstream-token" in v.lower()]
        leaked += [f"{name}: {v}" for v in passed]
    assert leaked == [], f"hop-by-hop headers from the upstream reached the client: {leaked}"


def test_end_to_end_response_headers_are_passed_back(echo, start_gateway):
    gateway = start_gateway(echo_route(echo))
    response, _ = send(gateway, "GET", "/r?header=" + quote("X-Upstream:value one"))
    assert response.getheader("X-Upstream") == "value one"
    assert response.getheader("Content-Type") == "application/json"


# -- Host header policy ------------------------------------------------------------------


def test_pass_host_pass_sends_the_client_host(echo, start_gateway):
    gateway = start_gateway(echo_route(echo, pass_host="pass"))
    info = received(gateway, host="api.example.com")
    assert info["by_name"]["host"] == ["api.example.com"]


def test_pass_host_node_sends_the_node_address(echo, start_gateway):
    gateway = start_gateway(echo_route(echo, pass_host="node"))
    info = received(gateway, host="api.example.com")
    assert len(info["by_name"]["host"]) == 1
    assert re.fullmatch(rf"127\.0\.0\.1(:{echo.port})?", info["by_name"]["host"][0])


def test_pass_host_rewrite_sends_upstream_host(echo, start_gateway):
    gateway = start_gateway(echo_route(echo, pass_host="rewrite",
                                       upstream_host="backend.internal"))
    info = received(gateway, host="api.example.com")
    assert info["by_name"]["host"] == ["backend.internal"]
    # The original host is still known to the upstream.
    assert info["by_name"]["x-forwarded-host"] == ["api.example.com"]


def test_nginx_upstream_sees_forwarding_headers(nginx, start_gateway):
    gateway = start_gateway({"routes": [{"id": "r1", "uri": "/headers",
                                         "upstream": {"nodes": {nginx.address: 1}}}]})
    response, data = send(gateway, "GET", "/headers", [("X-Forwarded-For", "203.0.113.7"),
                                                        ("TE", "trailers")],
                          host="site.example")
    assert response.status == 200
    seen = dict(item.split("=", 1) for item in data.decode().split(" ")
                if "=" in item and item.split("=", 1)[0] in ("host", "xrealip", "xproto", "te"))
    assert seen == {"host": "site.example", "xrealip": "127.0.0.1", "xproto": "http", "te": ""}
    assert "xff=203.0.113.7, 127.0.0.1 " in data.decode()


# -- the gateway's own answers -----------------------------------------------------------


def test_unmatched_request_gets_404_json_error(echo, start_gateway):
    gateway = start_gateway(echo_route(echo, uri="/only/*"))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    conn.request("GET", "/elsewhere")
    response = conn.getresponse()
    body = response.read()
    assert response.status == 404
    assert response.getheader("Content-Type") == "application/json"
    assert isinstance(json.loads(body)["error_msg"], str)
    # A 404 does not cost the client its connection.
    sock = conn.sock
    conn.request("GET", "/only/x")
    response = conn.getresponse()
    assert response.status == 200
    assert json.loads(response.read())["target"] == "/only/x"
    assert conn.sock is sock
    conn.close()
