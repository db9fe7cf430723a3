"""What a client gets when the upstream fails: refused or slow connections, slow answers,
dead nodes among live ones, pooled connections the upstream closed, broken responses."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from harness import EchoUpstream, free_port

TIMEOUT = 10.0


def upstream_route(*addresses: str, **upstream) -> dict:
    return {"routes": [{"id": "r1", "uri": "/*", "upstream": {
        "nodes": {address: 1 for address in addresses}, **upstream}}]}


def fetch(gateway, path: str, conn: http.client.HTTPConnection | None = None,
          method: str = "GET"):
    """(status, headers, body); uses `conn` when given, else a new connection."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    conn.request(method, path)
    response = conn.getresponse()
    body = response.read()
    if own:
        conn.close()
    return response.status, response, body


def assert_json_error(response, body: bytes) -> None:
    assert response.getheader("Content-Type") == "application/json"
    assert isinstance(json.loads(body)["error_msg"], str)


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there: connections are refused


# -- a scripted upstream -----------------------------------------------------------------

def read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            return b""
        data += piece
    return data


class ScriptedUpstream:
    """Runs `handler(connection, index)` on a thread for each accepted connection."""

    def __init__(self, handler: Callable[[socket.socket, int], None]) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            index = self.accepted
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn, index), daemon=True).start()

    def _run(self, conn: socket.socket, index: int) -> None:
        with conn, contextlib.suppress(OSError):
            self.handler(conn, index)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def scripted():
    started: list[ScriptedUpstream] = []

    def start(handler: Callable[[socket.socket, int], None]) -> ScriptedUpstream:
        upstream = ScriptedUpstream(handler)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.close()


# -- the node cannot be reached or does not answer ---------------------------------------


def test_refused_connection_gets_502_json(start_gateway):
    gateway = start_gateway(upstream_route(dead_address()))
    started = time.monotonic()
    status, response, body = fetch(gateway, "/refused")
    assert status == 502
    assert_json_error(response, body)
    assert time.monotonic() - started < 2.0


def test_node_that_never_accepts_gets_504_after_connect_timeout(start_gateway):
    # A listener with a full accept queue drops SYNs: the connect hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=1)
    try:
        gateway = start_gateway(upstream_route(
            f"127.0.0.1:{listener.getsockname()[1]}", timeout={"connect": 0.5}))
        started = time.monotonic()
        status, response, body = fetch(gateway, "/blackhole")
        elapsed = time.monotonic() - started
    finally:
        filler.close()
        listener.close()
    assert status == 504
    assert_json_error(response, body)
    assert 0.4 <= elapsed < 2.0, f"answered after {elapsed:.2f} s, connect timeout 0.5 s"


def test_upstream_not_answering_within_read_timeout_gets_504_json(echo, start_gateway):
    gateway = start_gateway(upstream_route(echo.address, timeout={"read": 1}))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    started = time.monotonic()
    status, response, body = fetch(gateway, "/slow?delay=3", conn)
    elapsed = time.monotonic() - started
    assert status == 504
    assert_json_error(response, body)
    # Timeouts run on a 0.25 s clock, so they are accurate to about one tick.
    assert 0.7 <= elapsed < 2.0, f"answered after {elapsed:.2f} s, read timeout 1 s"
    # The late answer is not delivered to the client as the next response.
    status, _, body = fetch(gateway, "/next", conn)
    assert status == 200
    assert json.loads(body)["target"] == "/next"
    conn.close()


def test_upstream_answering_within_read_timeout_is_not_cut(echo, start_gateway):
    gateway = start_gateway(upstream_route(echo.address, timeout={"read": 1}))
    status, _, body = fetch(gateway, "/slowish?delay=0.5")
    assert status == 200
    assert json.loads(body)["target"] == "/slowish?delay=0.5"


def test_upstream_closing_without_an_answer_gets_502(echo, start_gateway):
    gateway = start_gateway(upstream_route(echo.address))
    started = time.monotonic()
    status, response, body = fetch(gateway, "/gone?drop=1")
    assert status == 502
    assert_json_error(response, body)
    assert time.monotonic() - started < 2.0


def test_invalid_upstream_response_gets_502(scripted, start_gateway):
    def handler(conn: socket.socket, index: int) -> None:
        if read_head(conn):
            conn.sendall(b"this is not HTTP\r\n\r\n")

    upstream = scripted(handler)
    gateway = start_gateway(upstream_route(upstream.address))
    status, response, body = fetch(gateway, "/garbage")
    assert status == 502
    assert_json_error(response, body)


# -- retries over nodes ------------------------------------------------------------------


@pytest.mark.parametrize("retries", [None, 1], ids=["default-retries", "retries-1"])
def test_dead_node_is_skipped_by_retrying_the_next_node(echo, start_gateway, retries):
    extra = {} if retries is None else {"retries": retries}
    gateway = start_gateway(upstream_route(dead_address(), echo.address, **extra))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    statuses = [fetch(gateway, f"/rr/{n}", conn)[0] for n in range(10)]
    conn.close()
    assert statuses == [200] * 10


def test_request_body_is_sent_again_to_the_next_node_after_a_refused_connect(
        echo, start_gateway):
    gateway = start_gateway(upstream_route(dead_address(), echo.address))
    body = bytes(range(256)) * 4096  # 1 MiB: more than is buffered before reading pauses
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    for n in range(4):
        conn.request("POST", f"/retry-body/{n}", body=body)
        response = conn.getresponse()
        data = response.read()
        assert response.status == 200, data
        info = json.loads(data)
        assert info["body_length"] == len(body)
        assert info["body_sha256"] == hashlib.sha256(body).hexdigest()
    conn.close()


def test_retries_zero_answers_502_when_the_dead_node_is_picked(echo, start_gateway):
    gateway = start_gateway(upstream_route(dead_address(), echo.address, retries=0))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    statuses = [fetch(gateway, f"/rr/{n}", conn)[0] for n in range(10)]
    conn.close()
    # Round robin over two equal nodes alternates: every other request hits the dead one.
    assert Counter(statuses) == {502: 5, 200: 5}, statuses


def test_all_nodes_dead_gets_502_quickly(start_gateway):
    gateway = start_gateway(upstream_route(dead_address(), dead_address(), dead_address()))
    started = time.monotonic()
    status, response, body = fetch(gateway, "/nobody")
    assert status == 502
    assert_json_error(response, body)
    assert time.monotonic() - started < 2.0


# -- pooled connections that died --------------------------------------------------------


def test_restarted_upstream_is_reached_again_on_a_fresh_connection(start_gateway):
    upstream = EchoUpstream(name="before")
    gateway = start_gateway(upstream_route(upstream.address, retries=0))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    try:
        status, _, body = fetch(gateway, "/one", conn)
        assert (status, json.loads(body)["name"]) == (200, "before")
        upstream.stop()
        upstream = EchoUpstream(upstream.port, name="after")
        status, _, body = fetch(gateway, "/two", conn)
        assert (status, json.loads(body)["name"]) == (200, "after")
    finally:
        conn.close()
        upstream.stop()


def test_pooled_connection_closed_by_upstream_is_replaced_transparently_for_a_get(
        scripted, start_gateway):
    # The first connection answers once, then closes when the next request arrives (a
    # server's keep-alive timeout racing with the gateway reusing the connection).
    def handler(conn: socket.socket, index: int) -> None:
        if index == 0:
            read_head(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
            read_head(conn)
            return
        while read_head(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")

    upstream = scripted(handler)
    gateway = start_gateway(upstream_route(upstream.address, retries=0))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    assert fetch(gateway, "/a", conn)[::2] == (200, b"first")
    assert fetch(gateway, "/b", conn)[::2] == (200, b"fresh")
    assert fetch(gateway, "/c", conn)[::2] == (200, b"fresh")
    conn.close()
    assert upstream.accepted == 2


def test_upstream_answer_with_connection_close_is_not_pooled(echo, start_gateway):
    gateway = start_gateway(upstream_route(echo.address, retries=0))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    ids = []
    for n in range(4):
        # The upstream says it will close (but leaves closing to the gateway).
        status, response, body = fetch(gateway, f"/closing/{n}?header=Connection:close", conn)
        assert status == 200
        assert response.getheader("Connection") is None
        ids.append(json.loads(body)["connection"])
        status, _, body = fetch(gateway, f"/after/{n}", conn)
        assert status == 200
        ids.append(json.loads(body)["connection"])
    conn.close()
    # Each "close" answer ends its connection; the next request opens a new one and may
    # keep it for the next "close" request.
    assert ids[0] != ids[1] and ids[2] != ids[3] and ids[4] != ids[5] and ids[6] != ids[7]
    assert len(set(ids)) >= 5, ids


# -- the upstream dies in the middle of a response ---------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_upstream_dying_mid_body_truncates_the_client_response(scripted, start_gateway,
                                                               framing):
    def handler(conn: socket.socket, index: int) -> None:
        if not read_head(conn):
            return
        if framing == "chunked":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3e8\r\n" + b"a" * 1000 + b"\r\n")
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
        time.sleep(0.2)

    upstream = scripted(handler)
    gateway = start_gateway(upstream_route(upstream.address))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    conn.request("GET", "/truncated")
    response = conn.getresponse()
    assert response.status == 200
    # The client must learn the body is incomplete: no clean end, and no hang.
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        response.read()
    conn.close()
