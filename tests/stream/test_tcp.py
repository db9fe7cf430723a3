"""The TCP stream relay with real sockets on loopback, on both copy paths (asyncio copy and
os.splice): every behavioural test runs on each."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from sluicegate.http.balancer import UpstreamNode
from sluicegate.http.clock import CLOCK
from sluicegate.stream.routes import StreamRoute, StreamRouteTable, StreamUpstream
from sluicegate.stream.tcp import StreamServer, splice_available

BLOCK = 1 << 20


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


FAMILIES = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(
    not has_ipv6(), reason="no IPv6 loopback"))]


@pytest.fixture(params=["copy", pytest.param("splice", marks=pytest.mark.skipif(
    not splice_available(), reason="no os.splice"))])
def splice(request: pytest.FixtureRequest) -> bool:
    return request.param == "splice"


# -- the relay under test: a StreamServer on uvloop in a background thread -------------------

class Relay:
    """A StreamServer running on its own uvloop thread; `call` runs code on that loop."""

    def __init__(self, routes: list[StreamRoute], host: str, splice: bool,
                 **options: Any) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = StreamServer(StreamRouteTable(routes), splice=splice, **options)

        def start() -> int:
            CLOCK.start(self.loop)
            CLOCK.extra.append(self.server.tick)
            return self.server.listen(host, 0).getsockname()[1]

        self.host = host
        self.port = self.call(start)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 10) -> Any:
        async def run() -> Any:
            result = fn(*args)
            if inspect.isawaitable(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(self.address, timeout)

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Until every relayed connection has ended."""
        deadline = time.monotonic() + timeout
        while self.call(lambda: len(self.server.connections)):
            if time.monotonic() > deadline:
                raise AssertionError("relay connections still open")
            time.sleep(0.02)

    def stop(self) -> None:
        def stop() -> None:
            self.server.close()
            with contextlib.suppress(ValueError):
                CLOCK.extra.remove(self.server.tick)
            CLOCK.stop()

        self.call(stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def start_relay() -> Iterator[Callable[..., Relay]]:
    started: list[Relay] = []

    def start(routes: list[StreamRoute], splice: bool = False, host: str = "127.0.0.1",
              **options: Any) -> Relay:
        relay = Relay(routes, host, splice, **options)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


def route_to(*addresses: tuple[str, int], **options: Any) -> StreamRoute:
    return StreamRoute("r", upstream=StreamUpstream.from_nodes(addresses, **options))


# -- upstream servers: plain blocking sockets, a thread per connection -----------------------

class Upstream:
    """A TCP server whose connections run `handler(conn)` each on its own thread."""

    def __init__(self, handler: Callable[[socket.socket], None], host: str = "127.0.0.1",
                 backlog: int = 64) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(backlog)
        self.listener.settimeout(0.1)
        self.address = (host, self.listener.getsockname()[1])
        self.handler = handler
        self.peers: list[tuple[str, int]] = []
        self.errors: list[BaseException] = []
        self.handlers: list[threading.Thread] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(30)
            self.peers.append(peer[:2])
            handler = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self.handlers.append(handler)
            handler.start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except BaseException as exc:  # reported by the test that cares
            self.errors.append(exc)
        finally:
            conn.close()

    def join(self, timeout: float = 10.0) -> None:
        """Wait for the connection handlers started so far to return."""
        for handler in list(self.handlers):
            handler.join(timeout)
            assert not handler.is_alive(), "upstream handler still running"

    def close(self) -> None:
        self.stopping = True
        self.thread.join(2)
        self.listener.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


@pytest.fixture
def upstreams() -> Iterator[Callable[..., Upstream]]:
    started: list[Upstream] = []

    def start(handler: Callable[[socket.socket], None] = echo, host: str = "127.0.0.1",
              **options: Any) -> Upstream:
        server = Upstream(handler, host, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def refused_address() -> tuple[socket.socket, tuple[str, int]]:
    """A bound socket that does not listen: connects to its port are refused. Keep the
    socket open so the port is not reused."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    return holder, holder.getsockname()


def assert_reset_promptly(relay: Relay, send: bytes = b"") -> None:
    """A client of `relay` is reset (at connect, send or receive) within a second."""
    started = time.monotonic()
    with pytest.raises((ConnectionResetError, BrokenPipeError)), relay.connect() as client:
        if send:
            client.sendall(send)
        client.recv(1)
    assert time.monotonic() - started < 1.0


def round_trip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    data = b""
    while len(data) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def recv_all(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(65536):
        parts.append(chunk)
    return b"".join(parts)


# -- bulk data with a verifiable pattern ---------------------------------------------------

def send_pattern(sock: socket.socket, total: int, seed: int) -> str:
    """Send `total` bytes (1 MiB random blocks, each numbered) and return their SHA-1."""
    base = bytearray(random.Random(seed).randbytes(BLOCK))
    digest = hashlib.sha1()
    for index in range(total // BLOCK):
        base[:8] = index.to_bytes(8, "little")
        block = bytes(base)
        digest.update(block)
        sock.sendall(block)
    return digest.hexdigest()


def receive_digest(sock: socket.socket) -> tuple[int, str]:
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    digest = hashlib.sha1()
    total = 0
    while n := sock.recv_into(view):
        digest.update(view[:n])
        total += n
    return total, digest.hexdigest()


def vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -- tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("host", FAMILIES)
def test_tcp_relay_round_trips_bytes(start_relay, upstreams, splice, host):
    server = upstreams(echo, host)
    relay = start_relay([route_to(server.address)], splice, host)
    for size in (1, 1000, 300_000):
        with relay.connect() as client:
            payload = random.randbytes(size)
            assert round_trip(client, payload) == payload
    assert len(server.peers) == 3
    relay.wait_idle()


def test_tcp_relay_moves_256_mb_intact_in_both_directions_at_once(start_relay, upstreams,
                                                                   splice):
    total = 256 * BLOCK
    results: dict[str, Any] = {}

    def bulk(conn: socket.socket) -> None:
        def send() -> None:
            results["down_sent"] = send_pattern(conn, total, seed=2)
            conn.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        results["up_received"] = receive_digest(conn)
        sender.join()

    server = upstreams(bulk)
    relay = start_relay([route_to(server.address)], splice)
    client = relay.connect(timeout=60)

    def client_send() -> None:
        results["up_sent"] = send_pattern(client, total, seed=1)
        client.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=client_send)
    sender.start()
    received = receive_digest(client)
    sender.join()
    client.close()
    relay.wait_idle(10)
    server.join()
    assert not server.errors
    assert received == (total, results["down_sent"])
    assert results["up_received"] == (total, results["up_sent"])
    counted = relay.call(lambda: (relay.server.bytes_from_clients,
                                  relay.server.bytes_from_upstreams))
    assert counted == (total, total)


def test_client_half_close_still_receives_the_rest(start_relay, upstreams, splice):
    def answer_after_eof(conn: socket.socket) -> None:
        request = recv_all(conn)  # until the client's FIN
        conn.sendall(b"got " + request + b" " + b"x" * 200_000)

    server = upstreams(answer_after_eof)
    relay = start_relay([route_to(server.address)], splice)
    with relay.connect() as client:
        client.sendall(b"question")
        client.shutdown(socket.SHUT_WR)
        answer = recv_all(client)
    assert answer == b"got question " + b"x" * 200_000
    relay.wait_idle()


def test_upstream_half_close_lets_the_client_keep_sending(start_relay, upstreams, splice):
    received: list[bytes] = []

    def greet_then_listen(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        received.append(recv_all(conn))

    server = upstreams(greet_then_listen)
    relay = start_relay([route_to(server.address)], splice)
    with relay.connect() as client:
        assert recv_all(client) == b"hello"  # the upstream's FIN reached us
        client.sendall(b"still talking " * 1000)
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
    relay.wait_idle()
    server.join()
    assert received == [b"still talking " * 1000]


def end_upload(client: socket.socket, relay: Relay, server: Upstream) -> None:
    """The client is done sending: its EOF goes through, the upstream's end comes back as
    EOF, and the relay and the upstream finish."""
    client.settimeout(30)
    client.shutdown(socket.SHUT_WR)
    assert client.recv(1) == b""
    client.close()
    relay.wait_idle(10)
    server.join()


def test_slow_reader_keeps_relay_memory_bounded(start_relay, upstreams, splice):
    start_reading = threading.Event()
    drained: list[int] = []

    def slow_reader(conn: socket.socket) -> None:
        start_reading.wait(30)
        drained.append(receive_digest(conn)[0])

    server = upstreams(slow_reader)
    relay = start_relay([route_to(server.address)], splice)
    client = relay.connect()
    client.settimeout(1.0)
    block = random.randbytes(BLOCK)
    rss_before = vm_rss()
    sent = 0
    limit = 512 * BLOCK
    try:
        while sent < limit:  # until the relay stops taking bytes for a second
            sent += client.send(block)
    except TimeoutError:
        pass
    grown = vm_rss() - rss_before
    # Without backpressure the relay reads as fast as the client writes: all 512 MiB.
    assert sent < limit
    assert grown < 32 * BLOCK, f"relay memory grew {grown / BLOCK:.1f} MiB"
    start_reading.set()
    end_upload(client, relay, server)
    assert drained == [sent]


def test_receiver_slower_than_the_sender_slows_the_sender(start_relay, upstreams, splice):
    # The receiver reads all along, at most ~128 MB/s; the client could send ~10x that.
    # What the client got rid of but the receiver has not read must stay within the
    # socket buffers on the way plus what the relay holds (on the sockmap path: its bounded
    # kernel queue), and every byte must arrive, in order.
    received = [0]
    digests: list[str] = []

    def slow_reader(conn: socket.socket) -> None:
        digest = hashlib.sha256()
        while data := conn.recv(256 * 1024):
            digest.update(data)
            received[0] += len(data)
            time.sleep(0.002)
        digests.append(digest.hexdigest())

    server = upstreams(slow_reader)
    relay = start_relay([route_to(server.address)], splice)
    client = relay.connect()
    client.settimeout(0.05)
    block = random.randbytes(BLOCK)
    digest = hashlib.sha256()
    sent = ahead = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            n = client.send(block)
        except TimeoutError:
            continue
        digest.update(block[:n])
        sent += n
        ahead = max(ahead, sent - received[0])
    assert ahead < 64 * BLOCK, f"{ahead / BLOCK:.0f} MiB sent but not received"
    end_upload(client, relay, server)
    assert received[0] == sent and digests == [digest.hexdigest()]


def test_unreachable_upstream_resets_the_client_promptly(start_relay, splice):
    holder, dead = refused_address()
    relay = start_relay([route_to(dead)], splice)
    try:
        assert_reset_promptly(relay, b"anyone there?")
    finally:
        holder.close()
    assert relay.call(lambda: relay.server.connect_failures) == 1


def test_connect_failure_retries_the_next_node(start_relay, upstreams, splice):
    holder, dead = refused_address()
    server = upstreams(echo)
    relay = start_relay([route_to(dead, server.address)], splice)
    try:
        for _ in range(4):  # round robin starts on each node in turn
            with relay.connect() as client:
                assert round_trip(client, b"ping") == b"ping"
    finally:
        holder.close()
    assert len(server.peers) == 4
    assert relay.call(lambda: relay.server.connect_failures) == 0


def test_connect_timeout_moves_on_to_the_next_node(start_relay, upstreams, splice):
    # A listener with a full accept queue drops SYNs: connects to it hang until timed out.
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(0)
    filler = socket.create_connection(black_hole.getsockname())
    server = upstreams(echo)
    upstream = StreamUpstream.from_nodes([black_hole.getsockname(), server.address],
                                         connect_timeout=0.3)
    relay = start_relay([StreamRoute("r", upstream=upstream)], splice)
    try:
        with relay.connect() as client:
            started = time.monotonic()
            assert round_trip(client, b"ping") == b"ping"
            assert 0.25 < time.monotonic() - started < 2.0
    finally:
        filler.close()
        black_hole.close()


def test_upstream_reset_reaches_the_client_as_a_reset(start_relay, upstreams, splice):
    def reset_after_hello(conn: socket.socket) -> None:
        conn.recv(5)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")

    server = upstreams(reset_after_hello)
    relay = start_relay([route_to(server.address)], splice)
    with relay.connect() as client:
        client.sendall(b"hello")
        with pytest.raises(ConnectionResetError):
            client.recv(1)
    relay.wait_idle()


def test_connection_without_matching_route_is_reset(start_relay, upstreams, splice):
    server = upstreams(echo)
    route = StreamRoute("other-clients", remote_addr="10.0.0.0/8",
                        upstream=StreamUpstream.from_nodes([server.address]))
    relay = start_relay([route], splice)
    assert_reset_promptly(relay)
    assert relay.call(lambda: relay.server.refused) == 1
    assert server.peers == []


def test_route_to_original_destination_is_refused_on_an_ordinary_listener(start_relay,
                                                                           splice):
    relay = start_relay([StreamRoute("transparent-only")], splice)
    assert_reset_promptly(relay)


def _accepted_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    return client, accepted


def test_handed_over_socket_goes_to_its_original_destination(start_relay, upstreams, splice):
    server = upstreams(echo)
    other = upstreams(echo)
    relay = start_relay([
        StreamRoute("by-port", server_port=other.address[1],
                    upstream=StreamUpstream.from_nodes([other.address])),
        StreamRoute("passthrough"),
    ], splice)
    client, accepted = _accepted_pair()
    with client:
        relay.call(relay.server.accept_socket, accepted, server.address)
        assert round_trip(client, b"where to?") == b"where to?"
    assert len(server.peers) == 1 and other.peers == []
    # The original destination is also what stream routes match on.
    client, accepted = _accepted_pair()
    with client:
        relay.call(relay.server.accept_socket, accepted, ("192.0.2.50", other.address[1]))
        assert round_trip(client, b"by port") == b"by port"
    assert len(other.peers) == 1


def test_routes_pick_the_upstream_by_listener_port(start_relay, upstreams, splice):
    first, second = upstreams(echo), upstreams(echo)
    relay = start_relay([], splice)
    second_port = relay.call(lambda: relay.server.listen("127.0.0.1", 0).getsockname()[1])
    relay.call(relay.server.swap, StreamRouteTable([
        StreamRoute("a", server_port=relay.port,
                    upstream=StreamUpstream.from_nodes([first.address])),
        StreamRoute("b", server_port=second_port,
                    upstream=StreamUpstream.from_nodes([second.address])),
    ]))
    with socket.create_connection(("127.0.0.1", second_port), 5) as client:
        assert round_trip(client, b"b") == b"b"
    with relay.connect() as client:
        assert round_trip(client, b"a") == b"a"
    assert len(first.peers) == 1 and len(second.peers) == 1


def test_connect_socket_factory_sets_the_upstream_source_address(start_relay, upstreams,
                                                                 splice):
    server = upstreams(echo)
    asked: list[tuple[str, tuple[str, int]]] = []

    def from_second_loopback(node: UpstreamNode, client: tuple[str, int]) -> socket.socket:
        asked.append((node.address, client))
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))
        return sock

    relay = start_relay([route_to(server.address)], splice,
                        connect_socket_factory=from_second_loopback)
    with relay.connect() as client:
        assert round_trip(client, b"x") == b"x"
        local = client.getsockname()
    assert server.peers[0][0] == "127.0.0.2"
    assert asked == [(f"127.0.0.1:{server.address[1]}", local)]


def test_idle_connection_is_closed_after_the_read_timeout(start_relay, upstreams, splice):
    server = upstreams(echo)
    upstream = StreamUpstream.from_nodes([server.address], idle_timeout=0.5)
    relay = start_relay([StreamRoute("r", upstream=upstream)], splice)
    with relay.connect() as client:
        assert round_trip(client, b"x") == b"x"
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert client.recv(1) == b""
        assert time.monotonic() - started < 3.0
    relay.wait_idle()


def test_drain_waits_for_open_connections_then_resets_them(start_relay, upstreams, splice):
    server = upstreams(echo)
    relay = start_relay([route_to(server.address)], splice)
    client = relay.connect()
    assert round_trip(client, b"x") == b"x"
    started = time.monotonic()
    clean = relay.call(relay.server.drain, 0.3)
    # (asyncio timers may fire a fraction of a millisecond early)
    assert clean is False and time.monotonic() - started >= 0.29
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    client.close()
    with pytest.raises(OSError):  # no longer listening
        socket.create_connection(relay.address, 1).close()


def test_original_destination_that_is_the_gateway_itself_is_refused(start_relay, upstreams,
                                                                     splice):
    server = upstreams(echo)
    relay = start_relay([StreamRoute("passthrough")], splice,
                        is_own_destination=lambda destination: destination == server.address)
    client, accepted = _accepted_pair()
    with client, pytest.raises(ConnectionResetError):
        relay.call(relay.server.accept_socket, accepted, server.address)
        client.settimeout(2)
        client.recv(1)
    assert server.peers == []


def test_node_given_by_host_name_is_resolved(start_relay, upstreams, splice):
    server = upstreams(echo, "::")  # dual-stack, whatever localhost resolves to first
    relay = start_relay([route_to(("localhost", server.address[1]))], splice)
    with relay.connect() as client:
        assert round_trip(client, b"by name") == b"by name"


def test_upstream_that_stops_reading_is_reset_after_the_send_timeout(start_relay, upstreams,
                                                                      splice):
    release = threading.Event()

    def never_reads(conn: socket.socket) -> None:
        release.wait(10)

    server = upstreams(never_reads)
    upstream = StreamUpstream.from_nodes([server.address], send_timeout=0.5)
    relay = start_relay([StreamRoute("r", upstream=upstream)], splice)
    block = bytes(BLOCK)
    try:
        with relay.connect() as client:
            client.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                while True:  # fill every buffer on the way
                    client.send(block)
            stalled = time.monotonic()
            client.settimeout(5)
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                while True:
                    client.send(block)
                    time.sleep(0.05)
            assert time.monotonic() - stalled < 3.5
        relay.wait_idle()
    finally:
        release.set()
