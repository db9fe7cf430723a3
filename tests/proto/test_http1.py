"""The sans-I/O HTTP/1.1 rules in proto/http1.py, fed plain values: no sockets."""

import json

import pytest

from sluicegate.proto.http1 import (
    HOP_BY_HOP,
    LAST_CHUNK,
    MAX_HEADER_BYTES,
    MAX_HEADER_COUNT,
    MAX_REQUEST_LINE,
    RequestRejected,
    check_request_framing,
    chunk,
    encode_headers,
    error_body,
    is_safe_header_value,
    status_line,
)

# -- check_request_framing -----------------------------------------------------------------


def test_framing_accepts_http11_request_with_one_host():
    check_request_framing("1.1", False, 1)


def test_framing_accepts_chunked_http11_request():
    check_request_framing("1.1", True, 1)


def test_framing_accepts_http10_request_without_host():
    # Host is only mandatory from HTTP/1.1 on (RFC 9112 §3.2).
    check_request_framing("1.0", False, 0)


def test_framing_rejects_transfer_encoding_in_http10():
    with pytest.raises(RequestRejected) as caught:
        check_request_framing("1.0", True, 1)
    assert caught.value.status == 400
    assert "Transfer-Encoding" in caught.value.reason


def test_framing_rejects_http11_request_without_host():
    with pytest.raises(RequestRejected) as caught:
        check_request_framing("1.1", False, 0)
    assert caught.value.status == 400
    assert "Host" in caught.value.reason


@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("host_count", [2, 3])
def test_framing_rejects_more_than_one_host_header(version, host_count):
    with pytest.raises(RequestRejected) as caught:
        check_request_framing(version, False, host_count)
    assert caught.value.status == 400
    assert "Host" in caught.value.reason


@pytest.mark.parametrize(("version", "status"), [("2.0", 505), ("3.0", 505), ("0.9", 400)])
def test_framing_refuses_versions_other_than_http10_and_http11(version, status):
    with pytest.raises(RequestRejected) as caught:
        check_request_framing(version, False, 1)
    assert caught.value.status == status
    assert version in caught.value.reason


def test_request_rejected_carries_status_and_reason_as_message():
    error = RequestRejected(431, "request headers too large")
    assert (error.status, error.reason) == (431, "request headers too large")
    assert str(error) == "request headers too large"


# -- chunk ---------------------------------------------------------------------------------


def test_chunk_frames_data_with_hex_size_and_crlf():
    assert chunk(b"hello") == b"5\r\nhello\r\n"


def test_chunk_size_is_lowercase_hex_without_padding():
    assert chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert chunk(b"x" * 4096).startswith(b"1000\r\n")


def test_chunk_keeps_crlf_inside_data_untouched():
    data = b"a\r\n0\r\n\r\nb"
    assert chunk(data) == b"9\r\n" + data + b"\r\n"


def test_chunk_of_empty_data_does_not_end_the_body():
    # A zero-size chunk is the last-chunk (RFC 9112 §7.1): emitting it for empty data would
    # end a streamed body early. Empty data must encode to nothing (or be refused).
    try:
        encoded = chunk(b"")
    except ValueError:
        return
    assert encoded != LAST_CHUNK
    assert encoded == b""


def test_last_chunk_ends_a_chunked_body_without_trailers():
    assert LAST_CHUNK == b"0\r\n\r\n"


# -- status_line ---------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "line"), [
    (200, b"HTTP/1.1 200 OK\r\n"),
    (404, b"HTTP/1.1 404 Not Found\r\n"),
    (400, b"HTTP/1.1 400 Bad Request\r\n"),
    (431, b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
    (502, b"HTTP/1.1 502 Bad Gateway\r\n"),
    (504, b"HTTP/1.1 504 Gateway Timeout\r\n"),
])
def test_status_line_has_version_code_and_reason(status, line):
    assert status_line(status) == line


@pytest.mark.parametrize("status", [299, 599, 999])
def test_status_line_for_nonstandard_code_is_still_well_formed(status):
    line = status_line(status)
    assert line.startswith(b"HTTP/1.1 %d " % status)
    assert line.endswith(b"\r\n")
    assert line.count(b"\r\n") == 1


# -- error_body ----------------------------------------------------------------------------


def test_error_body_is_json_with_status_phrase_and_message():
    payload = json.loads(error_body(400, "missing Host header"))
    assert payload == {"error_msg": "400 Bad Request: missing Host header"}


def test_error_body_without_message_has_only_status_and_phrase():
    payload = json.loads(error_body(502, ""))
    assert payload == {"error_msg": "502 Bad Gateway"}


def test_error_body_escapes_quotes_and_control_characters():
    message = 'bad "value"\r\nInjected: yes\x00'
    body = error_body(400, message)
    assert b"\r\n" not in body
    assert json.loads(body)["error_msg"] == f"400 Bad Request: {message}"


# -- headers -------------------------------------------------------------------------------


def test_encode_headers_writes_one_crlf_line_per_header_in_order():
    assert encode_headers([("X-A", "1"), ("X-B", "two words"), ("X-A", "3")]) == \
        b"X-A: 1\r\nX-B: two words\r\nX-A: 3\r\n"


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\x00b"])
def test_header_value_with_line_break_or_nul_is_unsafe(value):
    assert not is_safe_header_value(value)


@pytest.mark.parametrize("value", ["", "plain", "with spaces\tand tab", "ünïcode"])
def test_ordinary_header_value_is_safe(value):
    assert is_safe_header_value(value)


def test_connection_scoped_headers_are_hop_by_hop():
    for name in (b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding",
                 b"upgrade", b"proxy-connection"):
        assert name in HOP_BY_HOP
    assert b"content-length" not in HOP_BY_HOP
    assert b"host" not in HOP_BY_HOP


# -- limits --------------------------------------------------------------------------------


def test_limits_accept_what_rfc_9112_asks_servers_to_accept():
    assert MAX_REQUEST_LINE >= 8000  # RFC 9112 §3: at least 8000 octets of request line
    assert MAX_HEADER_BYTES >= 8192
    assert 50 <= MAX_HEADER_COUNT <= 1000
