"""HTTP/1.1 persistent connections on both sides of the gateway: client connections carry
many requests (also pipelined), upstream connections are pooled, limited and closed when
idle, and HTTP/1.0 clients get the connection semantics they asked for."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import route_to

TIMEOUT = 10.0


def echo_config(echo, **upstream):
    return {"routes": [{"id": "r1", "uri": "/*",
                        "upstream": {"nodes": {echo.address: 1}, **upstream}}]}


def get_info(conn: http.client.HTTPConnection, path: str) -> dict:
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200, body
    return json.loads(body)


# -- raw HTTP/1.x reading (for pipelining and HTTP/1.0, which http.client hides) -----------

class RawResponse:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(values) if values else None


def read_response(reader, method: str = "GET") -> RawResponse:
    line = reader.readline()
    if not line:
        raise EOFError("connection closed before a response")
    parts = line.decode("latin-1").split(" ", 2)
    assert parts[0].startswith("HTTP/1."), f"not a status line: {line!r}"
    status = int(parts[1])
    headers = []
    while True:
        line = reader.readline()
        if not line:
            raise EOFError("connection closed inside a response head")
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    response = RawResponse(status, headers, b"")
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return response
    if "chunked" in (response.header("Transfer-Encoding") or "").lower():
        body = bytearray()
        while True:
            size = int(reader.readline().split(b";")[0], 16)
            if size == 0:
                while reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            body += reader.read(size)
            assert reader.read(2) == b"\r\n"
        response.body = bytes(body)
    elif response.header("Content-Length") is not None:
        length = int(response.header("Content-Length"))
        response.body = reader.read(length)
        assert len(response.body) == length, "body shorter than its Content-Length"
    else:
        response.body = reader.read()
    return response


def raw_connection(gateway) -> tuple[socket.socket, object]:
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT)
    return sock, sock.makefile("rb")


def wait_closed(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the peer closes `sock` (reading nothing else), or None."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        data = sock.recv(1)
    except TimeoutError:
        return None
    except ConnectionResetError:
        data = b""
    assert data == b"", f"unexpected bytes on an idle connection: {data!r}"
    return time.monotonic() - started


# -- an upstream that records when the gateway closes its connections -----------------------

class RecordingUpstream:
    """Answers every request with a small keep-alive response and records, per connection,
    when it was closed by the gateway."""

    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.closed_at: list[float] = []
        self.threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self.threads.append(accept)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self.closed_at.append(time.monotonic())
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    _, buffer = buffer.split(b"\r\n\r\n", 1)
                    conn.sendall(self.RESPONSE)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def recording_upstream():
    upstream = RecordingUpstream()
    yield upstream
    upstream.close()


# -- client side -------------------------------------------------------------------------


def test_many_requests_travel_over_one_client_connection(echo, start_gateway):
    gateway = start_gateway(echo_config(echo))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    conn.connect()
    first_socket = conn.sock
    for number in range(50):
        conn.request("GET", f"/ka/{number}")
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200
        assert json.loads(body)["target"] == f"/ka/{number}"
        assert "close" not in (response.getheader("Connection") or "").lower()
        assert not response.will_close
        assert conn.sock is first_socket, f"the gateway closed the connection after {number}"
    conn.close()


def test_idle_client_connection_is_closed_after_keepalive_timeout(echo, start_gateway):
    config = {"gateway": {"keepalive_timeout": 1}, **route_to(echo.address)}
    gateway = start_gateway(config)
    sock, reader = raw_connection(gateway)
    with sock:
        sock.sendall(b"GET /idle HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(reader).status == 200
        closed_after = wait_closed(sock, 4.0)
    assert closed_after is not None, "idle client connection still open after 4 s"
    assert 0.7 <= closed_after <= 2.5, f"closed after {closed_after:.2f} s, keepalive_timeout 1"


def test_three_pipelined_gets_get_three_responses_in_order(echo, start_gateway):
    gateway = start_gateway(echo_config(echo))
    sock, reader = raw_connection(gateway)
    with sock:
        # The first answer is the slowest, the last one is slower than the second.
        sock.sendall(b"GET /p/1?delay=0.3 HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /p/2 HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /p/3?delay=0.1 HTTP/1.1\r\nHost: a\r\n\r\n")
        targets = [json.loads(read_response(reader).body)["target"] for _ in range(3)]
        assert targets == ["/p/1?delay=0.3", "/p/2", "/p/3?delay=0.1"]
        # The connection is still usable afterwards.
        sock.sendall(b"GET /p/4 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert json.loads(read_response(reader).body)["target"] == "/p/4"


def test_pipelined_requests_with_a_body_and_a_gateway_error_stay_in_order(echo, start_gateway):
    gateway = start_gateway({"routes": [
        {"id": "r1", "uri": "/p/*", "upstream": {"nodes": {echo.address: 1}}}]})
    sock, reader = raw_connection(gateway)
    body = b"0123456789" * 1000
    with sock:
        sock.sendall(b"GET /p/1?delay=0.2 HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"POST /p/2 HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s"
                     b"GET /unrouted HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /p/4 HTTP/1.1\r\nHost: a\r\n\r\n" % (len(body), body))
        first, second, third, fourth = (read_response(reader) for _ in range(4))
    assert json.loads(first.body)["target"] == "/p/1?delay=0.2"
    posted = json.loads(second.body)
    assert (posted["method"], posted["target"], posted["body_length"]) == ("POST", "/p/2",
                                                                           len(body))
    assert third.status == 404
    assert "error_msg" in json.loads(third.body)
    assert json.loads(fourth.body)["target"] == "/p/4"


def test_http10_client_without_keepalive_gets_connection_close(echo, start_gateway):
    gateway = start_gateway(echo_config(echo))
    sock, reader = raw_connection(gateway)
    with sock:
        sock.sendall(b"GET /old HTTP/1.0\r\nHost: a\r\n\r\n")
        response = read_response(reader)
        assert response.status == 200
        assert json.loads(response.body)["target"] == "/old"
        assert "close" in (response.header("Connection") or "").lower()
        assert "chunked" not in (response.header("Transfer-Encoding") or "").lower()
        closed_after = wait_closed(sock, 2.0)
    assert closed_after is not None, "the gateway kept an HTTP/1.0 connection open"


def test_http10_client_asking_for_keepalive_keeps_its_connection(echo, start_gateway):
    gateway = start_gateway(echo_config(echo))
    sock, reader = raw_connection(gateway)
    with sock:
        for number in range(3):
            sock.sendall(b"GET /old/%d HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n"
                         % number)
            response = read_response(reader)
            assert response.status == 200
            assert json.loads(response.body)["target"] == f"/old/{number}"
            assert "keep-alive" in (response.header("Connection") or "").lower()


# -- upstream side: the keep-alive pool --------------------------------------------------


def test_sequential_requests_reuse_one_pooled_upstream_connection(echo, start_gateway):
    gateway = start_gateway(echo_config(echo))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    infos = [get_info(conn, f"/pool/{n}") for n in range(20)]
    conn.close()
    # Separate client connections share the pool too.
    for n in range(5):
        other = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
        infos.append(get_info(other, f"/pool/other/{n}"))
        other.close()
    assert {info["connection"] for info in infos} == {infos[0]["connection"]}
    assert [info["request_number"] for info in infos] == list(
        range(infos[0]["request_number"], infos[0]["request_number"] + 25))
    assert all(info["keep_alive"] for info in infos)


def test_concurrent_clients_need_no_more_upstream_connections_than_requests_in_flight(
        echo, start_gateway):
    gateway = start_gateway(echo_config(echo))

    def client(index: int) -> list[int]:
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
        ids = [get_info(conn, f"/c/{index}/{n}?delay=0.005")["connection"] for n in range(25)]
        conn.close()
        return ids

    with ThreadPoolExecutor(4) as pool:
        ids = [i for result in pool.map(client, range(4)) for i in result]
    assert len(ids) == 100
    assert len(set(ids)) <= 4, f"{len(set(ids))} upstream connections for 4 clients"


def test_http10_clients_still_share_pooled_upstream_connections(echo, start_gateway):
    gateway = start_gateway(echo_config(echo))
    seen = []
    for number in range(3):
        sock, reader = raw_connection(gateway)
        with sock:
            sock.sendall(b"GET /old/%d HTTP/1.0\r\n\r\n" % number)
            seen.append(json.loads(read_response(reader).body))
    assert len({info["connection"] for info in seen}) == 1
    assert all(info["keep_alive"] for info in seen)


def test_keepalive_pool_size_zero_opens_a_new_upstream_connection_per_request(
        echo, start_gateway):
    gateway = start_gateway(echo_config(echo, keepalive_pool={"size": 0}))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    infos = [get_info(conn, f"/nopool/{n}") for n in range(10)]
    conn.close()
    assert len({info["connection"] for info in infos}) == 10
    assert all(info["request_number"] == 1 for info in infos)


def test_keepalive_pool_requests_limit_retires_an_upstream_connection(echo, start_gateway):
    gateway = start_gateway(echo_config(echo, keepalive_pool={"requests": 3}))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    infos = [get_info(conn, f"/limited/{n}") for n in range(9)]
    conn.close()
    assert len({info["connection"] for info in infos}) == 3
    assert [info["request_number"] for info in infos] == [1, 2, 3] * 3


def test_idle_pooled_upstream_connection_is_closed_after_idle_timeout(
        recording_upstream, start_gateway):
    gateway = start_gateway({"routes": [{"id": "r1", "uri": "/*", "upstream": {
        "nodes": {recording_upstream.address: 1},
        "keepalive_pool": {"idle_timeout": 1}}}]})
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    conn.request("GET", "/one")
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"ok")
    answered = time.monotonic()
    # Still pooled shortly after: a second request reuses the connection.
    time.sleep(0.4)
    conn.request("GET", "/two")
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"ok")
    answered = time.monotonic()
    assert recording_upstream.accepted == 1
    deadline = answered + 4.0
    while not recording_upstream.closed_at and time.monotonic() < deadline:
        time.sleep(0.02)
    conn.close()
    assert recording_upstream.closed_at, "the idle upstream connection was never closed"
    idle_for = recording_upstream.closed_at[0] - answered
    # idle_timeout 1 s; timeouts run on a 0.25 s clock, so accurate to about one tick.
    assert 0.7 <= idle_for <= 2.0, f"closed after {idle_for:.2f} s idle, idle_timeout 1 s"


def test_client_leaving_mid_download_does_not_poison_the_upstream_pool(echo, start_gateway):
    gateway = start_gateway(echo_config(echo, timeout={"read": 3}))
    sock, reader = raw_connection(gateway)
    with sock:
        sock.sendall(b"GET /big?size=200000000 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert reader.readline().startswith(b"HTTP/1.1 200 ")
        reader.read(1_000_000)
    time.sleep(0.2)
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    for n in range(3):
        assert get_info(conn, f"/after/{n}")["target"] == f"/after/{n}"
    conn.close()


def test_client_leaving_mid_upload_does_not_poison_the_upstream_pool(echo, start_gateway):
    gateway = start_gateway(echo_config(echo, timeout={"read": 3}))
    sock, _ = raw_connection(gateway)
    with sock:
        sock.sendall(b"POST /partial HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n"
                     + b"p" * 1_000_000)
        time.sleep(0.3)
    time.sleep(0.2)
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    for n in range(3):
        assert get_info(conn, f"/after/{n}")["target"] == f"/after/{n}"
    conn.close()
