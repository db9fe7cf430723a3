"""One gateway worker process: config snapshot, listeners, metrics, signals, drain.

SIGTERM/SIGINT drain in-flight requests (bounded by `gateway.drain_timeout`) and exit 0.
SIGHUP re-reads the config file: a bad file is rejected whole and the running config stays.
The worker also follows its config store (the file itself, polled, or etcd): each new state
is validated, compiled and swapped in by the same path as SIGHUP, all or nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from sluicegate.bpf.kernel import KernelTraffic, KernelTrafficError
from sluicegate.config.load import (
    ConfigError,
    ValidatedConfig,
    load_config_file,
    validate_config,
)
from sluicegate.config.model import parse_listen
from sluicegate.config.tls import https_listen_addresses
from sluicegate.http.clock import CLOCK
from sluicegate.http.health import HealthCheckers, has_checks, healthcheck_response
from sluicegate.http.https import listen_https
from sluicegate.http.server import HttpServer
from sluicegate.http.snapshot import Snapshot, compile_snapshot
from sluicegate.intercept.entries import (
    InterceptEntry,
    InterceptionOwner,
    intercept_entries,
    transparent_socket,
)
from sluicegate.intercept.tproxy import InterceptError
from sluicegate.observe.exposition import serve_metrics
from sluicegate.observe.metrics import MetricsStore
from sluicegate.plugins.base import PluginEnv
from sluicegate.store.base import ConfigStore, StoreError, StoreState
from sluicegate.stream.plane import StreamPlane

log = logging.getLogger("sluicegate")

# The most of a worker's time that applying store changes may take (see Worker._follow).
APPLY_SHARE = 0.1

_stop_requested = False


def capture_stop_signals() -> None:
    """Remember a SIGTERM/SIGINT that arrives before the event loop handles signals, so a
    stop during start-up is still a clean stop."""

    def remember(signum: int, frame: Any) -> None:
        global _stop_requested
        _stop_requested = True

    signal.signal(signal.SIGTERM, remember)
    signal.signal(signal.SIGINT, remember)


def stop_requested() -> bool:
    return _stop_requested


class Worker:
    """Serves traffic on this process's event loop."""

    def __init__(self, config_path: str | Path | None, validated: ValidatedConfig,
                 reuse_port: bool = False, control: socket.socket | None = None,
                 index: int = 0, owns_interception: bool = True,
                 store: ConfigStore | None = None) -> None:
        self.owns_interception = owns_interception
        self.store = store  # followed while serving; None: the file, on SIGHUP only
        self.state: StoreState | None = None  # the store state being served
        self.follower: asyncio.Task[None] | None = None
        self.started_at = time.monotonic()
        self.config_path = config_path
        self.validated = validated
        self.reuse_port = reuse_port
        self.control = control
        self.index = index
        self.metrics = MetricsStore()
        self.version = 1
        self.server: HttpServer | None = None
        self.stopping: asyncio.Event | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.health = HealthCheckers()  # upstream health state and probe tasks
        self.stream: StreamPlane | None = None
        self.intercept_mode = "tproxy"  # of the transparent entry, for stream metrics
        self.kernel: KernelTraffic | None = None  # the `kernel:` block, when we own it

    def compile(self, validated: ValidatedConfig) -> Snapshot:
        return compile_snapshot(validated.config, PluginEnv(metrics=self.metrics), self.version)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if stop_requested():
            self.stopping.set()
        CLOCK.start(loop)
        if self.store is not None:
            await self._load_from_store()
        snapshot = self.compile(self.validated)
        self.health.attach(snapshot)
        self.server = server = HttpServer(snapshot)
        CLOCK.extra.append(server.tick)
        for address in snapshot.config.gateway.listen:
            host, port = parse_listen(address)
            await server.listen(host, port, self.reuse_port)
        await listen_https(server, snapshot.config, self.reuse_port)
        entries = intercept_entries(snapshot.config)
        self.intercept_mode = next((e.mode for e in entries if e.spec), "tproxy")
        await self._listen_for_entries(entries)
        self.stream = StreamPlane(snapshot.config, self.reuse_port, self._stream_closed)
        self.stream.start(entries)
        CLOCK.extra.append(self.stream.tick)
        # Rules after listeners: nothing is captured before a socket can take it.
        owner = InterceptionOwner(entries) if self.owns_interception else None
        # The `kernel:` block has the same owner. After interception: installing that
        # clears the bpffs folder both share.
        if self.owns_interception:
            self.kernel = KernelTraffic(snapshot.config.kernel)
        try:
            if owner is not None:
                owner.install()
            if self.kernel is not None:
                self.kernel.install()
            if self.store is not None:
                self.follower = loop.create_task(self._follow(self.store))
            return await self._serve(snapshot)
        except InterceptError as exc:
            log.error("cannot intercept: %s", exc)
            await server.drain(0)
            return 4
        except KernelTrafficError as exc:
            log.error("cannot start: %s", exc)
            await server.drain(0)
            return exc.exit_code
        finally:
            if self.follower is not None:
                self.follower.cancel()
                await asyncio.gather(self.follower, return_exceptions=True)
            if self.store is not None:
                await self.store.close()
            if self.kernel is not None:
                self.kernel.remove()
            if owner is not None:
                owner.remove()
            CLOCK.stop()

    async def _load_from_store(self) -> None:
        """Start from the store's current state. When it cannot answer now, start with the
        config handed in (read by the CLI) and let the follower catch up."""
        assert self.store is not None
        try:
            state = await self.store.load()
            self.validated = validate_config(state.document())
        except (StoreError, ConfigError) as exc:
            log.error("config store %r: cannot load (%s); starting with the local file's "
                      "config, following the store until it answers", self.store, exc)
            return
        self.state = state

    async def _follow(self, store: ConfigStore) -> None:
        """Apply the states the store yields; a rejected one leaves the running config.

        Validating and compiling a whole config blocks this worker's loop (~1-2 ms for 60
        resources), so under a stream of changes (bench/reload.py: 100 Admin API changes/s
        through etcd, one watch event each) applying every state made p99 5x the idle
        one. The feed is read as it comes; the newest state is applied at once when the
        worker has been quiet, else once APPLY_SHARE of the time since the last apply has
        passed: applies take at most ~APPLY_SHARE of the loop, states in between are
        skipped (the newest one holds them all)."""
        latest: list[StoreState] = []
        arrived = asyncio.Event()

        async def read_feed() -> None:
            after = self.state or StoreState(0, {})
            while True:
                try:
                    async for state in store.watch(after):
                        after = state
                        latest[:] = [state]
                        arrived.set()
                except Exception:
                    # The feed must not end silently: that would freeze the config.
                    log.exception("config store %r: following failed; starting again", store)
                    await asyncio.sleep(1.0)

        reader = asyncio.get_running_loop().create_task(read_feed())
        try:
            next_apply = 0.0
            while True:
                await arrived.wait()
                wait = next_apply - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                arrived.clear()
                state = latest.pop()
                started = time.monotonic()
                self._apply_state(state)
                took = time.monotonic() - started
                next_apply = started + took / APPLY_SHARE
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    def _apply_state(self, state: StoreState) -> None:
        try:
            validated = validate_config(state.document())
        except ConfigError as exc:
            _log_rejected(exc)
            return
        except Exception:
            log.exception("config from the store could not be validated; still serving "
                          "the previous config")
            return
        if self.apply(validated):
            self.state = state

    async def _listen_for_entries(self, entries: list[InterceptEntry]) -> None:
        assert self.server is not None
        for entry in entries:
            if entry.spec is not None and not entry.http:
                continue  # intercepted TCP relayed at L4 (and UDP): the stream plane's
            for host in entry.listen_hosts:
                if entry.spec is None:
                    await self.server.listen(host, entry.port, self.reuse_port, scope=entry.scope)
                else:
                    sock = transparent_socket(host, entry.port, "tcp",
                                              reuse_port=self.reuse_port)
                    await self.server.listen_socket(sock, entry.scope, entry.mode)

    async def _serve(self, snapshot: Snapshot) -> int:
        server = self.server
        assert server is not None and self.stopping is not None
        metrics_server = None
        # The listener also answers GET /v1/healthcheck (APISIX's control API).
        if self.control is None and (snapshot.metrics_enabled or has_checks(snapshot)):
            host, port = parse_listen(snapshot.config.gateway.metrics_listen)
            metrics_server = await serve_metrics(host, port, self._local_metrics,
                                                 self._healthcheck)
        # The Admin API runs in one process: this worker when it is the only one (else the
        # supervisor runs it).
        admin = None
        if self.control is None:
            from sluicegate.admin.server import start_admin_server

            admin = await start_admin_server(snapshot.config.admin,
                                             self.store, self.config_path,
                                             snapshot.config.dashboard, self._local_metrics)
        if self.control is not None:
            self.control.send(b"R")  # ready: the supervisor may now forward signals
            self._spawn(self._answer_control())
        listening = ", ".join(snapshot.config.gateway.listen + [
            f"https {address}" for address in https_listen_addresses(snapshot.config)])
        log.info("worker %d (pid %d) serving %d routes on %s", self.index, os.getpid(),
                 len(snapshot.routes), listening)
        await self.stopping.wait()
        log.info("worker %d draining (up to %.0fs)", self.index,
                 snapshot.config.gateway.drain_timeout)
        if metrics_server is not None:
            metrics_server.close()
        if admin is not None:
            await admin.stop()
        self.health.stop()
        clean = await server.drain(server.snapshot.config.gateway.drain_timeout)
        if self.stream is not None:
            await self.stream.drain(server.snapshot.config.gateway.drain_timeout)
        # The AI gateway's provider session, when a request made one (looked up, not
        # imported: a gateway without AI routes never loads aiohttp's client).
        provider_client = sys.modules.get("sluicegate.ai.provider_client")
        if provider_client is not None:
            await provider_client.close()
        from sluicegate.observe.access_log import flush_all

        flush_all()
        log.info("worker %d stopped%s", self.index, "" if clean else " (drain timed out)")
        return 0

    def reload(self) -> None:
        """SIGHUP: re-read the config file (with a store: what comes from the file, see
        `ConfigStore.reread_base`) and apply it; all or nothing."""
        if self.server is None:
            return
        state = None
        try:
            if self.store is not None:
                state = self.store.reread_base(self.state or StoreState(0, {}))
                validated = validate_config(state.document())
            elif self.config_path is not None:
                validated = load_config_file(self.config_path)
            else:
                return
        except ConfigError as exc:
            _log_rejected(exc)
            return
        except Exception:
            log.exception("config reload failed, still serving the previous config")
            return
        if self.apply(validated) and state is not None:
            self.state = state

    def apply(self, validated: ValidatedConfig) -> bool:
        """Compile a validated config and swap it in, all or nothing; False if rejected.
        In-flight requests finish on the snapshot they started with."""
        if self.server is None:
            return False
        try:
            self.version += 1
            snapshot = self.compile(validated)
        except ConfigError as exc:
            _log_rejected(exc)
            return False
        except Exception:
            log.exception("config reload failed, still serving the previous config")
            return False
        if snapshot.unavailable:
            log.error("config reload rejected: %s", "; ".join(snapshot.unavailable))
            return False
        if intercept_entries(snapshot.config) != intercept_entries(self.server.snapshot.config):
            # Listeners and kernel rules are set up at start; swapping them live is not
            # built yet, and applying the rest alone would be a half-applied config.
            log.error("config reload rejected: the tproxy (interception) entries changed; "
                      "restart sluicegate to apply them")
            return False
        if snapshot.config.kernel != self.server.snapshot.config.kernel:
            # Attached at start, like interception (and owned by the supervisor with
            # several workers): rejected whole rather than half-applied.
            log.error("config reload rejected: the kernel block changed; restart sluicegate "
                      "to apply it")
            return False
        old = self.server.snapshot.config.gateway
        if snapshot.config.gateway.listen != old.listen:
            log.warning("gateway.listen changed: restart to apply new listeners")
        if https_listen_addresses(snapshot.config) != \
                https_listen_addresses(self.server.snapshot.config):
            log.warning("HTTPS listeners changed (gateway.https_listen or ssls): restart to "
                        "apply them; certificates are applied now")
        self.health.attach(snapshot)  # before traffic sees it: the state carries over
        self.server.swap(snapshot)
        if self.stream is not None:
            self.stream.swap(snapshot.config)
        log.info("config reloaded (version %d, %d routes)", self.version, len(snapshot.routes))
        return True

    def _stream_closed(self, protocol: str, flow: Any) -> None:
        route = flow.route.id if flow.route is not None else ""
        self.metrics.record_stream(protocol, route or "", flow.bytes_from_client,
                                   flow.bytes_from_upstream)
        destination = getattr(flow, "original_destination", None)
        if destination is not None:
            host, port = destination[0], destination[1]
            self.metrics.record_interception(
                self.intercept_mode, f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    def metrics_snapshot(self) -> dict[str, Any]:
        snap = self.metrics.snapshot()
        server = self.server
        if server is not None:
            snap["gauges"]["http_connections"] = len(server.connections)
            snap["gauges"]["upstream_idle_connections"] = server.pool.idle_count()
            snap["gauges"]["workers"] = 1
        if self.store is not None:
            # How current the served config is; the supervisor merges these by the worst
            # worker (observe/metrics.py GAUGE_MERGE).
            snap["gauges"]["config_revision"] = self.state.revision if self.state else 0
            confirmed = self.store.confirmed_at or self.started_at  # never: since start
            snap["gauges"]["config_age_seconds"] = time.monotonic() - confirmed
            snap["gauges"]["config_stale"] = 1 if self.store.stale else 0
        snap.update(self.health.metrics())
        return snap

    async def _healthcheck(self, path: str) -> tuple[int, Any]:
        return healthcheck_response(self.health.report(), path)

    async def _local_metrics(self) -> dict[str, Any]:
        snap = self.metrics_snapshot()
        snap["gauges"]["config_version"] = self.version
        if self.kernel is not None:
            snap["kernel"] = self.kernel.metrics()  # read from the maps now
        return snap

    async def _answer_control(self) -> None:
        """Answer the supervisor's metric requests: 1 byte in, length-prefixed pickle out."""
        assert self.control is not None
        self.control.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=self.control)
        while True:
            request = await reader.read(1)
            if not request:
                return
            payload = pickle.dumps(self.metrics_snapshot())
            writer.write(struct.pack("!I", len(payload)) + payload)
            await writer.drain()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def _log_rejected(exc: ConfigError) -> None:
    log.error("config reload rejected, still serving the previous config:\n%s",
              "\n".join(f"  {line}" for line in exc.errors))
