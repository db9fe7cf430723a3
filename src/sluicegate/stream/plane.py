"""The L4 side of one worker: the explicit stream listeners (`gateway.stream_proxy`) and the
intercepted TCP (tproxy `handle: tcp`) and UDP, all matched against `stream_routes`.

Intercepted traffic that no stream route claims goes to its original destination; on an
explicit listener such a connection is refused (there is no original destination).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sluicegate.config.model import GatewayConfig, parse_listen
from sluicegate.intercept.entries import InterceptEntry, transparent_socket
from sluicegate.intercept.sockets import (
    recv_with_original_destination,
    transparent_connect_socket,
    udp_reply_socket,
)
from sluicegate.intercept.spec import is_listener_destination
from sluicegate.intercept.tproxy import local_addresses
from sluicegate.stream.routes import StreamRoute, StreamRouteTable, compile_stream_routes
from sluicegate.stream.tcp import StreamServer
from sluicegate.stream.udp import UdpProxy

log = logging.getLogger("sluicegate.stream")


def stream_table(config: GatewayConfig) -> StreamRouteTable:
    return compile_stream_routes(config.stream_routes,
                                 {u.id: u for u in config.upstreams if u.id})


def with_original_destination(table: StreamRouteTable, name: str) -> StreamRouteTable:
    """The table plus a last-resort route to each flow's original destination."""
    return StreamRouteTable([*table.routes, StreamRoute(f"intercept-{name}")])


class StreamPlane:
    """Owns the StreamServer / UdpProxy instances of a worker."""

    def __init__(self, config: GatewayConfig, reuse_port: bool,
                 on_close: Callable[[str, Any], None] | None = None) -> None:
        self.config = config
        self.reuse_port = reuse_port
        self.on_close = on_close
        settings = config.gateway.stream_proxy
        self.splice = settings.splice
        self.copy = settings.copy_path  # `copy`: overrides splice (stream/sockmap_relay.py)
        if self.copy == "sockmap":
            from sluicegate.bpf import sockmap

            sockmap.set_backlog(settings.sockmap_backlog)
        self.udp_idle_timeout = settings.udp_idle_timeout
        self.table = stream_table(config)
        self.explicit_tcp: StreamServer | None = None
        self.explicit_udp: UdpProxy | None = None
        # (scope name, server) for intercepted traffic
        self.transparent_tcp: list[tuple[str, StreamServer]] = []
        self.transparent_udp: list[tuple[str, UdpProxy]] = []

    @property
    def active(self) -> bool:
        return bool(self.explicit_tcp or self.explicit_udp or self.transparent_tcp
                    or self.transparent_udp)

    def start(self, entries: list[InterceptEntry]) -> None:
        settings = self.config.gateway.stream_proxy
        if settings.tcp:
            self.explicit_tcp = StreamServer(self.table, splice=self.splice, copy=self.copy,
                                             on_close=self._closed("tcp"))
            for address in settings.tcp:
                self.explicit_tcp.listen(*parse_listen(address), self.reuse_port)
        if settings.udp:
            self.explicit_udp = UdpProxy(self.table, idle_timeout=self.udp_idle_timeout,
                                         on_close=self._closed("udp"))
            for address in settings.udp:
                self.explicit_udp.listen(*parse_listen(address), self.reuse_port)
        for entry in entries:
            if entry.spec is not None:
                self._start_transparent(entry)

    def _start_transparent(self, entry: InterceptEntry) -> None:
        spec = entry.spec
        assert spec is not None
        addresses = local_addresses()
        port = entry.port

        def is_own(destination: tuple[str, int]) -> bool:
            return is_listener_destination(destination, port, addresses)

        table = with_original_destination(self.table, entry.scope)
        if "tcp" in entry.conf.protocols and not entry.http:
            factory = ((lambda node, client: transparent_connect_socket(client, proto="tcp"))
                       if spec.preserve_source else None)
            server = StreamServer(table, splice=self.splice, copy=self.copy,
                                  connect_socket_factory=factory,
                                  is_own_destination=is_own, on_close=self._closed("tcp"))
            for host in entry.listen_hosts:
                server.add_listener(transparent_socket(host, port, "tcp",
                                                       reuse_port=self.reuse_port),
                                    transparent=True)
            self.transparent_tcp.append((entry.scope, server))
        if "udp" in entry.conf.protocols:
            factory = ((lambda node, client: transparent_connect_socket(client, proto="udp"))
                       if spec.preserve_source else None)
            proxy = UdpProxy(table, idle_timeout=self.udp_idle_timeout,
                             reply_socket_factory=udp_reply_socket,
                             connect_socket_factory=factory, is_own_destination=is_own,
                             on_close=self._closed("udp"))
            for host in entry.listen_hosts:
                proxy.add_listener(transparent_socket(host, port, "udp",
                                                      reuse_port=self.reuse_port),
                                   recv_hook=recv_with_original_destination)
            self.transparent_udp.append((entry.scope, proxy))

    def _closed(self, protocol: str) -> Callable[[Any], None] | None:
        if self.on_close is None:
            return None
        on_close = self.on_close
        return lambda flow: on_close(protocol, flow)

    def swap(self, config: GatewayConfig) -> None:
        self.config = config
        self.table = stream_table(config)
        for server in (self.explicit_tcp, self.explicit_udp):
            if server is not None:
                server.swap(self.table)
        for name, server in [*self.transparent_tcp, *self.transparent_udp]:
            server.swap(with_original_destination(self.table, name))

    def tick(self, now: float) -> None:
        for server in self._all():
            server.tick(now)

    async def drain(self, timeout: float) -> None:
        for server in self._all():
            if isinstance(server, StreamServer):
                await server.drain(timeout)
            else:
                server.close()

    def _all(self) -> list[Any]:
        servers: list[Any] = [s for s in (self.explicit_tcp, self.explicit_udp) if s]
        servers += [s for _, s in self.transparent_tcp] + [s for _, s in self.transparent_udp]
        return servers
