"""Compile a validated config into the immutable objects the data plane reads.

A snapshot is built once per config change and swapped in whole; requests keep the snapshot
they started with. Nothing here runs per request.
"""

from __future__ import annotations

import copy
from typing import Any

from sluicegate.config.interception import tproxy_sources
from sluicegate.config.load import find_service
from sluicegate.config.model import GatewayConfig, RouteConfig, UpstreamConfig
from sluicegate.http.balancer import (
    Balancer,
    OriginalDestinationBalancer,
    UpstreamNode,
    make_balancer,
)
from sluicegate.http.health import HealthCheckedBalancer, UpstreamHealth
from sluicegate.http.router import RouteTable
from sluicegate.http.tls import (
    CertificateSet,
    UpstreamTls,
    compile_certificates,
    compile_upstream_tls,
)
from sluicegate.plugins.base import (
    REGISTRY,
    Consumer,
    Plugin,
    PluginChain,
    PluginEnv,
    PluginMeta,
    build_chain,
    load_plugins,
    validate_plugin,
)

PluginEntries = list[tuple[str, Any, PluginMeta]]


class Upstream:
    """Runtime upstream: nodes, balancer, timeouts, host policy."""

    __slots__ = ("balancer", "connect_timeout", "health", "id", "idle_timeout",
                 "keepalive_requests", "keepalive_size", "nodes", "pass_host", "read_timeout",
                 "retries", "retry_timeout", "send_timeout", "source_from_client", "tls",
                 "upstream_host")

    def __init__(self, conf: UpstreamConfig, id: str) -> None:
        self.id = id
        self.nodes = [UpstreamNode(n.host, n.port, n.weight, n.priority) for n in conf.nodes]
        self.balancer: Balancer = make_balancer(conf.type, self.nodes, conf.hash_on, conf.key)
        self.connect_timeout = conf.timeout.connect
        self.send_timeout = conf.timeout.send
        self.read_timeout = conf.timeout.read
        usable = sum(1 for n in self.nodes if n.weight > 0)
        # APISIX: retries defaults to the number of nodes minus one.
        self.retries = conf.retries if conf.retries is not None else max(usable - 1, 0)
        self.retry_timeout = conf.retry_timeout  # seconds from the request's arrival; 0: none
        # checks: unhealthy nodes leave the balancer (http/health.py); None costs nothing.
        self.health: UpstreamHealth | None = None
        if conf.checks is not None:
            self.health = UpstreamHealth(id, conf, self.nodes)
            self.balancer = HealthCheckedBalancer(self.balancer, self.health)
        self.pass_host = conf.pass_host
        self.upstream_host = conf.upstream_host
        self.keepalive_size = conf.keepalive_pool.size
        self.idle_timeout = conf.keepalive_pool.idle_timeout
        self.keepalive_requests = conf.keepalive_pool.requests
        # Intercepted traffic with preserve_source: connect from the client's own address.
        self.source_from_client = False
        # scheme https: the client SSLContext and TLS name policy; None for plain HTTP.
        self.tls: UpstreamTls | None = compile_upstream_tls(conf)


def original_destination_upstream(id: str) -> Upstream:
    """An upstream whose node is each request's original destination (intercepted traffic
    with no upstream configured)."""
    upstream = Upstream(UpstreamConfig(nodes=[{"host": "0.0.0.0", "port": 1}]), id)
    upstream.nodes = []
    upstream.balancer = OriginalDestinationBalancer()
    upstream.retries = 0
    return upstream


class CompiledRoute:
    __slots__ = ("chain", "id", "name", "service_id", "upstream")

    def __init__(self, id: str, name: str | None, service_id: str | None, upstream: Upstream,
                 chain: PluginChain) -> None:
        self.id = id
        self.name = name
        self.service_id = service_id
        self.upstream = upstream
        self.chain = chain


class InterceptScope:
    """How traffic entering through one interception entry is handled: the named service's
    routes first, then a fallback route (the service's plugins, and its upstream or else each
    connection's original destination)."""

    __slots__ = ("fallback", "name", "table")

    def __init__(self, name: str, table: RouteTable, fallback: CompiledRoute) -> None:
        self.name = name
        self.table = table
        self.fallback = fallback

    def match(self, method: str, path: str, host: str, ctx: Any) -> CompiledRoute:
        return self.table.match(method, path, host, ctx) or self.fallback


class Snapshot:
    """Everything the data plane needs for one config version."""

    __slots__ = ("certificates", "config", "env", "global_chain", "routes", "scopes", "table",
                 "unavailable", "upstreams", "version")

    def __init__(self, config: GatewayConfig, table: RouteTable, routes: list[CompiledRoute],
                 upstreams: dict[str, Upstream], global_chain: PluginChain, env: PluginEnv,
                 unavailable: list[str], version: int,
                 scopes: dict[str, InterceptScope] | None = None) -> None:
        self.scopes = scopes or {}
        self.config = config
        self.table = table
        self.routes = routes
        self.upstreams = upstreams
        self.global_chain = global_chain
        self.env = env
        self.unavailable = unavailable
        self.version = version
        # Server certificates by SNI for the HTTPS listeners (set by compile_snapshot).
        self.certificates: CertificateSet | None = None

    @property
    def metrics_enabled(self) -> bool:
        return any(p.name == "prometheus" for p in self.global_chain.plugins) or any(
            p.name == "prometheus" for r in self.routes for p in r.chain.plugins)


def _entries(plugins: dict[str, Any]) -> PluginEntries:
    entries = []
    for name, conf in plugins.items():
        model, meta, errors = validate_plugin(name, conf, name)
        if errors:  # validate_config ran first; this only guards against misuse
            raise ValueError("; ".join(errors))
        entries.append((name, model, meta))
    return entries


def compile_snapshot(config: GatewayConfig, env: PluginEnv, version: int = 1) -> Snapshot:
    registry = load_plugins()
    unavailable: list[str] = []
    for index, entry in enumerate(config.plugins):
        cls = registry[entry.name]
        if not cls.available:
            unavailable.append(f"plugins[{index}] ({entry.name}): {cls.unavailable_reason}")
    consumer_layers = _compile_consumers(config, env, registry)

    # Short-form entries attach to their service, or else run globally.
    service_extra: dict[str, PluginEntries] = {}
    global_entries: PluginEntries = []
    for entry in config.plugins:
        if not registry[entry.name].available or registry[entry.name].entry_point:
            continue
        model, meta, _ = validate_plugin(entry.name, entry.config, entry.name)
        service = find_service(config, entry.service) if entry.service else None
        if service is not None:
            service_extra.setdefault(service.id or "", []).append((entry.name, model, meta))
        else:
            global_entries.append((entry.name, model, meta))
    for rule in config.global_rules:
        global_entries += _entries(rule.plugins)
    global_chain = build_chain(global_entries, env)

    upstreams = {u.id: Upstream(u, u.id) for u in config.upstreams if u.id}
    services = {s.id: s for s in config.services}
    plugin_configs = {p.id: p for p in config.plugin_configs}
    table = RouteTable()
    routes: list[CompiledRoute] = []
    compiled_pairs: list[tuple[RouteConfig, CompiledRoute]] = []
    for order, route in enumerate(config.routes):
        if route.status == 0:
            continue
        route_id = route.id or str(order + 1)
        service = services.get(route.service_id) if route.service_id else None
        upstream = _route_upstream(route, service, upstreams, route_id)
        entries: PluginEntries = []
        if service is not None:
            entries += _entries(service.plugins) + service_extra.get(service.id or "", [])
        if route.plugin_config_id:
            # Route over plugin_config over service, as APISIX merges them.
            entries += _entries(plugin_configs[route.plugin_config_id].plugins)
        entries += _entries(route.plugins)
        chain = _route_chain(entries, global_chain, env, consumer_layers)
        compiled = CompiledRoute(route_id, route.name, route.service_id, upstream, chain)
        routes.append(compiled)
        compiled_pairs.append((route, compiled))
        _add_route(table, route, compiled, order, service)
    scopes = _intercept_scopes(config, compiled_pairs, upstreams, service_extra,
                               global_chain, env)
    snapshot = Snapshot(config, table.freeze(), routes, upstreams, global_chain, env,
                        unavailable, version, scopes)
    snapshot.certificates = compile_certificates(config)
    return snapshot


def _add_route(table: RouteTable, route: RouteConfig, compiled: CompiledRoute, order: int,
               service: Any) -> None:
    hosts = ([route.host] if route.host else route.hosts) or (service.hosts if service
                                                             else None)
    table.add(compiled, [route.uri] if route.uri else list(route.uris or []), hosts,
              route.priority, order, route.methods, route.vars, route.remote_addrs)


def _intercept_scopes(config: GatewayConfig,
                      compiled_pairs: list[tuple[RouteConfig, CompiledRoute]],
                      upstreams: dict[str, Upstream], service_extra: dict[str, PluginEntries],
                      global_chain: PluginChain, env: PluginEnv) -> dict[str, InterceptScope]:
    scopes: dict[str, InterceptScope] = {}
    for path, service_name, options in tproxy_sources(config):
        name = service_name or path
        service = find_service(config, service_name) if service_name else None
        table = RouteTable()
        chain_entries: PluginEntries = []
        upstream: Upstream | None = None
        if service is not None:
            for order, (route, compiled) in enumerate(compiled_pairs):
                if compiled.service_id == service.id:
                    _add_route(table, route, compiled, order, service)
            chain_entries = _entries(service.plugins) + service_extra.get(service.id or "", [])
            if service.upstream is not None:
                upstream = Upstream(service.upstream, service.upstream.id or f"service-{name}")
            elif service.upstream_id:
                upstream = upstreams[service.upstream_id]
        chain = build_chain(chain_entries, env)
        if global_chain.plugins:
            chain = PluginChain(global_chain.plugins + chain.plugins)
        upstream = upstream or original_destination_upstream(f"original-{name}")
        conf = validate_plugin("tproxy", options, name)[0]
        if conf is not None and conf.tproxy and conf.preserve_source:
            upstream = copy.copy(upstream)
            upstream.source_from_client = True
            upstream.keepalive_size = 0  # a pooled connection carries another client's address
        fallback = CompiledRoute(f"intercept-{name}", None, service.id if service else None,
                                 upstream, chain)
        scopes[name] = InterceptScope(name, table.freeze(), fallback)
    return scopes


def _route_upstream(route: RouteConfig, service: Any, upstreams: dict[str, Upstream],
                    route_id: str) -> Upstream:
    if route.upstream is not None:
        return Upstream(route.upstream, route.upstream.id or f"route-{route_id}")
    if route.upstream_id:
        return upstreams[route.upstream_id]
    if service is not None and service.upstream is not None:
        return Upstream(service.upstream, service.upstream.id or f"service-{service.id}")
    if service is None or not service.upstream_id:
        # A route whose plugin answers itself (ai-proxy): a node that is never reached (a
        # refused connect, 502, should the plugin be disabled).
        return Upstream(UpstreamConfig(nodes=[{"host": "127.0.0.1", "port": 1}]),
                        f"route-{route_id}")
    return upstreams[service.upstream_id]


# -- consumer plugins ----------------------------------------------------------------------


def _compile_consumers(config: GatewayConfig, env: PluginEnv,
                       registry: dict[str, type[Plugin]]) -> dict[str, PluginEntries]:
    """Fill env.consumers with each consumer's credentials; return, by username, the other
    plugins its requests run: its group's, then its own (later entries win)."""
    groups: dict[str | None, PluginEntries] = {
        group.id: _entries(group.plugins) for group in config.consumer_groups}
    layers: dict[str, PluginEntries] = {}
    for consumer in config.consumers:
        confs = {}
        own: PluginEntries = []
        for name, conf in consumer.plugins.items():
            if registry[name].consumer_schema is None:
                own += _entries({name: conf})
                continue
            model, _, errors = validate_plugin(name, conf, name, for_consumer=True)
            if errors:
                raise ValueError("; ".join(errors))
            confs[name] = model
        env.consumers[consumer.username] = Consumer(consumer.username, confs)
        # The group's entry tuples are shared by its members, so on one route they share
        # one plugin instance (and so one limit counter).
        extra = groups.get(consumer.group_id, []) + own
        if extra:
            layers[consumer.username] = extra
    return layers


class ConsumerChains:
    """The chains a route continues with once authentication named the consumer: the
    route's plugins with the consumer's group's and own plugins merged in, theirs winning
    for the same name (APISIX merge_consumer_route). Its `after_auth` hook sits right after
    the route's last auth plugin; the exchange switches to the chain it returns, whose
    request hooks are the ones not run yet (the consumer's plugins' rewrite hooks first, as
    APISIX's rewrite_in_consumer). Hooks that ran before authentication keep the route's
    config: a consumer cannot change what already happened."""

    __slots__ = ("by_consumer",)

    def __init__(self, by_consumer: dict[str, PluginChain]) -> None:
        self.by_consumer = by_consumer

    def after_auth(self, ctx: Any) -> PluginChain | None:
        name = ctx.consumer_name
        return None if name is None else self.by_consumer.get(name)


Built = dict[int, tuple[int, Plugin]]  # id(entry tuple) → (priority, instance)


def _instances(entries: PluginEntries, env: PluginEnv, built: Built) -> list[Plugin]:
    """build_chain's rules (later entries win, `_meta.disable` removes, `_meta.priority`
    reorders), reusing instances already built from the same entry: a route's plugins are
    one instance in the route's chain and in every consumer's chain."""
    chosen: dict[str, tuple[str, Any, PluginMeta]] = {}
    for entry in entries:
        chosen[entry[0]] = entry
    ordered: list[tuple[int, Plugin]] = []
    for name, entry in chosen.items():
        meta = entry[2]
        if meta.disable:
            continue
        made = built.get(id(entry))
        if made is None:
            cls = REGISTRY[name]
            priority = cls.priority if meta.priority is None else meta.priority
            made = built[id(entry)] = (priority, cls(entry[1], env))
        ordered.append(made)
    ordered.sort(key=lambda item: -item[0])
    return [plugin for _, plugin in ordered]


def _is_auth(hook: Any) -> bool:
    owner = getattr(hook, "__self__", None)
    return isinstance(owner, Plugin) and owner.consumer_schema is not None


def _route_chain(entries: PluginEntries, global_chain: PluginChain, env: PluginEnv,
                 consumer_layers: dict[str, PluginEntries]) -> PluginChain:
    """A route's chain: global plugins first in every phase (APISIX global rules), then the
    route's; with consumer plugins configured and an auth plugin in the chain, a switch to
    the consumer's merged chain after authentication."""
    built: Built = {}
    chain = PluginChain(global_chain.plugins + _instances(entries, env, built))
    if not consumer_layers:
        return chain
    hooks = chain.request_hooks
    last_auth = max((i for i, hook in enumerate(hooks) if _is_auth(hook)), default=-1)
    if last_auth < 0:
        return chain  # nothing names a consumer here
    ran = set(hooks[:last_auth + 1])
    by_consumer: dict[str, PluginChain] = {}
    for username, extra in consumer_layers.items():
        merged = PluginChain(global_chain.plugins + _instances(entries + extra, env, built))
        merged.request_hooks = [hook for hook in merged.request_hooks if hook not in ran]
        by_consumer[username] = merged
    hooks.insert(last_auth + 1, ConsumerChains(by_consumer).after_auth)
    return chain
