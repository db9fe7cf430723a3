"""A tiny demo upstream for the quickstart: answers every request with a JSON echo of it.

    python examples/echo_upstream.py [--listen 127.0.0.1:9081]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            length = int(headers.get("Content-Length", headers.get("content-length", 0)))
            body = await reader.readexactly(length) if length else b""
            payload = json.dumps({"method": method, "uri": target, "headers": headers,
                                  "body": body.decode("utf-8", "replace")}, indent=2).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    server = await asyncio.start_server(handle, host, int(port))
    print(f"echo upstream listening on {listen}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:9081")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parser.parse_args().listen))
