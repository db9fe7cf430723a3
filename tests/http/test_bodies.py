"""Request and response bodies through the gateway: streamed both ways with backpressure
(1 GiB each way with flat gateway memory), every framing (Content-Length, chunked,
close-delimited), bodiless responses (HEAD, 204, 304) and `Expect: 100-continue`."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import select
import signal
import socket
import threading
import time

import pytest

from harness import EchoUpstream

TIMEOUT = 10.0
GIB = 1 << 30
BLOCK = 1 << 20
# What the gateway may add to its resident memory while moving 1 GiB.
RSS_GROWTH_LIMIT = 20 * 1024 * 1024
# How long one side stops taking data during a big transfer: without backpressure the
# gateway would buffer hundreds of MB meanwhile.
STALL_SECONDS = 1.5


def echo_route(echo, uri: str = "/*", **upstream) -> dict:
    return {"routes": [{"id": "r1", "uri": uri,
                        "upstream": {"nodes": {echo.address: 1}, **upstream}}]}


# -- memory of the gateway process -------------------------------------------------------

def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssWatch:
    """Samples a process's resident memory on a thread; `growth` is peak minus start."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.peak = rss_bytes(pid)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))
        return self.peak - self.start


@pytest.fixture(scope="module")
def big_echo():
    """An echo upstream of its own: the upload test freezes it (SIGSTOP) for a while."""
    server = EchoUpstream(name="big")
    yield server
    os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


# -- raw HTTP/1.x reading ----------------------------------------------------------------

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
            size_line = reader.readline()
            if not size_line:
                raise EOFError("connection closed inside a chunked body")
            size = int(size_line.split(b";")[0], 16)
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


# -- 1 GiB each way ----------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_1gib_upload_streams_to_the_upstream_with_flat_gateway_memory(
        big_echo, start_gateway, framing):
    gateway = start_gateway(echo_route(big_echo))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    conn.request("POST", "/warm-up", body=b"x" * 100_000)
    assert conn.getresponse().read()
    watch = RssWatch(gateway.process.pid)
    base = random.Random(1).randbytes(BLOCK)
    digest = hashlib.sha256()
    upstream_pid = big_echo.process.pid
    resume = threading.Timer(STALL_SECONDS, os.kill, (upstream_pid, signal.SIGCONT))

    def blocks():
        for index in range(GIB // BLOCK):
            block = index.to_bytes(8, "big") + base[8:]
            digest.update(block)
            if index == 64:  # the upstream stops reading for a while
                os.kill(upstream_pid, signal.SIGSTOP)
                resume.start()
            yield block

    headers = {"Content-Length": str(GIB)} if framing == "content-length" else {}
    try:
        conn.request("POST", "/upload", body=blocks(), headers=headers)
        response = conn.getresponse()
        body = response.read()
    finally:
        resume.cancel()
        os.kill(upstream_pid, signal.SIGCONT)
        growth = watch.stop()
        conn.close()
    assert response.status == 200, body[:500]
    info = json.loads(body)
    received = {name.lower(): value for name, value in info["headers"]}
    if framing == "chunked":
        assert received.get("transfer-encoding") == "chunked"
    else:
        assert received.get("content-length") == str(GIB)
    assert info["body_length"] == GIB
    assert info["body_sha256"] == digest.hexdigest()
    assert growth <= RSS_GROWTH_LIMIT, f"gateway RSS grew by {growth / 2**20:.1f} MiB"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_1gib_download_streams_to_the_client_with_flat_gateway_memory(
        big_echo, start_gateway, framing):
    gateway = start_gateway(echo_route(big_echo))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    conn.request("GET", "/warm-up?size=100000")
    assert len(conn.getresponse().read()) == 100_000
    watch = RssWatch(gateway.process.pid)
    query = f"size={GIB}" + ("&chunked=1" if framing == "chunked" else "")
    total = 0
    all_x = True
    try:
        conn.request("GET", f"/download?{query}")
        response = conn.getresponse()
        assert response.status == 200
        if framing == "chunked":
            assert response.getheader("Transfer-Encoding") == "chunked"
        else:
            assert response.getheader("Content-Length") == str(GIB)
        while True:
            piece = response.read(BLOCK)
            if not piece:
                break
            total += len(piece)
            all_x = all_x and piece.count(b"x") == len(piece)
            if total == 64 * BLOCK:  # the client stops reading for a while
                time.sleep(STALL_SECONDS)
    finally:
        growth = watch.stop()
        conn.close()
    assert total == GIB
    assert all_x, "the body is not what the upstream sent"
    assert growth <= RSS_GROWTH_LIMIT, f"gateway RSS grew by {growth / 2**20:.1f} MiB"


# -- request body framings ---------------------------------------------------------------


def test_chunked_request_body_reaches_the_upstream_intact(echo, start_gateway):
    gateway = start_gateway(echo_route(echo))
    pieces = [b"a", b"hello world", bytes(range(256)) * 40, b"\r\n0\r\n\r\n", b"z" * 70000]
    body = b"".join(pieces)
    wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces[:2])
    wire += b"%x;name=value\r\n%s\r\n" % (len(pieces[2]), pieces[2])  # a chunk extension
    wire += b"".join(b"%X\r\n%s\r\n" % (len(p), p) for p in pieces[3:])
    wire += b"0\r\nX-Trailer: ignored\r\n\r\n"
    sock, reader = raw_connection(gateway)
    with sock:
        sock.sendall(b"POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        # Sent in uneven slices, as a slow client would.
        for start in range(0, len(wire), 7919):
            sock.sendall(wire[start:start + 7919])
        response = read_response(reader)
        assert response.status == 200
        info = json.loads(response.body)
        # The connection is usable for the next request.
        sock.sendall(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        assert json.loads(read_response(reader).body)["target"] == "/after"
    assert info["body_length"] == len(body)
    assert info["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_content_length_request_body_reaches_the_upstream_intact(echo, start_gateway):
    gateway = start_gateway(echo_route(echo))
    body = random.Random(2).randbytes(3_000_001)
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    conn.request("PUT", "/put", body=body)
    response = conn.getresponse()
    info = json.loads(response.read())
    conn.close()
    assert (info["method"], info["body_length"]) == ("PUT", len(body))
    assert info["body_sha256"] == hashlib.sha256(body).hexdigest()


# -- response body framings --------------------------------------------------------------


@pytest.mark.parametrize("size", [None, 3_000_000], ids=["json", "3MB"])
def test_close_delimited_response_reaches_http11_client_rechunked(echo, start_gateway, size):
    gateway = start_gateway(echo_route(echo))
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    query = "close=1" + (f"&size={size}" if size else "")
    conn.request("GET", f"/until-close?{query}")
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Transfer-Encoding") == "chunked"
    body = response.read()
    if size:
        assert len(body) == size and body.count(b"x") == size
    else:
        assert json.loads(body)["target"] == f"/until-close?{query}"
    # Re-framed, the answer did not cost the client its connection.
    sock = conn.sock
    conn.request("GET", "/next")
    response = conn.getresponse()
    assert json.loads(response.read())["target"] == "/next"
    assert conn.sock is sock
    conn.close()


def test_chunked_response_reaches_http10_client_delimited_by_close(echo, start_gateway):
    gateway = start_gateway(echo_route(echo))
    sock, reader = raw_connection(gateway)
    with sock:
        sock.sendall(b"GET /old?chunked=1&size=200000 HTTP/1.0\r\nHost: a\r\n\r\n")
        response = read_response(reader)
    assert response.status == 200
    assert response.header("Transfer-Encoding") is None
    assert response.body == b"x" * 200_000


@pytest.mark.parametrize("query", ["", "?chunked=1", "?size=100000", "?close=1"],
                         ids=["json", "chunked", "sized", "until-close"])
def test_head_response_has_no_body_and_the_connection_stays_usable(echo, start_gateway,
                                                                   query):
    gateway = start_gateway(echo_route(echo))
    sock, reader = raw_connection(gateway)
    with sock:
        sock.sendall(b"HEAD /head%s HTTP/1.1\r\nHost: a\r\n\r\n" % query.encode())
        head = read_response(reader, "HEAD")
        assert head.status == 200
        if query == "?size=100000":
            assert head.header("Content-Length") == "100000"
        # Any body bytes after the HEAD answer would garble the next response.
        sock.sendall(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        response = read_response(reader)
        assert response.status == 200
        assert json.loads(response.body)["target"] == "/next"


def test_head_to_nginx_has_the_length_and_no_body(nginx, start_gateway):
    gateway = start_gateway(echo_route(nginx, uri="/"))
    sock, reader = raw_connection(gateway)
    with sock:
        for _ in range(2):
            sock.sendall(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
            head = read_response(reader, "HEAD")
            assert (head.status, head.header("Content-Length")) == (200, str(len(nginx.BODY)))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(reader).body.decode() == nginx.BODY


@pytest.mark.parametrize("upstream", ["echo", "echo-chunked", "nginx"])
def test_204_and_304_responses_have_no_body(echo, nginx, start_gateway, upstream):
    server = nginx if upstream == "nginx" else echo
    gateway = start_gateway(echo_route(server))
    sock, reader = raw_connection(gateway)
    with sock:
        for status in (204, 304):
            path = {"echo": f"/?status={status}", "echo-chunked": f"/?status={status}&chunked=1",
                    "nginx": f"/status/{status}"}[upstream]
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path.encode())
            response = read_response(reader)
            assert response.status == status
            assert response.header("Transfer-Encoding") is None
            # Any body bytes after the bodiless answer would garble the next response.
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            after = read_response(reader)
            assert after.status == 200
            assert after.body


# -- Expect: 100-continue ----------------------------------------------------------------


def test_expect_100_continue_upload_reaches_the_upstream(echo, start_gateway):
    gateway = start_gateway(echo_route(echo))
    body = random.Random(3).randbytes(200_000)
    sock, reader = raw_connection(gateway)
    with sock:
        sock.sendall(b"POST /expect HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n"
                     b"Expect: 100-continue\r\n\r\n" % len(body))
        # Like curl: wait up to 1 s for "100 Continue", then send the body anyway.
        if select.select([sock], [], [], 1.0)[0]:
            first = read_response(reader)
            assert first.status == 100, "final answer before the body was sent"
        sock.sendall(body)
        response = read_response(reader)
        if response.status == 100:
            response = read_response(reader)
    assert response.status == 200
    info = json.loads(response.body)
    assert info["body_length"] == len(body)
    assert info["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_expect_100_continue_client_gets_the_interim_answer_before_sending(nginx,
                                                                          start_gateway):
    gateway = start_gateway({"routes": [{"id": "r1", "uri": "/",
                                         "upstream": {"nodes": {nginx.address: 1}}}]})
    sock, reader = raw_connection(gateway)
    with sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        sock.settimeout(1.0)
        interim = read_response(reader)
        assert interim.status == 100
        sock.settimeout(TIMEOUT)
        sock.sendall(b"hello")
        final = read_response(reader)
    assert final.status == 200
    assert final.body.decode() == nginx.BODY


def test_expect_100_continue_to_no_route_gets_the_final_answer_without_the_body(
        echo, start_gateway):
    gateway = start_gateway(echo_route(echo, uri="/only"))
    sock, reader = raw_connection(gateway)
    with sock:
        sock.sendall(b"POST /elsewhere HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        sock.settimeout(1.0)
        response = read_response(reader)
    assert response.status == 404
    # The body was never sent, so the connection cannot carry another request.
    assert "close" in (response.header("Connection") or "").lower()
