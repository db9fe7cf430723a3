"""Config reload on SIGHUP: the worker re-reads the file; a good change takes effect, a bad
one is rejected whole (never half-applied) and the running config keeps serving."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
from typing import Any

import pytest

from harness import Gateway, Nginx

RELOADED = "config reloaded"
REJECTED = "config reload rejected"


def get(gateway: Gateway, path: str,
        connection: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        if own:
            connection.close()


def wait_for_log(gateway: Gateway, text: str, count: int = 1, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = gateway.log()
        if log.count(text) >= count:
            return log
        if gateway.process.poll() is not None:
            pytest.fail(f"gateway exited with {gateway.process.returncode}:\n{log}")
        time.sleep(0.05)
    pytest.fail(f"{text!r} x{count} not in the gateway log after {timeout}s:\n{gateway.log()}")


def reload_with(gateway: Gateway, config: dict[str, Any] | str, outcome: str,
                count: int = 1) -> str:
    """Write the new file, send SIGHUP, wait until the worker logged `outcome`."""
    if isinstance(config, str):
        gateway.config_path.write_text(config)
    else:
        gateway.write_config(config)
    gateway.reload()
    return wait_for_log(gateway, outcome, count)


def nginx_route(nginx: Nginx) -> dict[str, Any]:
    return {"id": "home", "uri": "/", "upstream": {"nodes": {nginx.address: 1}}}


def echo_route(echo: Any, uri: str = "/echo/*", id: str = "echo") -> dict[str, Any]:
    return {"id": id, "uri": uri, "upstream": {"nodes": {echo.address: 1}}}


def with_routes(gateway: Gateway, *routes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"gateway": gateway.config["gateway"], "routes": list(routes), **extra}


def assert_route_not_found(gateway: Gateway, path: str) -> None:
    status, body = get(gateway, path)
    assert status == 404, body
    assert "error_msg" in json.loads(body)


def assert_serves_nginx(gateway: Gateway) -> None:
    status, body = get(gateway, "/")
    assert (status, body) == (200, Nginx.BODY.encode())


def test_reload_applies_a_new_route(nginx, echo, start_gateway):
    gateway = start_gateway({"routes": [nginx_route(nginx)]})
    assert_route_not_found(gateway, "/echo/hi")
    reload_with(gateway, with_routes(gateway, nginx_route(nginx), echo_route(echo)), RELOADED)
    status, body = get(gateway, "/echo/hi")
    assert status == 200, body
    assert json.loads(body)["target"] == "/echo/hi"
    assert_serves_nginx(gateway)


def test_reload_removes_a_deleted_route(nginx, echo, start_gateway):
    gateway = start_gateway({"routes": [nginx_route(nginx), echo_route(echo)]})
    assert get(gateway, "/echo/hi")[0] == 200
    reload_with(gateway, with_routes(gateway, nginx_route(nginx)), RELOADED)
    assert_route_not_found(gateway, "/echo/hi")
    assert_serves_nginx(gateway)


def test_reload_with_one_bad_route_rejects_the_whole_change(nginx, echo, start_gateway):
    gateway = start_gateway({"routes": [nginx_route(nginx)]})
    bad = {"id": "bad", "uri": "no-leading-slash", "upstream": {"nodes": {echo.address: 1}}}
    log = reload_with(gateway, with_routes(gateway, nginx_route(nginx), echo_route(echo), bad),
                      REJECTED)
    assert "routes[2].uri" in log  # the log names the bad field
    # Never half-applied: the valid new route in the same file is not served either.
    assert_route_not_found(gateway, "/echo/hi")
    assert_serves_nginx(gateway)
    assert gateway.process.poll() is None


def test_gateway_reloads_normally_after_a_rejected_change(nginx, echo, start_gateway):
    gateway = start_gateway({"routes": [nginx_route(nginx)]})
    reload_with(gateway, with_routes(gateway, nginx_route(nginx),
                                     {"id": "x", "uri": "/x", "upstream_id": "missing"}),
                REJECTED)
    reload_with(gateway, with_routes(gateway, nginx_route(nginx), echo_route(echo)), RELOADED)
    assert get(gateway, "/echo/hi")[0] == 200
    assert gateway.stop() == 0


def test_reload_with_invalid_yaml_keeps_serving_and_names_the_line(nginx, start_gateway):
    gateway = start_gateway({"routes": [nginx_route(nginx)]})
    log = reload_with(gateway, "routes:\n  - uri: /a\n    upstream: {nodes: [\n", REJECTED)
    assert "line " in log.split(REJECTED, 1)[1]
    assert_serves_nginx(gateway)
    assert gateway.process.poll() is None


def test_reload_adding_interception_is_rejected_whole_until_restart(nginx, echo,
                                                                     start_gateway):
    # Listeners and kernel rules are set up at start: a reload that changes them is
    # refused whole (the echo route that came with it is not applied either).
    gateway = start_gateway({"routes": [nginx_route(nginx)]})
    config = with_routes(gateway, nginx_route(nginx), echo_route(echo), plugins=[
        {"name": "tproxy", "config": {"listen": "127.0.0.1:1", "tproxy": True}}])
    log = reload_with(gateway, config, REJECTED)
    assert "tproxy" in log.split(REJECTED, 1)[1]
    assert_route_not_found(gateway, "/echo/hi")
    assert_serves_nginx(gateway)


def test_keep_alive_connection_sees_the_new_config_on_its_next_request(nginx, echo,
                                                                       start_gateway):
    gateway = start_gateway({"routes": [nginx_route(nginx)]})
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        assert get(gateway, "/", connection)[0] == 200
        reload_with(gateway, with_routes(gateway, nginx_route(nginx), echo_route(echo)),
                    RELOADED)
        status, body = get(gateway, "/echo/on-same-connection", connection)
        assert status == 200, body
        assert json.loads(body)["target"] == "/echo/on-same-connection"
    finally:
        connection.close()


def test_request_in_flight_during_reload_finishes_on_the_old_config(nginx, echo,
                                                                     start_gateway):
    gateway = start_gateway({"routes": [nginx_route(nginx), echo_route(echo)]})
    result: dict[str, Any] = {}

    def slow_request() -> None:
        try:
            result["response"] = get(gateway, "/echo/slow?delay=1")
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=slow_request)
    thread.start()
    # Routed already once the gateway holds a connection to the echo upstream.
    deadline = time.monotonic() + 10
    while not subprocess.run(["ss", "-Htn", "state", "established", "dport", "=",
                              f":{echo.port}"], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, "the slow request never reached the upstream"
        time.sleep(0.02)
    reload_with(gateway, with_routes(gateway, nginx_route(nginx)), RELOADED)
    assert_route_not_found(gateway, "/echo/new")  # new requests see the new config
    thread.join(10)
    assert "error" not in result, result
    status, body = result["response"]
    assert status == 200, body
    assert json.loads(body)["target"] == "/echo/slow?delay=1"


def test_reload_applies_in_every_worker(nginx, echo, start_gateway):
    gateway = start_gateway({"routes": [nginx_route(nginx)]}, workers=2)
    wait_for_log(gateway, "supervisor started 2 workers")
    reload_with(gateway, with_routes(gateway, nginx_route(nginx), echo_route(echo)), RELOADED,
                count=2)
    # Each request on a new connection; SO_REUSEPORT spreads them over both workers.
    statuses = [get(gateway, f"/echo/{index}")[0] for index in range(40)]
    assert statuses == [200] * 40
    assert gateway.stop() == 0


def test_bad_reload_is_rejected_in_every_worker(nginx, echo, start_gateway):
    gateway = start_gateway({"routes": [nginx_route(nginx)]}, workers=2)
    wait_for_log(gateway, "supervisor started 2 workers")
    bad = {"id": "bad", "uri": "/bad", "upstream": {"nodes": {"127.0.0.1:99999": 1}}}
    reload_with(gateway, with_routes(gateway, nginx_route(nginx), echo_route(echo), bad),
                REJECTED, count=2)
    statuses = [get(gateway, f"/echo/{index}")[0] for index in range(40)]
    assert statuses == [404] * 40
    assert all(get(gateway, "/")[0] == 200 for _ in range(10))
    assert gateway.process.poll() is None
