"""WebSocket through the gateway: the upgrade is passed to the upstream, frames flow both
ways as a tunnel, and an upgrade the upstream declines ends as a normal HTTP answer."""

from __future__ import annotations

import contextlib
import json
import socket
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from harness import EchoUpstream, free_port

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def ws_echo():
    """An echo upstream with its WebSocket echo server (HTTP on .port, WS on .ws_port)."""
    server = EchoUpstream(name="ws", ws_port=free_port())
    yield server
    server.stop()


def ws_route(port: int, **upstream) -> dict:
    return {"routes": [{"id": "ws", "uri": "/ws/*",
                        "upstream": {"nodes": {f"127.0.0.1:{port}": 1}, **upstream}}]}


def test_websocket_messages_echo_both_ways_through_the_gateway(ws_echo, start_gateway):
    gateway = start_gateway(ws_route(ws_echo.ws_port))
    with connect(f"ws://127.0.0.1:{gateway.port}/ws/chat", open_timeout=TIMEOUT,
                 max_size=None) as ws:
        ws.send("hello")
        assert ws.recv(timeout=TIMEOUT) == "hello"
        ws.send(b"\x00\x01binary\xff")
        assert ws.recv(timeout=TIMEOUT) == b"\x00\x01binary\xff"
        big = bytes(range(256)) * 4096  # 1 MiB, many TCP segments each way
        ws.send(big)
        assert ws.recv(timeout=TIMEOUT) == big
        for number in range(200):
            ws.send(f"message {number}")
        assert [ws.recv(timeout=TIMEOUT) for _ in range(200)] == [
            f"message {number}" for number in range(200)]
        ws.ping(b"still there?").wait(TIMEOUT)


def test_websocket_close_handshake_completes_through_the_gateway(ws_echo, start_gateway):
    gateway = start_gateway(ws_route(ws_echo.ws_port))
    with connect(f"ws://127.0.0.1:{gateway.port}/ws/bye", open_timeout=TIMEOUT,
                 close_timeout=TIMEOUT) as ws:
        ws.send("last")
        assert ws.recv(timeout=TIMEOUT) == "last"
        started = time.monotonic()
        ws.close(1000, "done")
        assert time.monotonic() - started < 2.0
        # The upstream's close frame came back through the tunnel.
        assert ws.protocol.close_rcvd is not None
        assert ws.protocol.close_rcvd.code == 1000


def test_websocket_client_is_disconnected_when_the_upstream_goes_away(start_gateway):
    upstream = EchoUpstream(name="dying", ws_port=free_port())
    try:
        gateway = start_gateway(ws_route(upstream.ws_port))
        with connect(f"ws://127.0.0.1:{gateway.port}/ws/x", open_timeout=TIMEOUT) as ws:
            ws.send("before")
            assert ws.recv(timeout=TIMEOUT) == "before"
            upstream.process.kill()
            upstream.process.wait()
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=3.0)
    finally:
        upstream.stop()


def test_several_websockets_stay_separate(ws_echo, start_gateway):
    gateway = start_gateway(ws_route(ws_echo.ws_port))
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(connect(f"ws://127.0.0.1:{gateway.port}/ws/{n}",
                                               open_timeout=TIMEOUT)) for n in range(5)]
        for number, ws in enumerate(sockets):
            ws.send(f"from {number}")
        for number, ws in reversed(list(enumerate(sockets))):
            assert ws.recv(timeout=TIMEOUT) == f"from {number}"


def test_declined_upgrade_gets_the_upstream_answer_and_the_connection_closes(
        ws_echo, start_gateway):
    # The HTTP port of the echo upstream does not speak WebSocket: it answers 200.
    gateway = start_gateway(ws_route(ws_echo.port))
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT)
    with sock:
        sock.sendall(b"GET /ws/plain HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        reader = sock.makefile("rb")
        status_line = reader.readline()
        headers = {}
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = reader.read(int(headers["content-length"]))
        started = time.monotonic()
        rest = reader.read()  # returns at EOF: the gateway closes the connection
        closed_after = time.monotonic() - started
    assert status_line.startswith(b"HTTP/1.1 200 ")
    info = json.loads(body)
    assert info["target"] == "/ws/plain"
    received = {name.lower(): value for name, value in info["headers"]}
    # The upgrade request reached the upstream as one.
    assert received.get("upgrade") == "websocket"
    assert "upgrade" in received.get("connection", "").lower()
    assert received.get("sec-websocket-key") == "dGhlIHNhbXBsZSBub25jZQ=="
    assert "upgrade" not in headers
    assert "close" in headers.get("connection", "").lower()
    assert rest == b""
    assert closed_after < 2.0


def test_websocket_handshake_response_carries_upgrade_headers(ws_echo, start_gateway):
    gateway = start_gateway(ws_route(ws_echo.ws_port))
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT)
    with sock:
        sock.sendall(b"GET /ws/raw HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n"
                     b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        reader = sock.makefile("rb")
        status_line = reader.readline()
        headers = {}
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
    assert status_line.startswith(b"HTTP/1.1 101 ")
    assert headers.get("upgrade", "").lower() == "websocket"
    assert "upgrade" in headers.get("connection", "").lower()
    # RFC 6455 §1.3: the accept value for the sample key.
    assert headers.get("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_websocket_frame_sent_along_with_the_handshake_is_delivered(ws_echo, start_gateway):
    gateway = start_gateway(ws_route(ws_echo.ws_port))
    payload = b"early bird"
    mask = b"\x01\x02\x03\x04"
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    frame = bytes([0x81, 0x80 | len(payload)]) + mask + masked  # FIN, text, masked
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT)
    with sock:
        # The client does not wait for the 101: the frame follows the request at once.
        sock.sendall(b"GET /ws/early HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" + frame)
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 101 ")
        while reader.readline() not in (b"\r\n", b""):
            pass
        assert reader.read(2 + len(payload)) == bytes([0x81, len(payload)]) + payload
