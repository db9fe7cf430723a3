"""HTTP/1.1 message rules (RFC 9110, RFC 9112) as data and pure functions; no sockets.

httptools (llhttp, strict mode) already rejects the classic smuggling vectors: Content-Length
with Transfer-Encoding, any duplicate Content-Length, bad chunk sizes, obs-fold, bare LF,
whitespace before the colon, and a Transfer-Encoding whose final coding is not chunked.
What it accepts and we refuse is checked here.
"""

from __future__ import annotations

import json
from http import HTTPStatus

# nginx's large_client_header_buffers is 4 x 8 KiB; RFC 9112 §3 asks to accept request
# lines of at least 8000 octets.
MAX_REQUEST_LINE = 8192
# Total size of all header lines; beyond it: 431 (RFC 6585 §5).
MAX_HEADER_BYTES = 32768
# h11 and Node.js cap the header count near 100; a longer list is an attack, not a client.
MAX_HEADER_COUNT = 100
# Bound on a whole request head as it is buffered (request line + headers + line ends).
MAX_HEAD_BYTES = MAX_REQUEST_LINE + MAX_HEADER_BYTES + 1024

# Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy-specific ones clients still send.
# They describe one connection and are never forwarded as received.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade",
})
# Request headers the gateway sets itself (X-Forwarded-For is appended to, not replaced).
GATEWAY_SET = frozenset({b"host", b"x-real-ip", b"x-forwarded-proto", b"x-forwarded-host",
                         b"x-forwarded-for"})
# Headers looked at while parsing a request: hop-by-hop ones and those we set.
REQUEST_SPECIAL = HOP_BY_HOP | GATEWAY_SET | {b"content-length"}
# Response headers we drop and re-frame (Content-Length is kept when the body is unchanged).
RESPONSE_DROP = HOP_BY_HOP

# Status codes whose responses have no body (RFC 9110 §6.4.1).
NO_BODY_STATUS = frozenset({204, 304})


class RequestRejected(Exception):
    """A request that must be answered with an error and the connection closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_request_framing(version: str, has_transfer_encoding: bool, host_count: int) -> None:
    """Raise RequestRejected for framing llhttp lets through."""
    if version not in ("1.0", "1.1"):
        raise RequestRejected(505 if version[:1] not in ("0", "") else 400,
                              f"HTTP/{version} is not supported")
    if has_transfer_encoding and version == "1.0":
        # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty.
        raise RequestRejected(400, "Transfer-Encoding in an HTTP/1.0 request")
    if host_count > 1:
        raise RequestRejected(400, "more than one Host header")  # RFC 9112 §3.2
    if host_count == 0 and version == "1.1":
        raise RequestRejected(400, "missing Host header")  # RFC 9112 §3.2


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason_phrase(code))
                for code in (s.value for s in HTTPStatus)}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"error_msg": f"{status} {HTTPStatus(status).phrase}: {message}"
                       if message else f"{status} {HTTPStatus(status).phrase}"}).encode()


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1); empty data is no chunk at all (a
    zero-size chunk would end the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


LAST_CHUNK = b"0\r\n\r\n"

# How a response body is framed towards the client: as the upstream framed it (its
# Content-Length), chunked by the gateway, ended by closing the connection, or no body.
RAW, CHUNKED, UNTIL_CLOSE, NONE = 0, 1, 2, 3


def encode_headers(headers: list[tuple[str, str]]) -> bytes:
    return b"".join(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))
                    for name, value in headers)


def is_safe_header_value(value: str) -> bool:
    """Header values a plugin sets must not inject lines (CR/LF/NUL)."""
    return not any(c in value for c in "\r\n\x00")
