"""TCP relay throughput: the asyncio copy path vs the os.splice path vs no relay at all.

    .venv/bin/python bench/stream_copy.py                  # 1 GiB, 3 runs, python + iperf3 peers
    .venv/bin/python bench/stream_copy.py --runs 1 --bytes 256M --no-iperf3   # a quick look
    .venv/bin/python bench/stream_copy.py --pipe-bytes 65536 --write-buffer-high 65536

Each case moves ``--bytes`` one way over loopback, source → [relay] → sink:

- ``direct``: the source connects straight to the sink (the ceiling);
- ``copy`` / ``splice``: through a `StreamServer` (one route, one node) in its own process.

Peers: ``python`` (a sink process and a source process, 1 MiB ``sendall`` / ``recv_into``)
and, unless ``--no-iperf3``, ``iperf3`` (``-s`` and ``-c -n BYTES``). Pinning: the relay
alone on ``--relay-cpu`` (1), source and sink on ``--peer-cpu`` (0), as bench/peers.sh does
for the HTTP proxies. Reported per case: Gbit/s (median of ``--runs``); the relay process's
CPU seconds (utime + stime from /proc/PID/stat); the busy seconds of the relay's core from
/proc/stat (user + system + irq + softirq: on loopback the receiver's TCP stack runs in the
sender's softirq and is not charged to any process, so this is the relay's full cost); the
receiver's CPU seconds. All sampled right before and after the transfer. "Gbit per relay CPU
s" (bits moved / relay process CPU seconds) estimates what one core of relay could carry when
the peers are not the limit (with 2 CPUs, source and sink share one and often are). On a
shared machine, a core busy well above the relay's own CPU means other load ran on that core
and the Gbit/s of that run is low for that reason. Progress goes to stderr, a Markdown table
to stdout. Exit status 0 when every case ran, 1 when one failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
BLOCK = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def core_busy_seconds(cpu: int) -> float:
    """Busy time of one CPU (user, nice, system, irq, softirq) from /proc/stat, in seconds.
    On loopback much of a sender's cost is the receiver's TCP stack run in softirq, which
    /proc/PID/stat does not charge to the process: the relay's pinned core shows it."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, _idle, _iowait, irq, softirq = map(int, line.split()[1:8])
            return (user + nice + system + irq + softirq) / CLK_TCK
    raise ValueError(f"no cpu{cpu} in /proc/stat")


def pin(cpu: int | None) -> None:
    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError as exc:
            print(f"cannot pin to CPU {cpu}: {exc}", file=sys.stderr)


# -- roles run as subprocesses ------------------------------------------------------------

def role_sink(args: argparse.Namespace) -> None:
    """Accept one connection, read to EOF, print {bytes, end} as JSON."""
    pin(args.cpu)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    total = 0
    while n := conn.recv_into(view):
        total += n
    end = time.monotonic()
    conn.close()
    print(json.dumps({"bytes": total, "end": end}), flush=True)


def role_source(args: argparse.Namespace) -> None:
    """Connect, send --bytes, shut down writing, wait for the close; print {start}."""
    pin(args.cpu)
    block = os.urandom(BLOCK)
    sock = socket.create_connection(("127.0.0.1", args.port))
    start = time.monotonic()
    remaining = args.bytes
    while remaining >= BLOCK:
        sock.sendall(block)
        remaining -= BLOCK
    if remaining:
        sock.sendall(block[:remaining])
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # the relay closes after the sink did
    sock.close()
    print(json.dumps({"start": start}), flush=True)


def role_relay(args: argparse.Namespace) -> None:
    """A StreamServer on a free port to 127.0.0.1:--port; prints its port; runs until
    SIGTERM."""
    import uvloop

    from sluicegate.stream import copy_relay, splice_relay, tcp
    from sluicegate.stream.routes import StreamRoute, StreamRouteTable, StreamUpstream

    pin(args.cpu)
    if args.pipe_bytes:
        splice_relay.SPLICE_PIPE_BYTES = args.pipe_bytes
    if args.write_buffer_high:
        copy_relay.COPY_WRITE_BUFFER_HIGH = args.write_buffer_high

    async def serve() -> None:
        upstream = StreamUpstream.from_nodes([("127.0.0.1", args.port)])
        server = tcp.StreamServer(StreamRouteTable([StreamRoute("bench", upstream=upstream)]),
                                  splice=args.mode == "splice")
        sock = server.listen("127.0.0.1", 0)
        print(sock.getsockname()[1], flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    uvloop.run(serve())


# -- the driver ---------------------------------------------------------------------------

def spawn(role: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, role, *extra], stdout=subprocess.PIPE,
                            text=True)


def start_relay(mode: str, upstream_port: int, args: argparse.Namespace
                ) -> tuple[subprocess.Popen[str], int]:
    extra = ["--mode", mode, "--port", str(upstream_port), "--cpu", str(args.relay_cpu)]
    if args.pipe_bytes:
        extra += ["--pipe-bytes", str(args.pipe_bytes)]
    if args.write_buffer_high:
        extra += ["--write-buffer-high", str(args.write_buffer_high)]
    relay = spawn("relay", *extra)
    assert relay.stdout is not None
    return relay, int(relay.stdout.readline())


def stop_relay(relay: subprocess.Popen[str] | None) -> None:
    if relay is not None and relay.poll() is None:
        relay.send_signal(signal.SIGTERM)
        try:
            relay.wait(10)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait()


def run_python(mode: str, args: argparse.Namespace) -> dict[str, float]:
    sink = spawn("sink", "--cpu", str(args.peer_cpu))
    relay = None
    try:
        assert sink.stdout is not None
        sink_port = int(sink.stdout.readline())
        port = sink_port
        if mode != "direct":
            relay, port = start_relay(mode, sink_port, args)
        relay_cpu0 = cpu_seconds(relay.pid) if relay else 0.0
        core0 = core_busy_seconds(args.relay_cpu)
        sink_cpu0 = cpu_seconds(sink.pid)
        source = spawn("source", "--port", str(port), "--bytes", str(args.bytes),
                       "--cpu", str(args.peer_cpu))
        source_out, _ = source.communicate(timeout=args.timeout)
        # The source's CPU: its children's times are not visible after exit; measure it
        # from its own report instead of /proc. (It is the same in every case.)
        sink_line = sink.stdout.readline()
        relay_cpu = cpu_seconds(relay.pid) - relay_cpu0 if relay else 0.0
        core = core_busy_seconds(args.relay_cpu) - core0
        sink_cpu = cpu_seconds(sink.pid) - sink_cpu0
        sink.wait(10)
        result = json.loads(sink_line)
        start = json.loads(source_out)["start"]
        if result["bytes"] != args.bytes:
            raise RuntimeError(f"sink got {result['bytes']} bytes, expected {args.bytes}")
        seconds = result["end"] - start
        return {"gbit": args.bytes * 8 / seconds / 1e9, "seconds": seconds,
                "relay_cpu": relay_cpu, "core": core, "peer_cpu": sink_cpu}
    finally:
        stop_relay(relay)
        if sink.poll() is None:
            sink.kill()
            sink.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = 5.0) -> None:
    """Wait for a TCP listener on 127.0.0.1:port by reading /proc/net/tcp: a probe
    connection would count as iperf3's one client."""
    needle = f"0100007F:{port:04X} 00000000:0000 0A"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in Path("/proc/net/tcp").read_text():
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on port {port}")


def run_iperf3(mode: str, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    cpu = str(args.peer_cpu)
    server = subprocess.Popen(["iperf3", "-s", "-p", str(port), "-A", cpu,
                               "-B", "127.0.0.1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    relay = None
    try:
        wait_listening(port)
        target = port
        if mode != "direct":
            relay, target = start_relay(mode, port, args)
        relay_cpu0 = cpu_seconds(relay.pid) if relay else 0.0
        core0 = core_busy_seconds(args.relay_cpu)
        server_cpu0 = cpu_seconds(server.pid)
        client = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(target), "-n",
                                 str(args.bytes), "-A", cpu, "-J"], capture_output=True,
                                text=True, timeout=args.timeout)
        relay_cpu = cpu_seconds(relay.pid) - relay_cpu0 if relay else 0.0
        core = core_busy_seconds(args.relay_cpu) - core0
        server_cpu = cpu_seconds(server.pid) - server_cpu0
        report = json.loads(client.stdout)
        if "error" in report:
            raise RuntimeError(report["error"])
        received = report["end"]["sum_received"]
        return {"gbit": received["bits_per_second"] / 1e9, "seconds": received["seconds"],
                "relay_cpu": relay_cpu, "core": core, "peer_cpu": server_cpu}
    finally:
        stop_relay(relay)
        if server.poll() is None:
            server.kill()
        server.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", nargs="?", default="bench",
                        choices=["bench", "sink", "source", "relay"], help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=parse_size, default=1 << 30,
                        help="bytes per transfer (1G)")
    parser.add_argument("--runs", type=int, default=3, help="runs per case (3)")
    parser.add_argument("--cases", default="direct,copy,splice",
                        help="comma-separated: direct,copy,splice")
    parser.add_argument("--no-iperf3", action="store_true", help="skip the iperf3 peer runs")
    parser.add_argument("--relay-cpu", type=int, default=1)
    parser.add_argument("--peer-cpu", type=int, default=0)
    parser.add_argument("--pipe-bytes", type=int, default=0,
                        help="override SPLICE_PIPE_BYTES")
    parser.add_argument("--write-buffer-high", type=int, default=0,
                        help="override COPY_WRITE_BUFFER_HIGH")
    parser.add_argument("--timeout", type=float, default=120.0)
    # role options
    parser.add_argument("--mode", default="copy")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cpu", type=int, default=None)
    args = parser.parse_args(argv)
    if args.role == "sink":
        role_sink(args)
        return 0
    if args.role == "source":
        role_source(args)
        return 0
    if args.role == "relay":
        role_relay(args)
        return 0
    if os.cpu_count() is not None and max(args.relay_cpu, args.peer_cpu) >= os.cpu_count():
        print("not enough CPUs for the pinning; use --relay-cpu/--peer-cpu", file=sys.stderr)
        return 1
    peers = [("python", run_python)]
    if not args.no_iperf3:
        peers.append(("iperf3", run_iperf3))
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    rows: list[tuple[str, str, list[dict[str, float]]]] = []
    failed = False
    for peer, runner in peers:
        for case in cases:
            results = []
            for run in range(args.runs):
                try:
                    result = runner(case, args)
                except Exception as exc:
                    print(f"{peer} {case} run {run + 1}: FAILED: {exc}", file=sys.stderr)
                    failed = True
                    continue
                print(f"{peer} {case} run {run + 1}: {result['gbit']:.2f} Gbit/s, relay "
                      f"process CPU {result['relay_cpu']:.2f} s, relay core busy "
                      f"{result['core']:.2f} s, receiver CPU {result['peer_cpu']:.2f} s",
                      file=sys.stderr)
                results.append(result)
            rows.append((peer, case, results))
    size = f"{args.bytes / (1 << 30):g} GiB" if args.bytes >= 1 << 30 else \
        f"{args.bytes / (1 << 20):g} MiB"
    print(f"\n{size} one way over loopback, median of {args.runs} runs; relay on CPU "
          f"{args.relay_cpu}, peers on CPU {args.peer_cpu}\n")
    print("| peer | case | Gbit/s | vs direct | relay process CPU s | Gbit per relay CPU s | "
          "relay core busy s | receiver CPU s | runs (Gbit/s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    direct: dict[str, float] = {}
    gib = args.bytes / (1 << 30)
    for peer, case, results in rows:
        if not results:
            print(f"| {peer} | {case} | failed | | | | | | |")
            continue
        gbit = statistics.median(r["gbit"] for r in results)
        relay_cpu = statistics.median(r["relay_cpu"] for r in results)
        core = statistics.median(r["core"] for r in results)
        peer_cpu = statistics.median(r["peer_cpu"] for r in results)
        if case == "direct":
            direct[peer] = gbit
        ratio = f"{gbit / direct[peer]:.2f}" if peer in direct else ""
        runs = ", ".join(f"{r['gbit']:.2f}" for r in results)
        if case == "direct":
            relay = busy = capacity = "-"
        else:
            relay, busy = f"{relay_cpu:.2f}", f"{core:.2f}"
            capacity = f"{gib * 8 * 1.073741824 / relay_cpu:.1f}" if relay_cpu else "-"
        print(f"| {peer} | {case} | {gbit:.2f} | {ratio} | {relay} | {capacity} | {busy} | "
              f"{peer_cpu:.2f} | {runs} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
