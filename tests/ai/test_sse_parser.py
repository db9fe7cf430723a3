"""proto/sse.py: bytes in, whole events out, however the bytes are split."""

from __future__ import annotations

import pytest

from sluicegate.proto.sse import MAX_EVENT_BYTES, SseError, SseEvent, SseParser, encode_event

OPENAI_STREAM = (
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hi \xc3\xa9t\xc3\xa9"}}]}\n\n'
    b": keep-alive comment\n\n"
    b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":5}}\n\n'
    b"data: [DONE]\n\n"
)

ANTHROPIC_STREAM = (
    b'event: message_start\ndata: {"type":"message_start"}\n\n'
    b'event: ping\ndata: {"type": "ping"}\n\n'
    b"event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\"}\r\n\r\n"
    b'event: message_stop\rdata: {"type":"message_stop"}\r\r'
)


def parse_in_pieces(data: bytes, cut: int) -> list[SseEvent]:
    parser = SseParser()
    return parser.feed(data[:cut]) + parser.feed(data[cut:])


@pytest.mark.parametrize("stream", [OPENAI_STREAM, ANTHROPIC_STREAM], ids=["openai",
                                                                            "anthropic"])
def test_sse_split_at_every_byte_gives_the_same_events(stream):
    whole = SseParser().feed(stream)
    assert len(whole) == 4
    for cut in range(len(stream) + 1):
        assert parse_in_pieces(stream, cut) == whole, cut


def test_sse_fed_one_byte_at_a_time_gives_the_same_events():
    parser = SseParser()
    events = []
    for index in range(len(ANTHROPIC_STREAM)):
        events += parser.feed(ANTHROPIC_STREAM[index:index + 1])
    assert [event.event for event in events] == ["message_start", "ping",
                                                 "content_block_delta", "message_stop"]


def test_sse_events_carry_type_data_and_utf8_text():
    events = SseParser().feed(OPENAI_STREAM)
    assert events[0].event == "message"
    assert "Hi été" in events[1].data
    assert events[-1].data == "[DONE]"


def test_sse_joins_data_lines_and_skips_comments_and_empty_events():
    events = SseParser().feed(b": hello\n\nevent: x\n\ndata: a\ndata:b\nid: 7\nretry: 30\n\n")
    assert events == [SseEvent("a\nb", "message", "7", 30)]


def test_sse_ignores_a_leading_bom_even_when_split():
    parser = SseParser()
    assert parser.feed(b"\xef\xbb") == []
    assert parser.feed(b"\xbfdata: x\n\n") == [SseEvent("x")]


def test_sse_unfinished_event_is_not_dispatched_and_is_reported():
    parser = SseParser()
    assert parser.feed(b"data: partial") == []
    assert parser.in_event


def test_sse_refuses_an_endless_event():
    parser = SseParser()
    with pytest.raises(SseError):
        parser.feed(b"data: " + b"x" * (MAX_EVENT_BYTES + 1))


def test_sse_encode_event_round_trips():
    data = encode_event("line one\nline two", "message_delta")
    assert SseParser().feed(data) == [SseEvent("line one\nline two", "message_delta")]
    assert encode_event(b'{"a":1}') == b'data: {"a":1}\n\n'
