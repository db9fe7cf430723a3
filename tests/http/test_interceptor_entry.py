"""The contract interceptors build on: an accepted socket plus its original destination
enters the same L7 pipeline as a listener's connections."""

from __future__ import annotations

import asyncio
import json
import socket

import uvloop

from sluicegate.config.load import validate_config
from sluicegate.http.server import HttpServer
from sluicegate.http.snapshot import compile_snapshot
from sluicegate.plugins.base import PluginEnv


def _accepted_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    return client, accepted


def test_accepted_socket_with_original_destination_is_routed_by_it(echo):
    config = validate_config({"routes": [
        {"id": "intercepted", "uri": "/*", "vars": [["original_dst_addr", "==", "10.1.2.3"],
                                                    ["original_dst_port", "==", "80"]],
         "upstream": {"nodes": {echo.address: 1}}},
    ]}).config
    snapshot = compile_snapshot(config, PluginEnv())

    async def exchange(original: tuple[str, int]) -> bytes:
        server = HttpServer(snapshot)
        client, accepted = _accepted_pair()
        accepted.setblocking(False)
        client.setblocking(False)
        await server.accept_socket(accepted, original)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"GET /x HTTP/1.1\r\nHost: example.org\r\n"
                                        b"Connection: close\r\n\r\n")
        data = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(client, 65536), 5):
            data += chunk
        client.close()
        await server.drain(1)
        return data

    routed = uvloop.run(exchange(("10.1.2.3", 80)))
    assert routed.startswith(b"HTTP/1.1 200")
    info = json.loads(routed.split(b"\r\n\r\n", 1)[1])
    assert info["target"] == "/x"
    not_routed = uvloop.run(exchange(("10.9.9.9", 80)))
    assert not_routed.startswith(b"HTTP/1.1 404")
