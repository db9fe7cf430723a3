"""Malformed and smuggling requests against the running gateway, over raw sockets.

Each bad request must get the gateway's own JSON error, the connection must close, and
nothing may reach the upstream: every request target carries a fresh token, and nginx's
access log must never show it.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from harness import Gateway, Nginx
from sluicegate.proto.http1 import MAX_HEADER_BYTES, MAX_HEADER_COUNT, MAX_REQUEST_LINE

# Long enough for the gateway's answer on loopback; a missing answer costs this much.
READ_TIMEOUT = 3.0


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Conversation:
    """Everything the gateway sent back on one connection."""

    raw: bytes
    closed: bool  # the gateway closed the connection cleanly (recv returned b"")
    reset: bool = False
    responses: list[RawResponse] = field(default_factory=list)

    @property
    def first(self) -> RawResponse:
        assert self.responses, f"no response; got {self.raw[:300]!r} (closed={self.closed})"
        return self.responses[0]


def parse_responses(raw: bytes) -> list[RawResponse]:
    """Split a byte stream into responses delimited by Content-Length."""
    responses = []
    rest = raw
    while rest:
        head, sep, tail = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        responses.append(RawResponse(status, headers, tail[:length]))
        rest = tail[length:]
    return responses


def converse(port: int, *parts: bytes, timeout: float = READ_TIMEOUT) -> Conversation:
    """Send `parts` (a short pause between them), then read until the gateway closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for index, part in enumerate(parts):
            if index:
                time.sleep(0.05)
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break  # the gateway already answered and closed: read what it said
        raw = b""
        closed = reset = False
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                data = sock.recv(65536)
                if not data:
                    closed = True
                    break
                raw += data
        except TimeoutError:
            pass
        except ConnectionResetError:
            reset = True
    return Conversation(raw, closed, reset, parse_responses(raw))


def token() -> str:
    return uuid.uuid4().hex[:16]


def never_reached(nginx: Nginx, *tokens: str) -> None:
    """Fail if nginx logged a request carrying any of `tokens`."""
    time.sleep(0.1)  # a forwarded request would be logged by now (loopback)
    log = nginx.access_log()
    for mark in tokens:
        assert mark not in log, f"request {mark} reached the upstream:\n{log[-2000:]}"


def assert_reached(nginx: Nginx, mark: str) -> None:
    """Wait for nginx to log the request carrying `mark` (it logs after answering)."""
    deadline = time.monotonic() + 3
    while mark not in nginx.access_log():
        assert time.monotonic() < deadline, f"request {mark} never reached the upstream"
        time.sleep(0.02)


def assert_gateway_error(conversation: Conversation, status: int) -> dict[str, str]:
    response = conversation.first
    assert response.status == status, conversation.raw[:400]
    assert "server" not in response.headers or "nginx" not in response.headers["server"], \
        "the answer came from the upstream, not the gateway"
    assert response.headers.get("content-type") == "application/json"
    payload = json.loads(response.body)
    assert isinstance(payload.get("error_msg"), str) and payload["error_msg"]
    assert response.headers.get("connection", "").lower() == "close"
    assert conversation.closed, (
        f"the gateway kept the connection open (reset={conversation.reset})")
    assert len(conversation.responses) == 1, conversation.raw[:600]
    return payload


@pytest.fixture(scope="module")
def gateway(nginx: Nginx, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    server = Gateway(tmp_path_factory.mktemp("bad-requests"), {"routes": [
        {"id": "nginx", "uri": "/*", "upstream": {"nodes": {nginx.address: 1}}},
    ]})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def echo_gateway(echo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    server = Gateway(tmp_path_factory.mktemp("bad-requests-echo"), {"routes": [
        {"id": "echo", "uri": "/*", "upstream": {"nodes": {echo.address: 1}}},
    ]})
    yield server
    server.stop()


# -- the check itself can fail -------------------------------------------------------------


def test_well_formed_request_reaches_nginx_and_is_logged(gateway, nginx):
    mark = token()
    conversation = converse(gateway.port, b"GET /status/404?t=%s HTTP/1.1\r\nHost: x\r\n"
                            b"Connection: close\r\n\r\n" % mark.encode())
    assert conversation.first.status == 404
    assert "nginx" in conversation.first.headers.get("server", "")
    assert_reached(nginx, mark)


# -- request smuggling ---------------------------------------------------------------------


@pytest.mark.parametrize("framing", [
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
], ids=["cl-te", "te-cl"])
def test_content_length_with_transfer_encoding_is_rejected_and_closes(gateway, nginx, framing):
    outer, smuggled = token(), token()
    conversation = converse(
        gateway.port,
        b"POST /?t=%s HTTP/1.1\r\nHost: x\r\n%s\r\n0\r\n\r\n"
        b"GET /status/404?t=%s HTTP/1.1\r\nHost: x\r\n\r\n"
        % (outer.encode(), framing, smuggled.encode()))
    assert_gateway_error(conversation, 400)
    never_reached(nginx, outer, smuggled)


@pytest.mark.parametrize("lengths", [
    b"Content-Length: 3\r\nContent-Length: 5\r\n",
    b"Content-Length: 5\r\nContent-Length: 3\r\n",
    b"Content-Length: 3, 5\r\n",
], ids=["3-then-5", "5-then-3", "list"])
def test_conflicting_content_lengths_are_rejected(gateway, nginx, lengths):
    mark = token()
    conversation = converse(gateway.port, b"POST /?t=%s HTTP/1.1\r\nHost: x\r\n%s\r\nabcde"
                            % (mark.encode(), lengths))
    assert_gateway_error(conversation, 400)
    never_reached(nginx, mark)


@pytest.mark.parametrize("value", [b"abc", b"-1", b"+5", b"0x10"])
def test_content_length_that_is_not_a_number_is_rejected(gateway, nginx, value):
    mark = token()
    conversation = converse(gateway.port, b"POST /?t=%s HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Length: %s\r\n\r\n" % (mark.encode(), value))
    assert_gateway_error(conversation, 400)
    never_reached(nginx, mark)


@pytest.mark.parametrize("coding", [
    b"Transfer-Encoding: chunked, identity\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
    b"Transfer-Encoding: xchunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
], ids=["list-not-ending-chunked", "two-headers", "unknown", "gzip-only"])
def test_transfer_encoding_not_ending_in_chunked_is_rejected(gateway, nginx, coding):
    outer, smuggled = token(), token()
    conversation = converse(
        gateway.port,
        b"POST /?t=%s HTTP/1.1\r\nHost: x\r\n%s\r\n0\r\n\r\n"
        b"GET /status/404?t=%s HTTP/1.1\r\nHost: x\r\n\r\n"
        % (outer.encode(), coding, smuggled.encode()))
    assert_gateway_error(conversation, 400)
    never_reached(nginx, outer, smuggled)


def test_whitespace_before_header_colon_is_rejected(gateway, nginx):
    mark = token()
    conversation = converse(gateway.port, b"POST /?t=%s HTTP/1.1\r\nHost: x\r\n"
                            b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" % mark.encode())
    assert_gateway_error(conversation, 400)
    never_reached(nginx, mark)


BAD_CHUNKS = {
    "not-hex": b"zz\r\nabc\r\n0\r\n\r\n",
    "negative": b"-1\r\nabc\r\n0\r\n\r\n",
    "overflow": b"fffffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
    "data-longer-than-size": b"3\r\nabcXX\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("body", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
def test_bad_chunk_size_is_rejected(gateway, nginx, body):
    mark = token()
    conversation = converse(gateway.port, b"POST /?t=%s HTTP/1.1\r\nHost: x\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n%s" % (mark.encode(), body))
    assert_gateway_error(conversation, 400)
    never_reached(nginx, mark)


def test_bad_chunk_size_after_head_is_answered_while_upstream_waits_for_body(echo_gateway):
    # The head arrives first (the gateway may already be proxying), the broken chunk later;
    # the echo upstream only answers a complete body, so only the gateway can answer.
    conversation = converse(echo_gateway.port,
                            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                            b"\r\n5\r\nhello\r\n", b"zz\r\nabc\r\n0\r\n\r\n")
    assert_gateway_error(conversation, 400)


def test_bad_request_after_pipelined_good_one_answers_both_then_closes(gateway, nginx):
    first, bad, after = token(), token(), token()
    conversation = converse(
        gateway.port,
        b"GET /status/404?t=%s HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /status/404?t=%s HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"
        b"GET /status/404?t=%s HTTP/1.1\r\nHost: x\r\n\r\n"
        % (first.encode(), bad.encode(), after.encode()))
    statuses = [response.status for response in conversation.responses]
    assert statuses == [404, 400], conversation.raw[:800]
    assert json.loads(conversation.responses[1].body)["error_msg"]
    assert conversation.closed
    assert_reached(nginx, first)
    never_reached(nginx, bad, after)


# -- malformed heads -----------------------------------------------------------------------


def test_obs_fold_header_is_rejected(gateway, nginx):
    mark = token()
    conversation = converse(gateway.port, b"GET /?t=%s HTTP/1.1\r\nHost: x\r\n"
                            b"X-Folded: first\r\n second\r\n\r\n" % mark.encode())
    assert_gateway_error(conversation, 400)
    never_reached(nginx, mark)


@pytest.mark.parametrize("request_bytes", [
    b"GET /?t=%s HTTP/1.1\nHost: x\n\n",
    b"GET /?t=%s HTTP/1.1\r\nHost: x\nX-After: y\r\n\r\n",
    b"GET /?t=%s HTTP/1.1\r\nHost: x\r\nX-Last: y\n\r\n",
], ids=["all-lf", "lf-after-header", "lf-before-blank-line"])
def test_bare_lf_line_endings_are_rejected(gateway, nginx, request_bytes):
    mark = token()
    conversation = converse(gateway.port, request_bytes % mark.encode())
    assert_gateway_error(conversation, 400)
    never_reached(nginx, mark)


@pytest.mark.parametrize("value", [b"a\rb", b"a\x00b"], ids=["bare-cr", "nul"])
def test_control_characters_in_header_value_are_rejected(gateway, nginx, value):
    mark = token()
    conversation = converse(gateway.port, b"GET /?t=%s HTTP/1.1\r\nHost: x\r\nX-A: %s\r\n\r\n"
                            % (mark.encode(), value))
    assert_gateway_error(conversation, 400)
    never_reached(nginx, mark)


def test_transfer_encoding_in_http10_request_is_rejected(gateway, nginx):
    mark = token()
    conversation = converse(gateway.port, b"POST /?t=%s HTTP/1.0\r\nHost: x\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % mark.encode())
    payload = assert_gateway_error(conversation, 400)
    assert "Transfer-Encoding" in payload["error_msg"]
    never_reached(nginx, mark)


def test_http11_request_without_host_is_rejected(gateway, nginx):
    mark = token()
    conversation = converse(gateway.port, b"GET /?t=%s HTTP/1.1\r\n\r\n" % mark.encode())
    payload = assert_gateway_error(conversation, 400)
    assert "Host" in payload["error_msg"]
    never_reached(nginx, mark)


def test_request_with_two_host_headers_is_rejected(gateway, nginx):
    mark = token()
    conversation = converse(gateway.port, b"GET /?t=%s HTTP/1.1\r\nHost: a.example\r\n"
                            b"Host: b.example\r\n\r\n" % mark.encode())
    payload = assert_gateway_error(conversation, 400)
    assert "Host" in payload["error_msg"]
    never_reached(nginx, mark)


def test_http10_request_without_host_is_proxied(gateway, nginx):
    # Host is optional in HTTP/1.0; the gateway must still send the upstream a valid
    # HTTP/1.1 request (nginx answers 400 to an HTTP/1.1 request without Host).
    mark = token()
    conversation = converse(gateway.port, b"GET /status/404?t=%s HTTP/1.0\r\n\r\n"
                            % mark.encode())
    assert conversation.first.status == 404, conversation.raw[:400]
    assert_reached(nginx, mark)


def test_http09_request_is_refused_by_the_gateway(gateway, nginx):
    mark = token()
    conversation = converse(gateway.port, b"GET /status/404?t=%s\r\n\r\n" % mark.encode())
    assert conversation.first.status in (400, 505), conversation.raw[:400]
    assert "nginx" not in conversation.first.headers.get("server", ""), conversation.raw[:400]
    never_reached(nginx, mark)


@pytest.mark.parametrize("version", [b"2.0", b"1.2", b"3.0"])
def test_unsupported_http_version_is_refused_by_the_gateway(gateway, nginx, version):
    mark = token()
    conversation = converse(gateway.port, b"GET /status/404?t=%s HTTP/%s\r\nHost: x\r\n\r\n"
                            % (mark.encode(), version))
    assert conversation.first.status in (400, 505), conversation.raw[:400]
    assert "nginx" not in conversation.first.headers.get("server", ""), conversation.raw[:400]
    assert conversation.closed
    never_reached(nginx, mark)


@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),
    b"HELLO WORLD\r\n\r\n",
    b"\x00" * 64 + b"\r\n\r\n",
    b"GET\r\n\r\n",
    b"G\xc3\x89T / HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["tls-client-hello", "words", "nul-bytes", "method-only", "non-ascii-method"])
def test_garbage_bytes_get_400(gateway, nginx, garbage):
    before = nginx.access_log()
    conversation = converse(gateway.port, garbage)
    assert_gateway_error(conversation, 400)
    time.sleep(0.1)
    assert nginx.access_log() == before, "garbage produced a request at the upstream"


# -- limits --------------------------------------------------------------------------------


def test_request_line_over_max_request_line_gets_414(gateway, nginx):
    mark = token()
    target = b"/%s/" % mark.encode() + b"a" * MAX_REQUEST_LINE
    conversation = converse(gateway.port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
    assert_gateway_error(conversation, 414)
    never_reached(nginx, mark)


def test_unterminated_request_line_over_max_request_line_gets_414(gateway, nginx):
    # No CRLF ever comes: the gateway must not wait for the end of the line.
    conversation = converse(gateway.port, b"GET /" + b"a" * (MAX_REQUEST_LINE * 4))
    assert_gateway_error(conversation, 414)


def test_request_line_of_8000_octets_is_proxied(gateway, nginx):
    # RFC 9112 §3 recommends supporting request lines of at least 8000 octets.
    mark = token()
    prefix = b"GET /status/404?t=%s&pad=" % mark.encode()
    suffix = b" HTTP/1.1"
    pad = b"p" * (8000 - len(prefix) - len(suffix))
    conversation = converse(gateway.port, prefix + pad + suffix +
                            b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert conversation.first.status == 404, conversation.raw[:400]
    assert_reached(nginx, mark)


def test_headers_over_max_header_bytes_get_431(gateway, nginx):
    mark = token()
    count = MAX_HEADER_COUNT // 2
    value = b"v" * (MAX_HEADER_BYTES // count + 16)
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (index, value) for index in range(count))
    conversation = converse(gateway.port, b"GET /?t=%s HTTP/1.1\r\nHost: x\r\n%s\r\n"
                            % (mark.encode(), headers))
    assert_gateway_error(conversation, 431)
    never_reached(nginx, mark)


def test_single_header_over_max_header_bytes_gets_431(gateway, nginx):
    mark = token()
    conversation = converse(gateway.port, b"GET /?t=%s HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n"
                            % (mark.encode(), b"v" * (MAX_HEADER_BYTES + 1)))
    assert_gateway_error(conversation, 431)
    never_reached(nginx, mark)


def test_unterminated_header_over_max_header_bytes_gets_431(gateway, nginx):
    # A header line that never ends must not be buffered without bound: once it passes
    # the limit the gateway answers, without waiting for a CRLF that never comes.
    mark = token()
    conversation = converse(gateway.port, b"GET /?t=%s HTTP/1.1\r\nHost: x\r\nX-Big: %s"
                            % (mark.encode(), b"v" * (MAX_HEADER_BYTES * 4)))
    assert_gateway_error(conversation, 431)
    never_reached(nginx, mark)


def test_more_than_max_header_count_headers_get_431(gateway, nginx):
    mark = token()
    # Host + MAX_HEADER_COUNT more: one over the limit.
    headers = b"".join(b"X-H%d: v\r\n" % index for index in range(MAX_HEADER_COUNT))
    conversation = converse(gateway.port, b"GET /?t=%s HTTP/1.1\r\nHost: x\r\n%s\r\n"
                            % (mark.encode(), headers))
    assert_gateway_error(conversation, 431)
    never_reached(nginx, mark)


def test_exactly_max_header_count_headers_are_proxied(gateway, nginx):
    mark = token()
    # Host + Connection + the rest: exactly MAX_HEADER_COUNT headers.
    headers = b"".join(b"X-H%d: v\r\n" % index for index in range(MAX_HEADER_COUNT - 2))
    conversation = converse(gateway.port, b"GET /status/404?t=%s HTTP/1.1\r\nHost: x\r\n"
                            b"Connection: close\r\n%s\r\n" % (mark.encode(), headers))
    assert conversation.first.status == 404, conversation.raw[:400]
    assert_reached(nginx, mark)


def test_gateway_keeps_serving_after_bad_requests(gateway):
    for _ in range(3):
        assert_gateway_error(converse(gateway.port, b"\x00\x01\x02\r\n\r\n"), 400)
    conversation = converse(gateway.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close"
                            b"\r\n\r\n")
    assert conversation.first.status == 200
    assert conversation.first.body == Nginx.BODY.encode()
    assert gateway.process.poll() is None
