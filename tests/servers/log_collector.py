"""A log collector for http-logger tests: an HTTP server on loopback (in a thread of the test
process) that records every POST it gets and answers as told.

    collector = LogCollector()          # listening on collector.port
    collector.fail_next(2, status=500)  # the next two POSTs get 500, then 200 again
    collector.stall = True              # hold POSTs unanswered (until stall is cleared)
    collector.stop(); collector.start() # down, then back on the same port
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Post:
    """One POST as received."""

    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    status: int  # what the collector answered

    def entries(self) -> list[dict[str, Any]]:
        """The log entries of the batch, for either concat_method."""
        text = self.body.decode()
        if self.headers.get("content-type", "").startswith("application/json"):
            data = json.loads(text)
            return data if isinstance(data, list) else [data]
        return [json.loads(line) for line in text.split("\n") if line]


class LogCollector:
    def __init__(self, port: int = 0) -> None:
        self.posts: list[Post] = []
        self.stall = False
        self._failures: list[int] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self.port = port
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/logs"

    def start(self) -> None:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with collector._lock:
                    collector._connections.add(self.connection)

            def finish(self) -> None:
                super().finish()
                with collector._lock:
                    collector._connections.discard(self.connection)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                while collector.stall:
                    if collector._server is not self.server:
                        return  # stopped while holding this POST: never answer it
                    time.sleep(0.02)
                with collector._lock:
                    status = collector._failures.pop(0) if collector._failures else 200
                    collector.posts.append(Post(self.path, {k.lower(): v for k, v in
                                                            self.headers.items()},
                                                body, status))
                    collector._changed.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet test output

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        # Kept-alive connections too: a stopped collector answers nothing.
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def fail_next(self, count: int, status: int = 500) -> None:
        with self._lock:
            self._failures += [status] * count

    def entries(self, accepted_only: bool = True) -> list[dict[str, Any]]:
        with self._lock:
            posts = list(self.posts)
        return [entry for post in posts if not accepted_only or post.status == 200
                for entry in post.entries()]

    def wait_for_entries(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Block until `count` accepted entries arrived (or fail with what did)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [e for p in self.posts if p.status == 200 for e in p.entries()]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(found)} of {count} entries after {timeout}s: "
                                         f"{self.posts}")
                self._changed.wait(left)
