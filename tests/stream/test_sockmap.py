"""The TCP relay on the sockmap path (bytes redirected in the kernel by an sk_skb program):
every behavioural test of test_tcp.py runs here again with `copy="sockmap"`, plus what only
this path has (early bytes, the switch to the kernel, counters, fallback).

The programs attach to a SOCKHASH holding only the relay's own sockets (no network
namespace or interface hook, nothing pinned), so these tests run in the root namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from net.bpffs import bpffs_fixture  # noqa: F401  (the `bpffs` fixture)
from net.conftest import rig_fixture  # noqa: F401  (the `rig` fixture)
from net.rig import PYTHON, Rig
from sluicegate.bpf import sockmap
from sluicegate.config.model import GatewayConfig
from sluicegate.stream.routes import StreamRoute, StreamUpstream
from sluicegate.stream.sockmap_relay import SockmapConnection
from sluicegate.stream.tcp import StreamConnection
from stream.test_tcp import *  # noqa: F403  (every test_tcp test, re-run on this path)
from stream.test_tcp import Relay, echo, recv_all, route_to

UNAVAILABLE = sockmap.available()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None,
                                reason=f"sockmap splicing unavailable: {UNAVAILABLE}")
MIB = 1 << 20


@pytest.fixture
def splice() -> bool:
    """test_tcp's path switch: unused here, every relay takes the sockmap path."""
    return False


@pytest.fixture
def start_relay() -> Iterator[Callable[..., Relay]]:
    """test_tcp's relay factory, on the sockmap path; each relay records its finished
    connections in `relay.closed`."""
    started: list[Relay] = []

    def start(routes: list[Any], splice: bool = False, host: str = "127.0.0.1",
              **options: Any) -> Relay:
        closed: list[StreamConnection] = []
        options.setdefault("on_close", closed.append)
        relay = Relay(routes, host, False, copy="sockmap", **options)
        relay.closed = closed  # type: ignore[attr-defined]
        assert relay.server.copy_path == "sockmap"
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


def test_upstream_that_stops_reading_is_reset_after_the_send_timeout_anyway(start_relay,
                                                                             upstreams):
    release = threading.Event()

    def read_once_then_stop(conn: socket.socket) -> None:
        conn.sendall(recv_exactly(conn, 4))
        release.wait(20)

    server = upstreams(read_once_then_stop)
    upstream = StreamUpstream.from_nodes([server.address], send_timeout=0.5)
    relay = start_relay([StreamRoute("r", upstream=upstream)])
    try:
        with relay.connect() as client:
            assert round_trip_ping(client)  # joined: what follows is redirected
            client.settimeout(10)
            block = bytes(MIB)
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                for _ in range(2048):  # 2 GiB at most: the reset comes long before
                    client.sendall(block)
                client.recv(1)
        relay.wait_idle()
    finally:
        release.set()


# -- helpers ---------------------------------------------------------------------------------

def send_random(sock: socket.socket, total: int, seed: int) -> str:
    """Send `total` pseudo-random bytes in 1 MiB blocks; return their SHA-256."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    left = total
    while left:
        block = rng.randbytes(min(MIB, left))
        digest.update(block)
        sock.sendall(block)
        left -= len(block)
    return digest.hexdigest()


def receive_sha256(sock: socket.socket) -> tuple[int, str]:
    digest = hashlib.sha256()
    total = 0
    buffer = bytearray(MIB)
    view = memoryview(buffer)
    while n := sock.recv_into(view):
        digest.update(view[:n])
        total += n
    return total, digest.hexdigest()


def exchange(sock: socket.socket, total: int, seed: int) -> tuple[str, tuple[int, str]]:
    """Send `total` bytes and half-close while receiving until EOF; (sent, received)."""
    sent: list[str] = []

    def send() -> None:
        sent.append(send_random(sock, total, seed))
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    received = receive_sha256(sock)
    sender.join()
    return sent[0], received


def bulk_peer(results: list[Any], total: int, seed: int) -> Callable[[socket.socket], None]:
    """An upstream that answers a 4-byte ping, then sends `total` bytes while it hashes all
    it receives."""
    def handle(conn: socket.socket) -> None:
        conn.sendall(recv_exactly(conn, 4))
        results.append(exchange(conn, total, seed))
    return handle


def spliced(relay: Relay) -> list[bool]:
    return [c.spliced for c in relay.closed  # type: ignore[attr-defined]
            if isinstance(c, SockmapConnection)]


# -- what only the sockmap path has -----------------------------------------------------------

def test_sockmap_moves_256_mib_each_way_intact_and_counts_it(start_relay, upstreams):
    total = 256 * MIB
    results: list[Any] = []
    server = upstreams(bulk_peer(results, total, seed=7))
    relay = start_relay([route_to(server.address)])
    with relay.connect(timeout=60) as client:
        assert round_trip_ping(client)  # the pair is joined by now
        sent, received = exchange(client, total, seed=8)
    relay.wait_idle(20)
    server.join()
    assert not server.errors
    (down_sent, up_received), = results
    assert received == (total, down_sent)
    assert up_received == (total, sent)
    assert spliced(relay) == [True]
    connection, = relay.closed  # type: ignore[attr-defined]
    assert (connection.bytes_from_client, connection.bytes_from_upstream) == (total + 4,
                                                                              total + 4)


def round_trip_ping(client: socket.socket) -> bool:
    """One echo exchange: after it, the relay has joined the pair."""
    client.sendall(b"ping")
    return recv_exactly(client, 4) == b"ping"


def test_many_concurrent_flows_each_arrive_intact(start_relay, upstreams):
    flows, total = 32, 4 * MIB
    server = upstreams(echo, backlog=flows)
    relay = start_relay([route_to(server.address)])
    outcomes: dict[int, tuple[str, tuple[int, str]]] = {}
    errors: list[BaseException] = []

    def flow(index: int) -> None:
        try:
            with relay.connect(timeout=60) as client:
                outcomes[index] = exchange(client, total, seed=index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=flow, args=(i,)) for i in range(flows)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not errors
    assert len(outcomes) == flows
    for sent, received in outcomes.values():
        assert received == (total, sent)  # the echo: exactly what was sent, in order
    relay.wait_idle(10)
    assert len(relay.closed) == flows  # type: ignore[attr-defined]
    assert sum(spliced(relay)) >= 1


def test_bytes_sent_before_the_pair_is_joined_arrive_first(start_relay, upstreams):
    # The client writes before the relay has even connected upstream, and then waits: the
    # bytes are queued on the socket before it enters the map, and no later segment would
    # wake the program up for them.
    server = upstreams(echo)
    relay = start_relay([route_to(server.address)])
    with relay.connect() as client:
        payload = random.randbytes(100_000)
        client.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = client.recv(65536)
            assert chunk
            received += chunk
        assert received == payload
        assert round_trip_ping(client)  # and the joined pair carries what follows
    relay.wait_idle()


def test_upstream_that_speaks_first_is_heard(start_relay, upstreams):
    def banner(conn: socket.socket) -> None:
        conn.sendall(b"220 ready\r\n")
        echo(conn)

    server = upstreams(banner)
    relay = start_relay([route_to(server.address)])
    with relay.connect() as client:
        assert recv_exactly(client, 11) == b"220 ready\r\n"
        assert round_trip_ping(client)
    relay.wait_idle()
    assert spliced(relay) == [True]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def test_half_close_after_joining_reaches_the_upstream_and_the_answer_follows(start_relay,
                                                                               upstreams):
    def answer_after_eof(conn: socket.socket) -> None:
        conn.sendall(conn.recv(4))
        request = recv_all(conn)
        conn.sendall(b"got " + request + b" " + b"x" * 300_000)

    server = upstreams(answer_after_eof)
    relay = start_relay([route_to(server.address)])
    with relay.connect() as client:
        assert round_trip_ping(client)
        client.sendall(b"question")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"got question " + b"x" * 300_000
    relay.wait_idle()
    assert spliced(relay) == [True]


def test_client_reset_after_joining_resets_the_upstream(start_relay, upstreams):
    outcome: list[BaseException | bytes] = []

    def wait_for_end(conn: socket.socket) -> None:
        conn.sendall(conn.recv(4))
        try:
            outcome.append(recv_all(conn))
        except OSError as exc:
            outcome.append(exc)

    server = upstreams(wait_for_end)
    relay = start_relay([route_to(server.address)])
    client = relay.connect()
    assert round_trip_ping(client)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    client.close()
    relay.wait_idle()
    server.join()
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionResetError)


def test_copy_setting_accepts_the_four_paths_and_rejects_others():
    for path in ("auto", "sockmap", "splice", "userspace"):
        config = GatewayConfig.model_validate({"gateway": {"stream_proxy": {"copy": path}}})
        assert config.gateway.stream_proxy.copy_path == path
    with pytest.raises(ValueError, match="copy"):
        GatewayConfig.model_validate({"gateway": {"stream_proxy": {"copy": "kernel"}}})


FALLBACK_PROGRAM = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from sluicegate.stream.routes import StreamRouteTable
from sluicegate.stream.tcp import StreamServer
print(StreamServer(StreamRouteTable([]), copy=sys.argv[1]).copy_path)
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing")
def test_without_bpf_privilege_sockmap_falls_back_to_splice_with_one_log_line():
    # An unprivileged process can't load BPF: a real reason for the object not to load.
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
         "-c", FALLBACK_PROGRAM, "sockmap"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "splice"
    lines = [line for line in result.stderr.splitlines() if "sockmap" in line]
    assert len(lines) == 1
    assert "sockmap unavailable" in lines[0] and "using splice" in lines[0]



# -- the intercepted (handle: tcp) path, in a client — gateway — server rig -------------------

ECHO_SERVER = """
import socket, sys, threading
listener = socket.socket(socket.AF_INET6)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
listener.bind(("::", int(sys.argv[1])))
listener.listen(16)
def serve(conn):
    with conn:
        while data := conn.recv(1 << 20):
            conn.sendall(data)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

SHA_CLIENT = """
import hashlib, json, random, socket, sys, threading
host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sock = socket.create_connection((host, port), timeout=60)
sent = hashlib.sha256()
def send():
    rng = random.Random(total)
    left = total
    while left:
        block = rng.randbytes(min(1 << 20, left))
        sent.update(block)
        sock.sendall(block)
        left -= len(block)
    sock.shutdown(socket.SHUT_WR)
sender = threading.Thread(target=send)
sender.start()
received, count = hashlib.sha256(), 0
while data := sock.recv(1 << 20):
    received.update(data)
    count += len(data)
sender.join()
print(json.dumps({"sent": sent.hexdigest(), "received": received.hexdigest(), "count": count}))
"""


@pytest.mark.parametrize("mode", ["tproxy", "ebpf"])
def test_intercepted_tcp_on_the_sockmap_path_arrives_intact_both_ways(rig: Rig, bpffs, mode):
    # `bpffs` isolates the eBPF interception's pins; the sockmap programs are not pinned.
    import intercept.test_ebpf as ebpf_tests
    import intercept.test_gateway_tproxy as tproxy_tests

    rig.start_in(rig.server, [PYTHON, "-c", ECHO_SERVER, "80"])
    rig.server.wait_listening(80)
    if mode == "ebpf":
        config = ebpf_tests.seed(handle="tcp")
        start = ebpf_tests.start_gateway
    else:
        config = tproxy_tests.seed(handle="tcp")
        start = tproxy_tests.start_l4_gateway
    config["gateway"] = {"stream_proxy": {"copy": "sockmap"}}
    start(rig, config)
    total = 64 * MIB
    for host in (rig.server_v4, rig.server_v6):
        result = rig.client.python(SHA_CLIENT, host, "80", str(total), timeout=120)
        outcome = json.loads(result.stdout)
        assert outcome["count"] == total
        assert outcome["received"] == outcome["sent"]
    log = (rig.workdir / ("gateway.log" if mode == "ebpf" else "l4.log")).read_text()
    assert "stream copy: sockmap" in log and "sockmap unavailable" not in log, log



# -- the backlog bound (gateway.stream_proxy.sockmap_backlog) -------------------------------

@pytest.fixture
def small_backlog() -> Iterator[int]:
    """A 256 KiB bound for the pairs joined during the test: many switches between the
    kernel and user space."""
    sockmap.set_backlog(256 << 10)
    yield 256 << 10
    sockmap.set_backlog(None)


def test_backlog_setting_reaches_the_programs_entries(start_relay, upstreams, small_backlog):
    server = upstreams(echo)
    relay = start_relay([route_to(server.address)])
    with relay.connect() as client:
        assert round_trip_ping(client)  # joined
        maps = sockmap.shared()
        entries = [maps.ctl.lookup(key, 32) for key in maps.ctl.keys(8)]
        bounds = [struct.unpack("<QQQQ", entry)[3] for entry in entries if entry]
        assert bounds.count(small_backlog) >= 2  # the client's and the upstream's


def test_a_small_backlog_bound_keeps_every_byte_in_order(start_relay, upstreams,
                                                         small_backlog):
    # test_tcp's slow receiver (sha256 of every byte, bounded lead), with the kernel path
    # handing over to user space and back every 256 KiB of lead.
    from stream.test_tcp import test_receiver_slower_than_the_sender_slows_the_sender as slow

    slow(start_relay, upstreams, False)


def test_default_backlog_is_the_largest_receive_buffer_within_limits(tmp_path):
    # Read from the namespace's tcp_rmem ("min default max"); a bound below the window a
    # sender may fill would leave most of its bytes to user space. Capped at 64 MiB: the
    # queue is memory no TCP limit sees.
    rmem = tmp_path / "tcp_rmem"
    for line, bound in [("4096 131072 33554432", 32 * MIB), ("4096 131072 6291456", 16 * MIB),
                        ("4096 131072 4294967296", 64 * MIB), ("garbage", 16 * MIB)]:
        rmem.write_text(line + "\n")
        assert sockmap.default_backlog(str(rmem)) == bound, line


def send_buffers(port: int) -> list[int]:
    """The send buffer size (ss's skmem tb) of each established TCP socket on loopback with
    `port` at either end."""
    out = subprocess.run(["ss", "-tmnH", "state", "established",
                          f"( sport = :{port} or dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return [int(part.split(",")[0]) for part in out.split(",tb")[1:]]


def test_joined_sockets_send_from_the_largest_buffer_allowed(start_relay, upstreams):
    # The kernel feeds a redirect into its socket only while less than half the send buffer
    # is used, else a jiffy later: the buffer sets the path's speed (sockmap_send_buffer).
    from sluicegate import sysctl

    wmem_max = sysctl.read_ints(sysctl.WMEM_MAX)[0]  # type: ignore[index]
    autotuned_max = sysctl.read_ints(sysctl.TCP_WMEM)[2]  # type: ignore[index]
    server = upstreams(echo)
    relay = start_relay([route_to(server.address)])
    with relay.connect() as client:
        assert round_trip_ping(client)  # joined
        client_side = send_buffers(relay.port)  # the test's client and the relay's socket
        upstream_side = send_buffers(server.address[1])
    if 2 * wmem_max > autotuned_max:
        assert client_side.count(2 * wmem_max) == 1, client_side  # the relay's, not ours
        assert upstream_side.count(2 * wmem_max) == 1, upstream_side
    else:
        assert max(client_side + upstream_side) <= autotuned_max


def test_two_relays_of_one_process_copying_at_once_keep_their_bytes_apart(
        start_relay, upstreams, small_backlog):
    # Two event loops in one process (as these tests run them), both copying passed bytes
    # in user space at once (a 256 KiB bound): each stream keeps its own bytes. A read
    # buffer shared by the process, tried at stop 13, mixed them.
    total = 48 * MIB
    outcomes: list[Any] = []

    def one_pair(seed: int) -> None:
        results: list[Any] = []
        server = upstreams(bulk_peer(results, total, seed=seed))
        relay = start_relay([route_to(server.address)])
        with relay.connect(timeout=60) as client:
            assert round_trip_ping(client)
            sent, received = exchange(client, total, seed=seed + 1)
        server.join()
        outcomes.append((sent, received, results))

    pairs = [threading.Thread(target=one_pair, args=(seed,)) for seed in (11, 21)]
    for pair in pairs:
        pair.start()
    for pair in pairs:
        pair.join(120)
    assert len(outcomes) == 2
    for sent, received, results in outcomes:
        (down_sent, up_received), = results
        assert received == (total, down_sent)
        assert up_received == (total, sent)


def test_backlog_setting_is_checked_at_load():
    from sluicegate.config.load import ConfigError, validate_config

    with pytest.raises(ConfigError) as caught:
        validate_config({"gateway": {"stream_proxy": {"copy": "sockmap",
                                                       "sockmap_backlog": 1000}}})
    assert any(error.startswith("gateway.stream_proxy.sockmap_backlog: ")
               for error in caught.value.errors), caught.value.errors


# -- backpressure: a sender faster than its receiver, over veths ---------------------------

def test_iperf3_through_the_sockmap_relay_never_runs_ahead_of_its_server(rig: Rig):
    # Over veths (not loopback) the kernel's redirect queue grew without bound before the
    # program bounded it: iperf3 had sent 3.37 GB when its server had 1.88 GB. Now the
    # program passes to user space past SG_SM_BACKLOG_MAX and the client's window closes.
    if shutil.which("iperf3") is None:
        pytest.fail("iperf3 is not installed: run `make test`, which installs it")
    import yaml

    rig.start_in(rig.server, ["iperf3", "-s", "-p", "5201"])
    rig.server.wait_listening(5201)
    config = {"gateway": {"listen": ["127.0.0.1:9080"], "workers": 1, "stream_proxy": {
                  "tcp": [f"{rig.gateway_client_v4}:5201"], "copy": "sockmap"}},
              "stream_routes": [{"id": "iperf", "server_port": 5201, "upstream": {
                  "nodes": {f"{rig.server_v4}:5201": 1}}}]}
    path = rig.workdir / "sockmap.yaml"
    path.write_text(yaml.safe_dump(config))
    # No sockmap_backlog set: the bound is the namespace's largest TCP receive buffer.
    rig.gateway.run(["sysctl", "-qw", f"net.ipv4.tcp_rmem=4096 131072 {40 * MIB}"])
    log = (rig.workdir / "sockmap.log").open("w")
    gateway = rig.gateway.popen([PYTHON, "-m", "sluicegate", "run", "-c", str(path)],
                                stdout=log, stderr=subprocess.STDOUT)
    rig.processes.append(gateway)
    rig.gateway.wait_listening(5201, process=gateway)
    result = rig.client.run(["iperf3", "-c", rig.gateway_client_v4, "-p", "5201", "-t", "3",
                             "-J"], timeout=60)
    end = json.loads(result.stdout)["end"]
    sent, received = end["sum_sent"]["bytes"], end["sum_received"]["bytes"]
    assert received > 0
    # iperf3 counts what its client wrote in 3 s and what its server read; the difference
    # is what was on its way when the client stopped: socket buffers and the bounded queue.
    assert sent - received < 96 * MIB, (sent, received)
    assert f"up to {40 * MIB >> 10} KiB per direction" in (rig.workdir / "sockmap.log"
                                                            ).read_text()


# -- a retransmission that overlaps bytes already redirected ---------------------------------
# tcp_read_skb hands the program whole skbs, also one TCP queued although its start was
# received before (sockmap_splice.bpf.c). Under CPU load loopback retransmits such segments
# now and then (one 64 KiB block repeated in 256 MiB, about one run in five); here the
# client's TCP is made to "retransmit" one on purpose, so the case is met every time.

TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_TIMESTAMP = 19, 20, 21, 24
TCP_RECV_QUEUE, TCP_SEND_QUEUE, TCP_REPAIR_OFF_NO_WP = 1, 2, -1


def tcp_sequences(sock: socket.socket) -> tuple[int, int]:
    """(next sequence number to send, next expected) of a connected TCP socket: read in
    repair mode (CAP_NET_ADMIN), left again without a window probe."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        send_seq = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        recv_seq = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ)
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
    return send_seq & 0xFFFF_FFFF, recv_seq & 0xFFFF_FFFF


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def send_segment_as(sock: socket.socket, seq: int, payload: bytes) -> None:
    """Send one TCP segment with `payload` at `seq` from `sock`'s address and port to its
    peer, as its own TCP would (ACK|PSH, its current timestamp), through a raw socket."""
    (src, sport), (dst, dport) = sock.getsockname(), sock.getpeername()
    _, ack = tcp_sequences(sock)
    tsval = sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP) & 0xFFFF_FFFF
    options = struct.pack("!BBBBII", 1, 1, 8, 10, tsval, 0)  # NOP NOP timestamp
    header_len = 20 + len(options)
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (header_len // 4) << 4,
                         0x18, 0xFFFF, 0, 0) + options
    pseudo = struct.pack("!4s4sBBH", socket.inet_aton(src), socket.inet_aton(dst), 0,
                         socket.IPPROTO_TCP, header_len + len(payload))
    checksum = _checksum(pseudo + header + payload)
    segment = header[:16] + struct.pack("!H", checksum) + header[18:] + payload
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw:
        raw.sendto(segment, (dst, 0))


def wait_acked(sock: socket.socket, count: int) -> None:
    """Until the peer acknowledged `count` bytes (so its program has seen them)."""
    from sluicegate.stream.sockmap_relay import TCPI_BYTES_ACKED, _tcp_info_u64

    for _ in range(2000):
        if _tcp_info_u64(sock, TCPI_BYTES_ACKED) >= count:
            return
        threading.Event().wait(0.005)
    raise AssertionError(f"the relay never acknowledged {count} bytes")


def test_a_retransmission_overlapping_redirected_bytes_reaches_the_upstream_once(
        start_relay, upstreams):
    received: list[bytes] = []

    def record(conn: socket.socket) -> None:
        conn.sendall(recv_exactly(conn, 4))
        received.append(recv_all(conn))

    server = upstreams(record)
    relay = start_relay([route_to(server.address)])
    first, second = bytes(range(256)) * 16, b"after the overlap " * 64
    with relay.connect() as client:
        assert round_trip_ping(client)  # joined: what follows is redirected
        client.sendall(first)
        wait_acked(client, 4 + len(first))
        send_seq, _ = tcp_sequences(client)
        # The last 1000 bytes of `first` again, then `second`: TCP queues the segment whole.
        send_segment_as(client, (send_seq - 1000) & 0xFFFF_FFFF, first[-1000:] + second)
        client.sendall(second)  # the client's own copy: old by now, dropped by the relay's TCP
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    relay.wait_idle()
    server.join()
    assert received == [first + second]
    connection, = relay.closed  # type: ignore[attr-defined]
    assert connection.bytes_from_client == 4 + len(first) + len(second)
