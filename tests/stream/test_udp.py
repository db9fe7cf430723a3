"""The UDP proxy with real sockets on loopback: per-flow sessions, idle expiry, the hooks an
interceptor uses (recv_hook, reply_socket_factory, datagram_received)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from sluicegate.http.clock import CLOCK
from sluicegate.stream.routes import StreamRoute, StreamRouteTable, StreamUpstream
from sluicegate.stream.udp import UdpProxy


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


FAMILIES = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(
    not has_ipv6(), reason="no IPv6 loopback"))]


class Proxy:
    """A UdpProxy on its own uvloop thread, with the worker clock ticking its expiry."""

    def __init__(self, routes: list[StreamRoute], host: str, **options: Any) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = UdpProxy(StreamRouteTable(routes), **options)
        self.host = host

        def start() -> socket.socket:
            CLOCK.start(self.loop)
            CLOCK.extra.append(self.proxy.tick)
            return self.proxy.listen(host, 0)

        self.listener = self.call(start)
        self.address = (host, self.listener.getsockname()[1])

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 10) -> Any:
        async def run() -> Any:
            result = fn(*args)
            if inspect.isawaitable(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def session_count(self) -> int:
        return self.call(lambda: len(self.proxy.sessions))

    def stop(self) -> None:
        def stop() -> None:
            self.proxy.close()
            with contextlib.suppress(ValueError):
                CLOCK.extra.remove(self.proxy.tick)
            CLOCK.stop()

        self.call(stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Echo:
    """A UDP echo server: answers `data|host:port` (the address it saw), records peers."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.address = (host, self.sock.getsockname()[1])
        self.peers: list[tuple[str, int]] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(peer[:2])
            self.sock.sendto(data + b"|%s:%d" % (peer[0].encode(), peer[1]), peer)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def start_proxy() -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def start(routes: list[StreamRoute], host: str = "127.0.0.1", **options: Any) -> Proxy:
        proxy = Proxy(routes, host, **options)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def echo_servers() -> Iterator[Callable[..., Echo]]:
    started: list[Echo] = []

    def start(host: str = "127.0.0.1") -> Echo:
        server = Echo(host)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def route_to(*addresses: tuple[str, int]) -> StreamRoute:
    return StreamRoute("r", upstream=StreamUpstream.from_nodes(addresses))


def client_socket(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(2.0)
    return sock


def ask(client: socket.socket, to: tuple[str, int], data: bytes) -> tuple[bytes, Any]:
    client.sendto(data, to)
    reply, source = client.recvfrom(65535)
    return reply, source[:2]


def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.mark.parametrize("host", FAMILIES)
def test_udp_datagrams_round_trip_through_the_proxy(start_proxy, echo_servers, host):
    echo = echo_servers(host)
    proxy = start_proxy([route_to(echo.address)], host)
    with client_socket(host) as client:
        for index in range(3):
            reply, source = ask(client, proxy.address, b"ping %d" % index)
            assert reply.startswith(b"ping %d|" % index)
            assert source == proxy.address  # answered from the address the client used
    assert len(set(echo.peers)) == 1  # one flow, one upstream socket
    assert proxy.session_count() == 1


def test_two_clients_get_their_own_upstream_sessions(start_proxy, echo_servers):
    echo = echo_servers()
    proxy = start_proxy([route_to(echo.address)])
    with client_socket() as first, client_socket() as second:
        reply_a, _ = ask(first, proxy.address, b"a")
        reply_b, _ = ask(second, proxy.address, b"b")
        reply_a2, _ = ask(first, proxy.address, b"a2")
    assert reply_a.startswith(b"a|") and reply_b.startswith(b"b|")
    # The upstream saw two sources: the first client's flow kept its own.
    assert reply_a.split(b"|")[1] == reply_a2.split(b"|")[1] != reply_b.split(b"|")[1]
    assert len(set(echo.peers)) == 2
    assert proxy.session_count() == 2


def test_idle_udp_sessions_expire(start_proxy, echo_servers):
    echo = echo_servers()
    proxy = start_proxy([route_to(echo.address)], idle_timeout=0.3)
    with client_socket() as client:
        first, _ = ask(client, proxy.address, b"x")
        assert proxy.session_count() == 1
        wait_until(lambda: proxy.session_count() == 0, timeout=2.0)
        again, _ = ask(client, proxy.address, b"x")
    assert first.split(b"|")[1] != again.split(b"|")[1]  # a new flow, a new upstream socket


def test_active_udp_session_outlives_the_idle_timeout(start_proxy, echo_servers):
    echo = echo_servers()
    proxy = start_proxy([route_to(echo.address)], idle_timeout=0.6)
    with client_socket() as client:
        for _ in range(8):  # 1.6 s of traffic every 0.2 s
            ask(client, proxy.address, b"keepalive")
            time.sleep(0.2)
    assert len(set(echo.peers)) == 1
    assert proxy.session_count() == 1


def test_udp_flow_without_a_route_is_dropped(start_proxy, echo_servers):
    echo = echo_servers()
    route = StreamRoute("elsewhere", remote_addr="10.0.0.0/8",
                        upstream=StreamUpstream.from_nodes([echo.address]))
    proxy = start_proxy([route])
    with client_socket() as client:
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            ask(client, proxy.address, b"x")
    assert proxy.call(lambda: proxy.proxy.datagrams_unrouted) == 1
    assert echo.peers == []


def test_udp_flows_beyond_max_sessions_are_refused(start_proxy, echo_servers):
    echo = echo_servers()
    proxy = start_proxy([route_to(echo.address)], max_sessions=1)
    with client_socket() as first, client_socket() as second:
        ask(first, proxy.address, b"one")
        second.settimeout(0.3)
        with pytest.raises(TimeoutError):
            ask(second, proxy.address, b"two")
        reply, _ = ask(first, proxy.address, b"one again")  # the existing flow still works
    assert reply.startswith(b"one again|")
    assert proxy.call(lambda: proxy.proxy.sessions_refused) == 1


def test_replies_come_from_the_reply_socket_factory_address(start_proxy, echo_servers):
    echo = echo_servers()
    made: list[tuple[Any, Any]] = []

    def reply_from_second_loopback(original_destination: Any, client: Any) -> socket.socket:
        made.append((original_destination, client))
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.2", 0))
        sock.connect(client)
        return sock

    proxy = start_proxy([route_to(echo.address)],
                        reply_socket_factory=reply_from_second_loopback)
    with client_socket() as client:
        reply, source = ask(client, proxy.address, b"hi")
        assert reply.startswith(b"hi|")
        assert source[0] == "127.0.0.2"
        # The flow's later datagrams may arrive on that socket (TPROXY delivers them to the
        # connected socket): they reach the same upstream flow.
        again, _ = ask(client, source, b"again")
        assert again.startswith(b"again|")
        assert made == [(proxy.address, client.getsockname())]
    assert len(set(echo.peers)) == 1


def test_recv_hook_original_destination_chooses_the_route(start_proxy, echo_servers):
    by_port, other = echo_servers(), echo_servers()
    proxy = start_proxy([
        StreamRoute("dns", server_port=5353, upstream=StreamUpstream.from_nodes(
            [by_port.address])),
        StreamRoute("rest", upstream=StreamUpstream.from_nodes([other.address])),
    ])
    intercepted = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    intercepted.bind(("127.0.0.1", 0))

    def recv_hook(sock: socket.socket) -> tuple[bytes, Any, Any]:
        data, client = sock.recvfrom(65535)
        return data, client, ("198.51.100.7", 5353)  # as IP_ORIGDSTADDR would say

    proxy.call(proxy.proxy.add_listener, intercepted, recv_hook)
    with client_socket() as client:
        reply, _ = ask(client, intercepted.getsockname(), b"q")
        assert reply.startswith(b"q|")
        reply, _ = ask(client, proxy.address, b"plain")  # the ordinary listener
        assert reply.startswith(b"plain|")
    assert len(by_port.peers) == 1 and len(other.peers) == 1


def test_intercepted_flow_without_upstream_goes_to_its_original_destination(start_proxy,
                                                                            echo_servers):
    echo = echo_servers()
    proxy = start_proxy([StreamRoute("passthrough")])
    with client_socket() as client:
        # Through the ordinary listener there is no original destination to go to.
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            ask(client, proxy.address, b"x")
        client.settimeout(2.0)
        # Pushed by an interceptor with its own reader: the flow goes where it was headed.
        proxy.call(proxy.proxy.datagram_received, b"pushed", client.getsockname(),
                   echo.address, proxy.listener)
        reply, source = client.recvfrom(65535)
    assert reply.startswith(b"pushed|")
    assert source[:2] == proxy.address


def test_udp_node_given_by_host_name_is_resolved(start_proxy, echo_servers):
    echo = echo_servers("::")  # dual-stack, whatever localhost resolves to first
    proxy = start_proxy([route_to(("localhost", echo.address[1]))])
    with client_socket() as client:
        for index in range(3):  # the first datagram waits for the name, the rest do not
            reply, _ = ask(client, proxy.address, b"n%d" % index)
            assert reply.startswith(b"n%d|" % index)
