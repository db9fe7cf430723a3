"""Who may use the Admin API: the key (X-API-KEY), the client address (allow_admin), the
body size limit, and where the Admin API runs."""

from __future__ import annotations

import re
import time

from admin.client import ADMIN_KEY, AdminClient, admin_port


def test_admin_api_refuses_a_request_without_key(admin_gateway):
    _, admin = admin_gateway()
    reply = admin.get("routes", key=None)
    assert reply.status == 401
    assert "X-API-KEY" in reply.body["error_msg"]


def test_admin_api_refuses_a_wrong_key(admin_gateway):
    _, admin = admin_gateway()
    for wrong in ("nope", ADMIN_KEY[:-1], ADMIN_KEY + "x", ""):
        assert admin.get("routes", key=wrong).status == 401, wrong


def test_admin_api_answers_with_the_configured_key(admin_gateway):
    _, admin = admin_gateway()
    reply = admin.get("routes")
    assert reply.status == 200
    assert reply.body == {"list": [], "total": 0}


def test_admin_api_refuses_a_client_address_outside_allow_admin(admin_gateway):
    # 127.0.0.1 is not in the allowed network: even the right key gets 403.
    _, admin = admin_gateway(allow_admin=["10.255.0.0/16", "::1/128"])
    reply = admin.get("routes")
    assert reply.status == 403
    assert "allow_admin" in reply.body["error_msg"]


def test_admin_api_refuses_a_body_over_1_mib(admin_gateway):
    _, admin = admin_gateway()
    huge = b'{"desc": "' + b"x" * (1024 * 1024 + 1) + b'"}'
    reply = admin.request("PUT", "upstreams/big", raw=huge)
    assert reply.status == 413
    assert "error_msg" in reply.body
    assert admin.get("upstreams/big").status == 404


def test_admin_key_is_generated_and_logged_once_when_none_is_configured(start_gateway):
    gateway = start_gateway({})
    port = admin_port(gateway)
    lines = [line for line in gateway.log().splitlines() if "generated key" in line]
    assert len(lines) == 1, gateway.log()
    key = re.search(r"generated key for this run: (\S+)", lines[0]).group(1)
    assert len(key) >= 24
    admin = AdminClient(port, key)
    assert admin.get("routes").status == 200
    assert admin.get("routes", key="admin").status == 401


def test_admin_key_from_the_environment_overrides_the_file(start_gateway, monkeypatch):
    # The gateway process inherits the environment the harness starts it with.
    monkeypatch.setenv("SLUICEGATE_ADMIN_KEY", "from-the-environment")
    gateway = start_gateway({"admin": {"key": "from-the-file"}})
    port = admin_port(gateway)
    assert AdminClient(port, "from-the-environment").get("routes").status == 200
    assert AdminClient(port, "from-the-file").get("routes").status == 401
    text = gateway.log()
    assert "from-the-environment" not in text and "from-the-file" not in text
    assert "generated key" not in text


def test_configured_admin_key_never_appears_in_the_log(admin_gateway):
    gateway, admin = admin_gateway()
    admin.get("routes", key="a-wrong-guess")
    admin.put("upstreams/u1", {"nodes": {"127.0.0.1:1": 1}})
    assert ADMIN_KEY not in gateway.log()
    assert "a-wrong-guess" not in gateway.log()


def test_admin_api_is_not_served_when_disabled(start_gateway):
    gateway = start_gateway({"admin": {"enabled": False}})
    # The worker logs "serving" after the point where the Admin API would have started.
    deadline = time.monotonic() + 15
    while "serving" not in gateway.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "serving" in gateway.log()
    assert "Admin API" not in gateway.log()


def test_admin_api_runs_once_in_the_supervisor_with_several_workers(admin_gateway):
    gateway, admin = admin_gateway(workers=2)
    assert admin.put("upstreams/u1", {"nodes": {"127.0.0.1:1": 1}}).status == 201
    assert admin.get("upstreams/u1").status == 200
    # Only the supervisor binds the Admin API: workers would fail on the taken port.
    assert gateway.process.poll() is None
    assert "cannot start" not in gateway.log()


def test_gateway_does_not_start_when_the_admin_port_is_taken(start_gateway):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin_port = taken.getsockname()[1]
        gateway = start_gateway({"admin": {"listen": f"127.0.0.1:{admin_port}",
                                           "key": ADMIN_KEY}}, wait=False)
        code = gateway.process.wait(30)
    assert code == 4, gateway.log()
    assert f"Admin API 127.0.0.1:{admin_port}" in gateway.log()
