"""Upstream health checks (APISIX `upstream.checks`, lua-resty-healthcheck semantics).

Each node of a checked upstream is healthy or unhealthy. Outcomes move counters: while a
node is healthy, failures of one kind in a row (HTTP statuses, TCP failures, timeouts) up to
that kind's threshold make it unhealthy; while it is unhealthy, successes in a row up to
`successes` make it healthy again. A success resets the failure counters and a failure the
success counter; a change of state resets them all. Outcomes come from active probes (sent
by the gateway on a timer) and from passive checks (real traffic, reported by the exchange);
each source applies its own thresholds to the same counters.

On the hot path, unhealthy nodes leave the balancer through the `excluded` set it already
takes for retries: `HealthCheckedBalancer` wraps the upstream's balancer only when checks
are configured, so unchecked upstreams pay nothing, and while every node is healthy a pick
costs one extra call and a test of an empty set. When every node is unhealthy the request
is proxied anyway (APISIX) and counted.

Active probes are `tcp` (a connect is a success), `http` (GET `http_path`, judge the
status) or `https` (the same over TLS: the certificate is verified, as for proxied traffic,
unless `https_verify_certificate` is false; a handshake or verification failure is a TCP
failure).

State lives in the worker (`HealthCheckers`): each worker probes on its own event loop, one
task per checked upstream. A reload carries the state of nodes (by address) over to the new
snapshot when the upstream keeps its id and its `checks`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from sluicegate.config.tls import UpstreamTlsConfig
from sluicegate.http.balancer import Balancer, BalancerContext, UpstreamNode
from sluicegate.http.tls import client_context

if TYPE_CHECKING:
    from sluicegate.config.checks import ActiveCheck, HealthChecks, PassiveCheck
    from sluicegate.config.model import UpstreamConfig
    from sluicegate.http.snapshot import Snapshot, Upstream

log = logging.getLogger("sluicegate.health")

# Outcome kinds; also the names of the counters in /v1/healthcheck (APISIX's names).
SUCCESS, HTTP_FAILURE, TCP_FAILURE, TIMEOUT = "success", "http_failure", "tcp_failure", \
    "timeout_failure"
# The status line of a probe answer longer than this is not HTTP.
MAX_STATUS_LINE = 8 * 1024
PROBE_USER_AGENT = b"sluicegate-healthcheck"


class NodeHealth:
    """The health of one node address in one upstream, and its counters."""

    __slots__ = ("address", "counters", "failures", "healthy", "host", "last_error", "nodes",
                 "pickable", "port", "probe_port", "probe_request", "server_name")

    def __init__(self, node: UpstreamNode) -> None:
        self.address = node.address
        self.host = node.host
        self.port = node.port
        self.healthy = True  # lua-resty-healthcheck adds targets healthy
        self.counters = {SUCCESS: 0, HTTP_FAILURE: 0, TCP_FAILURE: 0, TIMEOUT: 0}
        # Failures counted while healthy: 0 lets a success skip the counters entirely.
        self.failures = 0
        # Every compiled node object at this address (a config may compile an upstream
        # more than once, e.g. a service's inline upstream per route).
        self.nodes: list[UpstreamNode] = [node]
        self.pickable = node.weight > 0
        self.probe_port = node.port
        self.probe_request = b""
        self.server_name = ""  # https probes: the TLS name sent and verified
        self.last_error = ""  # why the last active probe failed, for the log

    def report(self) -> dict[str, Any]:
        return {"ip": self.host, "port": self.port, "hostname": self.host,
                "address": self.address, "status": "healthy" if self.healthy else "unhealthy",
                "counter": dict(self.counters)}


class UpstreamHealth:
    """Health state of one checked upstream, fed by its active prober and by traffic."""

    __slots__ = ("active", "all_down", "by_node", "checks", "conf", "down", "fallbacks", "id",
                 "passive", "passive_bad", "passive_good", "probe_tls", "states")

    def __init__(self, id: str, conf: UpstreamConfig, nodes: list[UpstreamNode]) -> None:
        assert conf.checks is not None
        self.id = id
        self.conf = conf
        self.checks: HealthChecks = conf.checks
        self.active: ActiveCheck | None = conf.checks.active
        self.passive: PassiveCheck | None = conf.checks.passive
        # Status sets for the per-response test; passive type tcp: only connection
        # failures and timeouts count, not statuses.
        passive = self.passive
        judged = passive is not None and passive.type != "tcp"
        self.passive_good = frozenset(passive.healthy.http_statuses if judged else ())
        self.passive_bad = frozenset(passive.unhealthy.http_statuses if judged else ())
        # The node objects now unhealthy: the set the balancer skips. Mutated in place,
        # never replaced (balancers hold this object).
        self.down: set[UpstreamNode] = set()
        self.all_down = False
        self.fallbacks = 0  # picks made while every node was unhealthy
        self.states: dict[str, NodeHealth] = {}
        self.by_node: dict[UpstreamNode, NodeHealth] = {}
        for node in nodes:
            self._track(node)
        self.probe_tls: ssl.SSLContext | None = None
        if self.active is not None and self.active.type != "tcp":
            for state in self.states.values():
                state.probe_request = self._probe_request(state.nodes[0])
        if self.active is not None and self.active.type == "https":
            self.probe_tls = self._probe_context()
            for state in self.states.values():
                state.server_name = self._probe_server_name(state.nodes[0])
        if self.active is not None and self.active.port is not None:
            for state in self.states.values():
                state.probe_port = self.active.port

    def _track(self, node: UpstreamNode) -> None:
        state = self.states.get(node.address)
        if state is None:
            state = self.states[node.address] = NodeHealth(node)
        elif node not in state.nodes:
            state.nodes.append(node)
            state.pickable = state.pickable or node.weight > 0
        self.by_node[node] = state
        if not state.healthy:
            self.down.add(node)

    def _probe_context(self) -> ssl.SSLContext:
        """The upstream's own TLS settings (ca_file, client certificate) when it is an
        https upstream, else the system trust store; verification as
        `https_verify_certificate` says."""
        active = self.active
        assert active is not None
        tls = self.conf.tls or UpstreamTlsConfig()
        settings = tls.model_copy(update={"verify": active.https_verify_certificate})
        return client_context(settings)[0]

    def _probe_server_name(self, node: UpstreamNode) -> str:
        """SNI and the name verified: `active.host`, else the upstream's `tls.sni`, else
        the Host that proxied requests would carry under pass_host rewrite, else the node's
        host (an IP address is verified against the certificate's IP entries)."""
        active = self.active
        assert active is not None
        tls = self.conf.tls
        if active.host:
            return active.host.lower().rstrip(".")
        if tls is not None and tls.sni:
            return tls.sni
        if self.conf.pass_host == "rewrite" and self.conf.upstream_host:
            host = self.conf.upstream_host
            if host.startswith("["):
                return host[1:].partition("]")[0]
            return host.partition(":")[0] if host.count(":") == 1 else host
        return node.host

    def _probe_request(self, node: UpstreamNode) -> bytes:
        active = self.active
        assert active is not None
        # The Host lua-resty-healthcheck sends under APISIX: the rewritten host, else
        # `active.host`, else the node itself.
        if self.conf.pass_host == "rewrite" and self.conf.upstream_host:
            host = self.conf.upstream_host.encode("idna")
        elif active.host:
            host = active.host.encode("idna")
        else:
            host = node.host_header
        extra = [line.encode("latin-1") for line in active.req_headers or []]
        lines = [b"GET " + active.http_path.encode("latin-1") + b" HTTP/1.1"]
        if not any(line.lower().startswith(b"host:") for line in extra):
            lines.append(b"Host: " + host)
        if not any(line.lower().startswith(b"user-agent:") for line in extra):
            lines.append(b"User-Agent: " + PROBE_USER_AGENT)
        lines += extra
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n"

    # -- outcomes ------------------------------------------------------------------------
    def _success(self, state: NodeHealth, threshold: int, source: str) -> None:
        counters = state.counters
        if state.healthy:
            if state.failures:
                state.failures = 0
                counters[HTTP_FAILURE] = counters[TCP_FAILURE] = counters[TIMEOUT] = 0
            return
        if threshold <= 0:
            return
        counters[SUCCESS] += 1
        if counters[SUCCESS] >= threshold:
            self._set(state, True, f"{counters[SUCCESS]} {source} successes")

    def _failure(self, state: NodeHealth, kind: str, threshold: int, source: str) -> None:
        counters = state.counters
        if not state.healthy:
            counters[SUCCESS] = 0
            return
        if threshold <= 0:
            return
        counters[SUCCESS] = 0
        counters[kind] += 1
        state.failures += 1
        if counters[kind] >= threshold:
            self._set(state, False, f"{counters[kind]} {source} {kind.replace('_', ' ')}s")

    def _set(self, state: NodeHealth, healthy: bool, why: str) -> None:
        state.healthy = healthy
        state.failures = 0
        for kind in state.counters:
            state.counters[kind] = 0
        for node in state.nodes:
            if healthy:
                self.down.discard(node)
            else:
                self.down.add(node)
        self._update_all_down()
        if healthy:
            log.warning("upstream %s: node %s is healthy again (%s)", self.id, state.address,
                        why)
        else:
            detail = f"; last: {state.last_error}" if state.last_error else ""
            log.warning("upstream %s: node %s is unhealthy (%s%s)%s", self.id, state.address,
                        why, detail, "; every node is unhealthy, proxying to them anyway"
                        if self.all_down else "")

    def _update_all_down(self) -> None:
        pickable = [s for s in self.states.values() if s.pickable]
        self.all_down = bool(pickable) and not any(s.healthy for s in pickable)

    def passive_status(self, node: UpstreamNode, status: int) -> None:
        """A response head from `node` (the exchange calls this for every final status)."""
        # The common case, a success from a healthy node with no failures counted, costs
        # 0.055 us with the call; a status in neither set 0.04 us (timeit, CPython 3.11).
        if status in self.passive_good:
            state = self.by_node.get(node)
            if state is None or (state.healthy and not state.failures):
                return
            passive = self.passive
            if passive is not None:
                self._success(state, passive.healthy.successes, "passive")
        elif status in self.passive_bad:
            state = self.by_node.get(node)
            passive = self.passive
            if state is not None and passive is not None:
                self._failure(state, HTTP_FAILURE, passive.unhealthy.http_failures, "passive")

    def passive_failure(self, node: UpstreamNode, timed_out: bool) -> None:
        """`node` could not be reached, dropped the connection or timed out before a
        response head."""
        passive = self.passive
        state = self.by_node.get(node)
        if passive is None or state is None:
            return
        if timed_out:
            self._failure(state, TIMEOUT, passive.unhealthy.timeouts, "passive")
        else:
            self._failure(state, TCP_FAILURE, passive.unhealthy.tcp_failures, "passive")

    def probe_result(self, state: NodeHealth, kind: str) -> None:
        active = self.active
        assert active is not None
        if kind == SUCCESS:
            self._success(state, active.healthy.successes, "active")
        elif kind == HTTP_FAILURE:
            self._failure(state, kind, active.unhealthy.http_failures, "active")
        elif kind == TCP_FAILURE:
            self._failure(state, kind, active.unhealthy.tcp_failures, "active")
        elif kind == TIMEOUT:
            self._failure(state, kind, active.unhealthy.timeouts, "active")

    # -- active probes -------------------------------------------------------------------
    async def probe_forever(self) -> None:
        """Probe healthy nodes every `healthy.interval` and unhealthy ones every
        `unhealthy.interval`, `concurrency` probes at a time. Runs until cancelled."""
        active = self.active
        assert active is not None
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(active.concurrency)
        next_healthy = next_unhealthy = loop.time()  # first probe at once: know early
        while True:
            now = loop.time()
            due: list[NodeHealth] = []
            if now >= next_healthy:
                due += [s for s in self.states.values() if s.healthy]
                next_healthy = now + active.healthy.interval
            if now >= next_unhealthy:
                due += [s for s in self.states.values() if not s.healthy]
                next_unhealthy = now + active.unhealthy.interval
            if due:
                await asyncio.gather(*(self._probe(state, limit) for state in due))
            await asyncio.sleep(max(0.0, min(next_healthy, next_unhealthy) - loop.time()))

    async def _probe(self, state: NodeHealth, limit: asyncio.Semaphore) -> None:
        active = self.active
        assert active is not None
        error = ""
        async with limit:
            try:
                kind = await asyncio.wait_for(self.probe_once(state), active.timeout)
            except TimeoutError:
                kind = TIMEOUT
            except ssl.SSLCertVerificationError as exc:
                kind, error = TCP_FAILURE, f"TLS: {exc.verify_message}"
            except ssl.SSLError as exc:  # the handshake failed
                kind, error = TCP_FAILURE, f"TLS: {exc.reason or exc}"
            except (OSError, asyncio.IncompleteReadError):
                kind = TCP_FAILURE  # refused, reset, or closed before a status line
            except ValueError as exc:  # `host` that cannot be a TLS server name
                kind, error = TCP_FAILURE, str(exc)
        state.last_error = error
        if kind is not None:
            self.probe_result(state, kind)

    async def probe_once(self, state: NodeHealth) -> str | None:
        """One probe: the outcome kind, or None for an HTTP status in neither list."""
        active = self.active
        assert active is not None
        if self.probe_tls is not None:
            reader, writer = await asyncio.open_connection(
                state.host, state.probe_port, limit=MAX_STATUS_LINE, ssl=self.probe_tls,
                server_hostname=state.server_name)
        else:
            reader, writer = await asyncio.open_connection(state.host, state.probe_port,
                                                           limit=MAX_STATUS_LINE)
        try:
            if active.type == "tcp":
                return SUCCESS
            writer.write(state.probe_request)
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                return HTTP_FAILURE
        finally:
            writer.close()
        status = parse_status_line(line)
        if status is None:
            return HTTP_FAILURE  # an answer that is not HTTP: the node is not serving
        if status in active.healthy.http_statuses:
            return SUCCESS
        if status in active.unhealthy.http_statuses:
            return HTTP_FAILURE
        return None  # lua-resty-healthcheck: a status in neither list does not count

    # -- reporting, reloads --------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        return {"name": self.id, "type": self.active.type if self.active else "passive",
                "all_unhealthy_total": self.fallbacks,
                "nodes": [state.report() for state in self.states.values()]}

    def adopt(self, upstream: Upstream) -> None:
        """Share this state with another compiled copy of the same upstream."""
        for node in upstream.nodes:
            self._track(node)
        upstream.health = self
        if isinstance(upstream.balancer, HealthCheckedBalancer):
            upstream.balancer.health = self
        self._update_all_down()

    def inherit(self, old: UpstreamHealth) -> None:
        """Take over the state of the same upstream in the previous snapshot: the fallback
        count always, node states (by address) when `checks` did not change."""
        self.fallbacks = old.fallbacks
        if old.checks != self.checks:
            return
        for address, state in self.states.items():
            previous = old.states.get(address)
            if previous is None:
                continue
            state.counters.update(previous.counters)
            state.failures = previous.failures
            if previous.healthy != state.healthy:
                state.healthy = previous.healthy
                for node in state.nodes:
                    if state.healthy:
                        self.down.discard(node)
                    else:
                        self.down.add(node)
        self._update_all_down()


def parse_status_line(line: bytes) -> int | None:
    """`HTTP/1.1 200 OK` → 200; None when the line is not an HTTP status line."""
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or len(parts[1]) != 3 or \
            not parts[1].isdigit():
        return None
    return int(parts[1])


class HealthCheckedBalancer(Balancer):
    """An upstream's balancer that skips the nodes its health checks found unhealthy."""

    __slots__ = ("health", "inner")

    def __init__(self, inner: Balancer, health: UpstreamHealth) -> None:
        super().__init__(inner.nodes)
        self.inner = inner
        self.health = health

    def pick(self, ctx: BalancerContext, excluded: set[UpstreamNode] | None = None
             ) -> UpstreamNode | None:
        # timeit, 3 nodes, CPython 3.11: +0.03 us a pick over the bare balancer while every
        # node is healthy; +0.06-0.09 us with one down (the balancer's `excluded` loop;
        # ewma +0.37 us, its excluded path builds a candidate list).
        health = self.health
        down = health.down
        if not down:
            return self.inner.pick(ctx, excluded)
        if health.all_down:
            # APISIX: with no healthy node, use them all rather than fail every request.
            health.fallbacks += 1
            return self.inner.pick(ctx, excluded)
        return self.inner.pick(ctx, down | excluded if excluded else down)

    def on_request_start(self, node: UpstreamNode) -> None:
        self.inner.on_request_start(node)

    def on_request_end(self, node: UpstreamNode, elapsed_seconds: float, failed: bool) -> None:
        self.inner.on_request_end(node, elapsed_seconds, failed)


def checked_upstreams(snapshot: Snapshot) -> Iterator[Upstream]:
    """Every compiled upstream of a snapshot that has health checks, each object once."""
    seen: set[int] = set()
    candidates: Iterable[Upstream] = [
        *snapshot.upstreams.values(), *(route.upstream for route in snapshot.routes),
        *(scope.fallback.upstream for scope in snapshot.scopes.values())]
    for upstream in candidates:
        if upstream.health is not None and id(upstream) not in seen:
            seen.add(id(upstream))
            yield upstream


def has_checks(snapshot: Snapshot) -> bool:
    return next(checked_upstreams(snapshot), None) is not None


class HealthCheckers:
    """The health state of every checked upstream of a worker and the tasks probing them
    (one per upstream with active checks). `attach` follows the snapshot being served."""

    def __init__(self) -> None:
        self.checked: list[UpstreamHealth] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.probing: list[asyncio.Task[None]] = []

    def attach(self, snapshot: Snapshot) -> None:
        """Track the checked upstreams of `snapshot` (state carried over from the previous
        one) and restart the probes. Call in the event loop, as the snapshot goes live."""
        previous = {health.id: health for health in self.checked}
        checked: list[UpstreamHealth] = []
        for upstream in checked_upstreams(snapshot):
            health = upstream.health
            assert health is not None
            if any(health is known for known in checked):
                continue
            same = next((known for known in checked
                         if known.id == health.id and known.conf == health.conf), None)
            if same is not None:
                same.adopt(upstream)
                continue
            old = previous.get(health.id)
            if old is not None:
                health.inherit(old)
            checked.append(health)
        self.checked = checked
        self._stop_probes()
        loop = asyncio.get_running_loop()
        for health in checked:
            if health.active is not None:
                task = loop.create_task(health.probe_forever(),
                                        name=f"healthcheck {health.id}")
                self.tasks.add(task)
                task.add_done_callback(self._probe_ended)
                self.probing.append(task)

    def _probe_ended(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("health check task %s failed", task.get_name(),
                      exc_info=task.exception())

    def _stop_probes(self) -> None:
        for task in self.probing:
            task.cancel()  # stays in self.tasks until it has ended
        self.probing = []

    def stop(self) -> None:
        self._stop_probes()

    def report(self) -> list[dict[str, Any]]:
        return [health.report() for health in self.checked]

    def metrics(self) -> dict[str, Any]:
        """Picklable data for /metrics (and for the supervisor with several workers)."""
        return {
            "upstream_health": {(h.id, s.address): 1.0 if s.healthy else 0.0
                                for h in self.checked for s in h.states.values()},
            "upstream_all_unhealthy": {h.id: h.fallbacks for h in self.checked},
            "healthcheck": self.report(),
        }


def merge_reports(reports: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One /v1/healthcheck report from those of several workers (each probes on its own):
    a node is unhealthy when any worker finds it so; counters and fallbacks add up."""
    merged: dict[str, dict[str, Any]] = {}
    for report in reports:
        for upstream in report:
            target = merged.get(upstream["name"])
            if target is None:
                merged[upstream["name"]] = {**upstream, "nodes": [
                    {**node, "counter": dict(node["counter"])} for node in upstream["nodes"]]}
                continue
            target["all_unhealthy_total"] += upstream["all_unhealthy_total"]
            nodes = {node["address"]: node for node in target["nodes"]}
            for node in upstream["nodes"]:
                known = nodes.get(node["address"])
                if known is None:
                    target["nodes"].append({**node, "counter": dict(node["counter"])})
                    continue
                if node["status"] != "healthy":
                    known["status"] = node["status"]
                for kind, count in node["counter"].items():
                    known["counter"][kind] = known["counter"].get(kind, 0) + count
    return list(merged.values())


def healthcheck_response(report: list[dict[str, Any]], path: str) -> tuple[int, Any]:
    """APISIX's control API: `/v1/healthcheck` lists every checked upstream,
    `/v1/healthcheck/upstreams/<id>` shows one."""
    path = path.rstrip("/")
    if path == "/v1/healthcheck":
        return 200, report
    prefix = "/v1/healthcheck/upstreams/"
    if path.startswith(prefix):
        name = path[len(prefix):]
        for upstream in report:
            if upstream["name"] == name:
                return 200, upstream
        return 404, {"error_msg": f"no health checker for upstream {name!r}"}
    return 404, {"error_msg": "try /v1/healthcheck or /v1/healthcheck/upstreams/<id>"}
