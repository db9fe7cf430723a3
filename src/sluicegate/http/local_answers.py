"""Answers the gateway makes itself, as part of `Exchange` (http/exchange.py): a whole
`Response` from a plugin or an error (404, 502, 504...), and a plugin's `LocalHandler`
serving the request and streaming its answer (send_head / send_body / end_body).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from sluicegate.plugins.base import LocalHandler, Response
from sluicegate.proto.http1 import (
    CHUNKED,
    UNTIL_CLOSE,
    encode_headers,
    error_body,
    status_line,
)

__all__ = ["LocalAnswers"]

log = logging.getLogger("sluicegate.http")


class LocalAnswers:
    """`Exchange`'s answers made in the gateway (its slots hold the state)."""

    __slots__ = ()

    def serve_locally(self, handler: LocalHandler) -> None:
        self.handler = handler
        # Body bytes may have arrived (and reading paused) while hooks ran.
        self.client.resume_reading_for(self.client.PAUSE_BODY)
        if self.body_buffered > handler.max_body:
            self.respond_error(413, "request body too large")
        elif self.request_complete:
            self.start_local_handler()

    def start_local_handler(self) -> None:
        parts = self.body_parts
        if self.request_chunked:  # request_body() framed each piece as a chunk: unframe
            parts = [part[part.index(b"\r\n") + 2:-2] for part in parts]
        body = b"".join(parts)
        self.body_parts = []
        self.body_buffered = 0
        self.pending = asyncio.ensure_future(self.handler.serve(body, self))  # type: ignore
        self.pending.add_done_callback(self._local_handler_done)

    def _local_handler_done(self, task: asyncio.Future[Any]) -> None:
        self.pending = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("plugin handler failed", exc_info=exc)
        if self.finished:
            return
        if not self.head_sent:
            self.respond_error(500, "plugin error")
        elif exc is not None:
            self.client.abort()
            self.finish()
        else:
            self.end_body()

    def send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Start a streamed answer: chunked on HTTP/1.1, else delimited by closing."""
        ctx = self.ctx
        ctx.response_status = status
        ctx.response_headers = list(headers)
        ctx.merge_added_headers()
        if self.chain.needs_headers:
            self.run_header_filters()
            self.body_filtered = bool(self.chain.body_filter)
            ctx.set_response_header("Content-Length", None)
        if ctx.version == "1.1":
            self.mode = CHUNKED
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            self.mode = UNTIL_CLOSE
            self.keep_alive = False
            framing = b""
        self.client.out.append(b"".join((
            status_line(ctx.response_status), encode_headers(ctx.response_headers), framing,
            self.client.connection_header(self), b"\r\n")))
        self.head_sent = True
        self.client.flush()

    def send_body(self, data: bytes) -> None:
        if self.finished:
            return
        self.response_body(data)
        self.client.flush()

    def end_body(self) -> None:
        if self.finished:
            return
        self.end_framing()
        self.client.flush()
        self.finish()

    # -- answers made by the gateway ---------------------------------------------------
    def respond_error(self, status: int, reason: str, message: str | None = None) -> None:
        body = json.dumps({"error_msg": message}).encode() if message else \
            error_body(status, reason)
        self.respond(Response(status, body, [("Content-Type", "application/json")]))

    def respond(self, response: Response) -> None:
        if self.finished:
            return
        if self.head_sent:
            self.client.abort()
            self.finish()
            return
        self.release_upstream(False)
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        ctx = self.ctx
        ctx.response_status = response.status
        ctx.response_headers = list(response.headers)
        ctx.merge_added_headers()
        body = response.body
        if self.chain.needs_headers:
            self.run_header_filters()
            if self.chain.body_filter:
                body = self.filter_body(body, True)
        if not self.request_complete and self.body_expected:
            self.keep_alive = False  # unread request body: the connection cannot be reused
        ctx.bytes_sent += len(body)
        self.client.out.append(b"".join((
            status_line(ctx.response_status), encode_headers(ctx.response_headers),
            b"Content-Length: %d\r\n" % len(body), self.client.connection_header(self), b"\r\n",
            b"" if self.is_head else body)))
        self.head_sent = True
        self.client.flush()
        self.finish()
