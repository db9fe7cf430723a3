"""Route lookup whose cost does not grow with the number of routes.

Like APISIX's default `radixtree_host_uri`: routes with a host matching the request's are
tried before routes without a host; within one host, an exact uri beats a prefix (`/a/*`),
a longer prefix beats a shorter one, and among routes on the same path the higher
`priority` wins, then config order. Exact paths are a dict lookup; prefixes are a dict
lookup per distinct prefix length (bounded by the path length, not by the route count).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from sluicegate.config.expr import compile_vars

VarsMatcher = Callable[[Any], bool]


class Candidate:
    """A route as the router sees it: the match conditions beyond uri and host."""

    __slots__ = ("methods", "order", "priority", "remote_networks", "target", "vars_matcher")

    def __init__(self, target: Any, priority: int, order: int, methods: frozenset[str] | None,
                 vars_matcher: VarsMatcher | None,
                 remote_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None
                 ) -> None:
        self.target = target
        self.priority = priority
        self.order = order
        self.methods = methods
        self.vars_matcher = vars_matcher
        self.remote_networks = remote_networks

    def accepts(self, method: str, ctx: Any) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.remote_networks is not None:
            address = ipaddress.ip_address(ctx.remote_addr)
            if not any(address in network for network in self.remote_networks):
                return False
        return self.vars_matcher is None or self.vars_matcher(ctx)


class PathIndex:
    """Exact and prefix paths of the routes sharing one host key."""

    __slots__ = ("exact", "prefix", "prefix_lengths")

    def __init__(self) -> None:
        self.exact: dict[str, list[Candidate]] = {}
        self.prefix: dict[str, list[Candidate]] = {}
        self.prefix_lengths: list[int] = []

    def add(self, uri: str, candidate: Candidate) -> None:
        if uri.endswith("*"):
            self.prefix.setdefault(uri[:-1], []).append(candidate)
        else:
            self.exact.setdefault(uri, []).append(candidate)

    def freeze(self) -> None:
        for table in (self.exact, self.prefix):
            for candidates in table.values():
                candidates.sort(key=lambda c: (-c.priority, c.order))
        self.prefix_lengths = sorted({len(p) for p in self.prefix}, reverse=True)

    def find(self, path: str, method: str, ctx: Any) -> Any:
        candidates = self.exact.get(path)
        if candidates is not None:
            for candidate in candidates:
                if candidate.accepts(method, ctx):
                    return candidate.target
        prefix = self.prefix
        path_length = len(path)
        for length in self.prefix_lengths:
            if length > path_length:
                continue
            candidates = prefix.get(path[:length])
            if candidates is not None:
                for candidate in candidates:
                    if candidate.accepts(method, ctx):
                        return candidate.target
        return None


class RouteTable:
    """All enabled routes, indexed by host then path."""

    __slots__ = ("any_host", "exact_hosts", "wildcard_hosts")

    def __init__(self) -> None:
        self.exact_hosts: dict[str, PathIndex] = {}
        self.wildcard_hosts: list[tuple[str, PathIndex]] = []  # (".example.com", index)
        self.any_host = PathIndex()

    def add(self, target: Any, uris: list[str], hosts: list[str] | None, priority: int,
            order: int, methods: list[str] | None = None, vars_expr: list[list[Any]] | None = None,
            remote_addrs: list[str] | None = None) -> None:
        networks = ([ipaddress.ip_network(a, strict=False) for a in remote_addrs]
                    if remote_addrs else None)
        candidate = Candidate(target, priority, order, frozenset(methods) if methods else None,
                              compile_vars(vars_expr) if vars_expr else None, networks)
        indexes = [self._index_for(host.lower()) for host in hosts] if hosts else [self.any_host]
        for index in indexes:
            for uri in uris:
                index.add(uri, candidate)

    def _index_for(self, host: str) -> PathIndex:
        if host.startswith("*."):
            suffix = host[1:]
            for known, index in self.wildcard_hosts:
                if known == suffix:
                    return index
            index = PathIndex()
            self.wildcard_hosts.append((suffix, index))
            return index
        return self.exact_hosts.setdefault(host, PathIndex())

    def freeze(self) -> RouteTable:
        self.wildcard_hosts.sort(key=lambda item: -len(item[0]))
        for index in [*self.exact_hosts.values(), *(i for _, i in self.wildcard_hosts),
                      self.any_host]:
            index.freeze()
        return self

    def match(self, method: str, path: str, host: str, ctx: Any) -> Any:
        if host:
            index = self.exact_hosts.get(host)
            if index is not None:
                found = index.find(path, method, ctx)
                if found is not None:
                    return found
            for suffix, index in self.wildcard_hosts:
                if host.endswith(suffix):
                    found = index.find(path, method, ctx)
                    if found is not None:
                        return found
        return self.any_host.find(path, method, ctx)
