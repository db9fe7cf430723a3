"""`--workers N`: N worker processes sharing the listen ports with SO_REUSEPORT.

The supervisor serves `/metrics` (the sum over workers, asked over a socketpair per worker
at scrape time), forwards SIGHUP, restarts a worker that dies, and on SIGTERM stops all
workers (each drains) and exits 0 when they all did. Each worker follows the config store
(`--store`, passed on) by itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sluicegate.bpf.kernel import KernelTraffic, KernelTrafficError
from sluicegate.config.load import ValidatedConfig
from sluicegate.config.model import parse_listen
from sluicegate.http.health import has_checks, healthcheck_response, merge_reports
from sluicegate.http.snapshot import compile_snapshot
from sluicegate.intercept.entries import InterceptionOwner, intercept_entries
from sluicegate.intercept.tproxy import InterceptError
from sluicegate.limits.counters import LIMITS_DIR_ENV
from sluicegate.observe.exposition import serve_metrics
from sluicegate.observe.metrics import merge_snapshots
from sluicegate.plugins.base import PluginEnv
from sluicegate.store.open import open_store
from sluicegate.worker import stop_requested

log = logging.getLogger("sluicegate")

SCRAPE_TIMEOUT = 2.0
# Extra time beyond drain_timeout a worker gets to exit before it is killed.
STOP_GRACE = 5.0
WORKER_START_TIMEOUT = 30.0


class WorkerHandle:
    def __init__(self, index: int, process: subprocess.Popen[bytes],
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.process = process
        self.reader = reader
        self.writer = writer
        self.lock = asyncio.Lock()

    async def metrics(self) -> dict[str, Any] | None:
        async with self.lock:
            try:
                self.writer.write(b"M")
                await self.writer.drain()
                size = struct.unpack("!I", await asyncio.wait_for(
                    self.reader.readexactly(4), SCRAPE_TIMEOUT))[0]
                payload = await asyncio.wait_for(self.reader.readexactly(size), SCRAPE_TIMEOUT)
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                return None
        return pickle.loads(payload)  # our own worker, over a private socketpair


class Supervisor:
    def __init__(self, config_path: str | Path, validated: ValidatedConfig, workers: int,
                 log_level: str = "info", store_url: str | None = None) -> None:
        self.config_path = str(config_path)
        self.store_url = store_url
        self.store = open_store(store_url, config_path)  # for the Admin API run here
        self.validated = validated
        self.count = workers
        self.log_level = log_level
        self.workers: dict[int, WorkerHandle] = {}
        self.stopping = False
        self.restarts = 0
        # Shared-memory rate-limit counters: one table for all workers (exact limits).
        self.limits_dir: str | None = None
        self.owns_limits_dir = False
        # Per worker: listener fds it inherits and the env naming them (eBPF mode).
        self.shared: list[tuple[list[int], dict[str, str]]] = []
        self.kernel: KernelTraffic | None = None  # the `kernel:` block (owned here)

    async def start_worker(self, index: int) -> None:
        parent, child = socket.socketpair()
        command = [sys.executable, "-m", "sluicegate", "--log-level", self.log_level, "worker",
                   "-c", self.config_path, "--index", str(index),
                   "--control-fd", str(child.fileno())]
        if self.store_url is not None:
            command += ["--store", self.store_url]
        fds, shared_env = self.shared[index] if index < len(self.shared) else ([], {})
        env = {**os.environ, **shared_env}
        if self.limits_dir:
            env[LIMITS_DIR_ENV] = self.limits_dir
        process = subprocess.Popen(command, pass_fds=[child.fileno(), *fds], env=env)
        child.close()
        reader, writer = await asyncio.open_connection(sock=parent)
        self.workers[index] = WorkerHandle(index, process, reader, writer)
        try:  # the worker says when it handles signals and serves
            ready = await asyncio.wait_for(reader.readexactly(1), WORKER_START_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError):
            ready = b""
        if ready != b"R":
            log.error("worker %d did not start", index)

    async def gather_metrics(self) -> dict[str, Any]:
        results = await asyncio.gather(*(w.metrics() for w in self.workers.values()))
        snaps = [r for r in results if r is not None]
        merged = merge_snapshots(snaps)
        merged["gauges"]["workers"] = len(snaps)
        merged["gauges"]["worker_restarts"] = self.restarts
        if self.kernel is not None:
            merged["kernel"] = self.kernel.metrics()  # read from the maps now
        return merged

    async def gather_healthcheck(self, path: str) -> tuple[int, Any]:
        results = await asyncio.gather(*(w.metrics() for w in self.workers.values()))
        report = merge_reports(r.get("healthcheck", []) for r in results if r is not None)
        return healthcheck_response(report, path)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        if stop_requested():
            stop.set()
        self.limits_dir = os.environ.get(LIMITS_DIR_ENV)  # an operator's dir wins, kept
        if not self.limits_dir:
            self.limits_dir = tempfile.mkdtemp(
                prefix="sluicegate-limits-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            self.owns_limits_dir = True
        try:
            return await self._run_workers(stop)
        finally:
            await self.store.close()
            if self.owns_limits_dir:
                shutil.rmtree(self.limits_dir, ignore_errors=True)

    async def _run_workers(self, stop: asyncio.Event) -> int:
        # The supervisor outlives its workers: it owns the interception rules (and in
        # eBPF mode the transparent listeners, which the workers inherit).
        owner = InterceptionOwner(intercept_entries(self.validated.config))
        kernel = self.kernel = KernelTraffic(self.validated.config.kernel)
        self.shared = owner.share_listeners(self.count)
        for index in range(self.count):
            await self.start_worker(index)
        if any(w.process.poll() is not None for w in self.workers.values()):
            log.error("a worker failed to start; stopping")
            stop.set()
        try:
            if not stop.is_set():
                owner.install()
                kernel.install()  # after interception, which clears the shared bpffs folder
            return await self._serve(stop)
        except InterceptError as exc:
            log.error("cannot intercept: %s", exc)
            self._forward(signal.SIGTERM)
            await asyncio.gather(*(self._wait(w, STOP_GRACE) for w in self.workers.values()))
            return 4
        except KernelTrafficError as exc:
            log.error("cannot start: %s", exc)
            self._forward(signal.SIGTERM)
            await asyncio.gather(*(self._wait(w, STOP_GRACE) for w in self.workers.values()))
            return exc.exit_code
        finally:
            kernel.remove()
            owner.remove()

    async def _serve(self, stop: asyncio.Event) -> int:
        settings = self.validated.config.gateway
        snapshot = compile_snapshot(self.validated.config, PluginEnv())
        metrics_server = None
        if (snapshot.metrics_enabled or has_checks(snapshot)) and not stop.is_set():
            host, port = parse_listen(settings.metrics_listen)
            metrics_server = await serve_metrics(host, port, self.gather_metrics,
                                                 self.gather_healthcheck)
        # The Admin API runs in one process: with several workers, here.
        admin, admin_failed = None, False
        if not stop.is_set():
            from sluicegate.admin.server import start_admin_server

            try:
                admin = await start_admin_server(self.validated.config.admin,
                                                 self.store, self.config_path,
                                                 self.validated.config.dashboard,
                                                 self.gather_metrics)
            except OSError as exc:
                log.error("cannot start: %s", exc.strerror or exc)
                stop.set()
                admin_failed = True
        log.info("supervisor started %d workers", self.count)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                await self._restart_dead()
        self.stopping = True
        if metrics_server is not None:
            metrics_server.close()
        if admin is not None:
            await admin.stop()
        self._forward(signal.SIGTERM)
        deadline = settings.drain_timeout + STOP_GRACE
        codes = await asyncio.gather(*(self._wait(w, deadline) for w in self.workers.values()))
        if admin_failed:
            return 4  # ExitCode.RUNTIME_ERROR: cannot start
        return 0 if all(code == 0 for code in codes) else 1

    async def _wait(self, worker: WorkerHandle, timeout: float) -> int:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(None, worker.process.wait),
                                          timeout)
        except TimeoutError:
            log.error("worker %d did not stop in time; killing it", worker.index)
            worker.process.kill()
            return 1

    async def _restart_dead(self) -> None:
        for index, worker in list(self.workers.items()):
            code = worker.process.poll()
            if code is not None and not self.stopping:
                log.error("worker %d exited with %s; restarting it", index, code)
                worker.writer.close()
                self.restarts += 1
                await self.start_worker(index)

    def _forward(self, signum: int) -> None:
        for worker in self.workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signum)
