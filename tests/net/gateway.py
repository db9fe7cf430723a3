"""What the tests run on the gateway host: `ip netns exec GW python tests/net/gateway.py ...`.

    install SPEC_JSON [--nft PATH]   TproxyInterceptor().install(spec); prints status JSON
    install-and-wait SPEC_JSON       install, print "installed", then sleep (to be killed)
    remove | status                  TproxyInterceptor().remove() / .status() (JSON)
    ... --in-event-loop              the same, called from inside a running uvloop loop
    relay PORT tcp|udp [--preserve-source]
        a transparent relay using sluicegate.intercept.sockets: listeners on 0.0.0.0:PORT
        and [::]:PORT; each intercepted flow is relayed to its original destination (from
        the client's own address with --preserve-source) and logged as one JSON line on
        stdout: {"proto", "client", "original_destination", "upstream_local"}.
        Prints "ready" once listening.

SPEC_JSON holds `InterceptSpec.from_options` keyword arguments. Interceptor errors print
`error: <reason>` on stderr and exit 2.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import sys
import threading
import time

from sluicegate.intercept import InterceptError, InterceptSpec, TproxyInterceptor
from sluicegate.intercept.sockets import (
    original_destination,
    recv_with_original_destination,
    transparent_connect_socket,
    transparent_listener,
    udp_reply_socket,
)

UPSTREAM_TIMEOUT = 5.0


def log(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def relay_tcp(client: socket.socket, peer: tuple, preserve_source: bool) -> None:
    client.setblocking(True)
    destination = original_destination(client)
    if preserve_source:
        upstream = transparent_connect_socket(peer, client.family)
    else:
        upstream = socket.socket(client.family, socket.SOCK_STREAM)
    upstream.setblocking(True)
    upstream.settimeout(UPSTREAM_TIMEOUT)
    try:
        upstream.connect(destination)
    except OSError:
        client.close()
        upstream.close()
        return
    upstream.settimeout(None)
    log(proto="tcp", client=list(peer[:2]), original_destination=list(destination),
        upstream_local=list(upstream.getsockname()[:2]))
    back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
    back.start()
    pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def relay_udp(listener: socket.socket, preserve_source: bool) -> None:
    data, client, destination = recv_with_original_destination(listener)
    if preserve_source:
        upstream = transparent_connect_socket(client, listener.family, proto="udp")
    else:
        upstream = socket.socket(listener.family, socket.SOCK_DGRAM)
    upstream.setblocking(True)
    upstream.settimeout(UPSTREAM_TIMEOUT)
    with upstream:
        upstream.sendto(data, destination)
        answer = upstream.recv(65535)
        upstream_local = upstream.getsockname()[:2]
    with udp_reply_socket(destination, client) as reply:
        reply.send(answer)
    log(proto="udp", client=list(client), original_destination=list(destination),
        upstream_local=list(upstream_local))


def serve(port: int, proto: str, preserve_source: bool) -> None:
    listeners = [transparent_listener("0.0.0.0", port, proto),
                 transparent_listener("::", port, proto)]
    selector = selectors.DefaultSelector()
    for listener in listeners:
        selector.register(listener, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            listener = key.fileobj
            assert isinstance(listener, socket.socket)
            try:
                if proto == "tcp":
                    client, peer = listener.accept()
                    threading.Thread(target=relay_tcp, args=(client, peer, preserve_source),
                                     daemon=True).start()
                else:
                    relay_udp(listener, preserve_source)
            except (BlockingIOError, TimeoutError):
                continue


def main(argv: list[str]) -> int:
    if "--in-event-loop" in argv:  # as the gateway calls it: from inside uvloop
        import uvloop

        argv = [arg for arg in argv if arg != "--in-event-loop"]

        async def inside() -> int:
            return main(argv)
        return uvloop.run(inside())
    command = argv[0]
    nft = argv[argv.index("--nft") + 1] if "--nft" in argv else "nft"
    interceptor = TproxyInterceptor(nft=nft)
    try:
        if command in ("install", "install-and-wait"):
            interceptor.install(InterceptSpec.from_options(**json.loads(argv[1])))
            if command == "install-and-wait":
                print("installed", flush=True)
                while True:
                    time.sleep(3600)
            print(json.dumps(interceptor.status()))
        elif command == "remove":
            interceptor.remove()
        elif command == "status":
            print(json.dumps(interceptor.status()))
        elif command == "relay":
            serve(int(argv[1]), argv[2], "--preserve-source" in argv)
        else:
            print(f"unknown command {command!r}", file=sys.stderr)
            return 64
    except InterceptError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
