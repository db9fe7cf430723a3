"""Server-sent events (the WHATWG HTML "event stream" format), sans I/O.

`SseParser.feed(bytes)` returns the events completed by those bytes: an event split across
TCP reads is held until its blank line arrives, so callers parse whole events only. Lines
may end in CRLF, LF or CR (a CR at the end of one read and the LF at the start of the next
are one line ending). `encode_event` builds the bytes of one event.
"""

from __future__ import annotations

# The format sets no size limit; a provider that never ends an event must not make the
# gateway buffer without bound. Far above any event an LLM API sends (a chat chunk is
# well under 1 KiB; a whole non-streamed answer rarely passes 1 MiB).
MAX_EVENT_BYTES = 16 * 1024 * 1024

_BOM = b"\xef\xbb\xbf"


class SseError(ValueError):
    """The stream broke the format's limits (an event larger than MAX_EVENT_BYTES)."""


class SseEvent:
    """One dispatched event: `event` is "message" unless the stream named a type."""

    __slots__ = ("data", "event", "id", "retry")

    def __init__(self, data: str, event: str = "message", id: str | None = None,
                 retry: int | None = None) -> None:
        self.data = data
        self.event = event
        self.id = id
        self.retry = retry

    def __repr__(self) -> str:
        return f"SseEvent(event={self.event!r}, data={self.data!r}, id={self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SseEvent) and (self.data, self.event, self.id, self.retry) == (
            other.data, other.event, other.id, other.retry)


class SseParser:
    """Incremental parser of one event stream."""

    __slots__ = (
        "_data",
        "_event",
        "_id",
        "_pending",
        "_pending_cr",
        "_retry",
        "_size",
        "_started",
    )

    def __init__(self) -> None:
        self._pending = b""  # an incomplete line
        self._pending_cr = False  # the last read ended in CR: skip an LF starting the next
        self._started = False  # a BOM is only stripped at the very start
        self._data: list[bytes] = []
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None
        self._size = 0

    @property
    def in_event(self) -> bool:
        """True while part of an event has arrived but not its end (a cut stream)."""
        return bool(self._pending or self._data or self._event)

    def feed(self, data: bytes) -> list[SseEvent]:
        if not data:
            return []
        if self._pending_cr:
            self._pending_cr = False
            if data[:1] == b"\n":
                data = data[1:]
        if not self._started:
            buffer = self._pending + data
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._pending = buffer
                return []
            self._started = True
            if buffer.startswith(_BOM):
                buffer = buffer[len(_BOM):]
        else:
            buffer = self._pending + data if self._pending else data
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):
                self._pending_cr = True
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buffer.split(b"\n")
        self._pending = lines.pop()
        events: list[SseEvent] = []
        for line in lines:
            if not line:
                event = self._dispatch()
                if event is not None:
                    events.append(event)
                continue
            if line[0] == 0x3A:  # ":" starts a comment (keep-alive pings)
                continue
            name, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._data.append(value)
                self._size += len(value)
            elif name == b"event":
                self._event = value.decode("utf-8", "replace")
            elif name == b"id":
                if b"\x00" not in value:
                    self._id = value.decode("utf-8", "replace")
            elif name == b"retry" and value.isdigit():
                self._retry = int(value)
            # other field names are ignored, as the format says
        if self._size + len(self._pending) > MAX_EVENT_BYTES:
            raise SseError(f"event larger than {MAX_EVENT_BYTES} bytes")
        return events

    def _dispatch(self) -> SseEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        self._size = 0
        retry, self._retry = self._retry, None
        if not data:
            return None
        text = (b"\n".join(data) if len(data) > 1 else data[0]).decode("utf-8", "replace")
        return SseEvent(text, event or "message", self._id, retry)


def encode_event(data: str | bytes, event: str | None = None) -> bytes:
    """The bytes of one event: each line of `data` on its own `data:` line."""
    if isinstance(data, str):
        data = data.encode()
    head = b"event: %s\n" % event.encode() if event else b""
    if b"\n" not in data and b"\r" not in data:
        return b"%sdata: %s\n\n" % (head, data)
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return head + b"".join(b"data: %s\n" % line for line in lines) + b"\n"
