"""`run --workers N`: worker processes sharing the port, metrics summed over them, SIGTERM
draining, and a killed worker coming back."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families


def config(echo: Any, **gateway: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "global_rules": [{"id": "metrics", "plugins": {"prometheus": {}}}],
        "routes": [{"id": "echo", "uri": "/*", "upstream": {"nodes": {echo.address: 1}}}]}
    if gateway:
        result["gateway"] = gateway
    return result


def children(pid: int) -> set[int]:
    """Live processes whose parent is `pid` (from /proc/*/stat)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def metrics(gateway: Any) -> dict[str, float]:
    """Samples by name, summed over label sets."""
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def wait_for_workers(gateway: Any, count: int, timeout: float = 15.0) -> dict[str, float]:
    """Until /metrics says `count` workers answer (each has its signal handlers by then).
    With one worker the gateway process is the worker: it has no worker children."""
    processes = count if count > 1 else 0
    deadline = time.monotonic() + timeout
    last: dict[str, float] = {}
    while time.monotonic() < deadline:
        try:
            last = metrics(gateway)
        except OSError:
            last = {}
        if last.get("sluicegate_workers") == count and \
                len(children(gateway.process.pid)) == processes:
            return last
        time.sleep(0.05)
    raise AssertionError(f"{count} workers never became ready: {last}\n{gateway.log()}")


def get(port: int, path: str = "/", timeout: float = 10) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    folder = Path(f"/proc/{pid}/fd")
    for fd in folder.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def accepted_inodes(port: int) -> set[str]:
    """Inodes of established TCP sockets whose local port is `port` (server side)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01":  # ESTABLISHED
            inodes.add(fields[9])
    return inodes


def in_thread(target: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = target()
        except Exception as exc:  # reported by the test that reads result
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


# -- processes ----------------------------------------------------------------------------


def test_two_workers_run_as_children_of_the_gateway(echo, start_gateway):
    gateway = start_gateway(config(echo), workers=2)
    wait_for_workers(gateway, 2)
    workers = children(gateway.process.pid)
    assert len(workers) == 2
    for pid in workers:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"sluicegate" in command and b"worker" in command, command


def test_both_workers_accept_connections_on_the_shared_port(echo, start_gateway):
    gateway = start_gateway(config(echo), workers=2)
    wait_for_workers(gateway, 2)
    connections = []
    try:
        for _ in range(32):
            connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
            connection.request("GET", "/")
            response = connection.getresponse()
            response.read()
            assert response.status == 200
            connections.append(connection)  # kept open: the worker holds its socket
        accepted = accepted_inodes(gateway.port)
        held = {pid: len(socket_inodes(pid) & accepted)
                for pid in children(gateway.process.pid)}
    finally:
        for connection in connections:
            connection.close()
    assert sum(held.values()) == 32, held
    assert all(count > 0 for count in held.values()), held


def test_metrics_report_the_sum_over_workers(echo, start_gateway):
    gateway = start_gateway(config(echo), workers=2)
    wait_for_workers(gateway, 2)
    for i in range(60):
        status, _ = get(gateway.port, f"/n/{i}")
        assert status == 200
    totals = metrics(gateway)
    assert totals["sluicegate_workers"] == 2
    assert totals["sluicegate_http_requests_total"] == 60
    assert totals["sluicegate_http_latency_seconds_count"] == 120  # request + upstream
    assert totals["sluicegate_upstream_responses_total"] == 60


# -- SIGTERM ------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_refuses_new_connections_finishes_the_in_flight_request_and_exits_0(
        echo, start_gateway, workers):
    gateway = start_gateway(config(echo), workers=workers)
    wait_for_workers(gateway, workers)
    worker_pids = children(gateway.process.pid)
    thread, result = in_thread(lambda: get(gateway.port, "/slow?delay=2"))
    time.sleep(0.4)  # the request is at the upstream now
    gateway.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 1.0
    while not refused(gateway.port) and time.monotonic() < deadline:
        time.sleep(0.02)
    refused_while_draining = refused(gateway.port) and thread.is_alive()
    thread.join(10)
    assert refused_while_draining, "a new connection was accepted after SIGTERM"
    assert "error" not in result, result.get("error")
    status, body = result["value"]
    assert status == 200
    assert json.loads(body)["target"] == "/slow?delay=2"
    assert gateway.process.wait(15) == 0, gateway.log()
    assert not any(alive(pid) for pid in worker_pids)


def test_sigterm_drain_is_bounded_by_drain_timeout(echo, start_gateway):
    gateway = start_gateway(config(echo, drain_timeout=0.5))
    wait_for_workers(gateway, 1)
    thread, result = in_thread(lambda: get(gateway.port, "/slow?delay=5"))
    time.sleep(0.3)
    started = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    code = gateway.process.wait(10)
    stopped_after = time.monotonic() - started
    thread.join(10)
    assert code == 0
    assert stopped_after < 3.0, f"took {stopped_after:.1f}s with drain_timeout 0.5s"
    assert "error" in result  # the unfinished request was cut


def test_sigterm_right_after_start_exits_0(echo, start_gateway):
    # A stop that arrives while a worker is still starting is still a clean stop.
    # (Three tries: a worker is still starting in about half of them.)
    codes = []
    for _ in range(3):
        gateway = start_gateway(config(echo), workers=2)
        codes.append(gateway.stop())
    assert codes == [0] * 3


# -- a worker dies ------------------------------------------------------------------------


def test_killed_worker_is_restarted_and_traffic_still_flows(echo, start_gateway):
    gateway = start_gateway(config(echo), workers=2)
    wait_for_workers(gateway, 2)
    before = children(gateway.process.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    after: set[int] = set()
    while time.monotonic() < deadline:
        after = children(gateway.process.pid)
        if len(after) == 2 and victim not in after:
            break
        time.sleep(0.05)
    assert len(after) == 2 and victim not in after, (before, after)
    assert after & before == before - {victim}
    totals = wait_for_workers(gateway, 2)
    assert totals["sluicegate_worker_restarts"] == 1
    for i in range(40):
        status, _ = get(gateway.port, f"/after/{i}")
        assert status == 200
    assert gateway.process.poll() is None
