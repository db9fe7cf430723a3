"""A test upstream that describes each request it receives, with knobs for failure cases.

    python echo_upstream.py --port 18000 [--name a] [--ws-port 18001]

Every response is JSON: name, method, target, headers ([name, value] as received),
body_length, body_sha256, connection (an id per TCP connection) and request_number (on that
connection). Query knobs: status=N, delay=S (before the response head), size=N (a body of N
bytes instead of the JSON, streamed with backpressure), chunked=1 (chunked response),
close=1 (HTTP/1.0-style body delimited by closing), drop=1 (close without answering),
header=Name:Value (extra response header). With --ws-port, a WebSocket echo server listens
there too (the `websockets` package).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
from urllib.parse import parse_qs, urlsplit

import httptools

CONNECTIONS = itertools.count(1)
CHUNK = b"x" * 65536


class EchoProtocol(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.parser = httptools.HttpRequestParser(self)
        self.connection = next(CONNECTIONS)
        self.requests = 0
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers: list[list[str]] = []
        self.body = hashlib.sha256()
        self.body_length = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append([name.decode("latin-1"), value.decode("latin-1")])

    def on_body(self, body: bytes) -> None:
        self.body.update(body)
        self.body_length += len(body)

    def on_message_complete(self) -> None:
        self.requests += 1
        info = {"name": self.name, "method": self.parser.get_method().decode(),
                "target": self.url.decode("latin-1"), "headers": self.headers,
                "body_length": self.body_length, "body_sha256": self.body.hexdigest(),
                "connection": self.connection, "request_number": self.requests,
                "keep_alive": self.parser.should_keep_alive()}
        task = asyncio.get_running_loop().create_task(self.respond(info))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def respond(self, info: dict) -> None:
        query = parse_qs(urlsplit(info["target"]).query)
        knob = {key: values[0] for key, values in query.items()}
        transport = self.transport
        if "drop" in knob:
            transport.close()
            return
        if "delay" in knob:
            await asyncio.sleep(float(knob["delay"]))
        status = int(knob.get("status", 200))
        extra = ""
        if "header" in knob:
            extra = knob["header"].replace(":", ": ", 1) + "\r\n"
        size = int(knob["size"]) if "size" in knob else None
        body = json.dumps(info).encode() if size is None else None
        length = size if size is not None else len(body)
        if "close" in knob:
            framing = "Connection: close\r\n"
        elif "chunked" in knob:
            framing = "Transfer-Encoding: chunked\r\n"
        else:
            framing = f"Content-Length: {length}\r\n"
        head = (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{framing}{extra}"
                "\r\n").encode()
        transport.write(head)
        if info["method"] != "HEAD" and status not in (204, 304):
            if body is not None:
                transport.write(self.frame(body, knob))
            else:
                left = size
                while left > 0:
                    piece = CHUNK[:min(left, len(CHUNK))]
                    left -= len(piece)
                    await self.can_write.wait()
                    transport.write(self.frame(piece, knob))
            if "chunked" in knob:
                transport.write(b"0\r\n\r\n")
        if "close" in knob or not info["keep_alive"]:
            transport.close()

    @staticmethod
    def frame(data: bytes, knob: dict) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data) if "chunked" in knob else data


async def ws_echo(websocket) -> None:  # type: ignore[no-untyped-def]
    async for message in websocket:
        await websocket.send(message)


async def main(port: int, name: str, ws_port: int | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: EchoProtocol(name), "127.0.0.1", port)
    if ws_port:
        import websockets

        await websockets.serve(ws_echo, "127.0.0.1", ws_port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="echo")
    parser.add_argument("--ws-port", type=int)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.name, args.ws_port))
