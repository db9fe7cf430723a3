"""The L4 proxy as users run it: `gateway.stream_proxy` listeners and `stream_routes` in the
config file, the gateway as a process, nginx and a UDP echo server behind it."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator

import pytest

from harness import free_port, wait_for_port


@pytest.fixture
def udp_echo() -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                data, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            sock.sendto(b"echo " + data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stopping.set()
    thread.join()
    sock.close()


def test_tcp_stream_route_relays_bytes_to_its_upstream(nginx, start_gateway):
    port = free_port()
    gateway = start_gateway({
        "gateway": {"stream_proxy": {"tcp": [f"127.0.0.1:{port}"]}},
        "stream_routes": [{"id": "web", "server_port": port,
                           "upstream": {"nodes": {nginx.address: 1}}}]})
    wait_for_port(port, process=gateway.process)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        assert response.read().decode() == nginx.BODY
        # L4: nginx answered directly, the gateway did not parse or add anything.
        assert response.headers["Server"].startswith("nginx")


def test_tcp_stream_without_matching_route_is_reset(start_gateway):
    port = free_port()
    gateway = start_gateway({
        "gateway": {"stream_proxy": {"tcp": [f"127.0.0.1:{port}"]}},
        "stream_routes": [{"id": "other", "server_port": 1,
                           "upstream": {"nodes": {"127.0.0.1:9": 1}}}]})
    wait_for_port(port, process=gateway.process)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"hello")
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            if sock.recv(100) == b"":
                raise ConnectionResetError("closed")


def test_udp_stream_route_relays_datagrams_both_ways(udp_echo, start_gateway):
    port = free_port()
    start_gateway({
        "gateway": {"stream_proxy": {"udp": [f"127.0.0.1:{port}"]}},
        "stream_routes": [{"id": "echo", "server_port": port,
                           "upstream": {"nodes": {f"127.0.0.1:{udp_echo}": 1},
                                        "scheme": "udp"}}]})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(1)
        for attempt in range(20):  # the UDP listener opens just after the HTTP one
            client.sendto(b"ping %d" % attempt, ("127.0.0.1", port))
            try:
                data, peer = client.recvfrom(100)
                break
            except TimeoutError:
                continue
        else:
            pytest.fail("no UDP answer through the gateway")
        assert data == b"echo ping %d" % attempt
        assert peer == ("127.0.0.1", port)


def test_stream_route_with_missing_upstream_id_is_a_config_error(tmp_path):
    from sluicegate.config.load import ConfigError, validate_config

    with pytest.raises(ConfigError) as caught:
        validate_config({"stream_routes": [{"id": "s", "upstream_id": "nope"}]})
    assert any(line.startswith("stream_routes[0].upstream_id:")
               for line in caught.value.errors), caught.value.errors
