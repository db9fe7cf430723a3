"""APISIX-style `stream_routes`: the config model and the compiled route table.

Pure logic, no I/O, and no import of `sluicegate.config` (the config model imports this
module to add `stream_routes: list[StreamRouteConfig]`).

Config shape (APISIX field names; YAML)::

    stream_routes:
      - id: mysql
        server_port: 3306             # the port the connection was made to
        server_addr: 10.0.0.0/8       # the address it was made to: IP or CIDR
        remote_addr: 192.168.1.0/24   # the client: IP or CIDR
        upstream:
          type: roundrobin            # roundrobin | chash | least_conn | ewma
          nodes: {"10.1.0.5:3306": 1, "10.1.0.6:3306": 1}   # or a list of {host, port, ...}
          timeout: {connect: 6, send: 600, read: 600}
          scheme: tcp                 # tcp | udp; omitted: the route serves both
      - id: everything-else           # no upstream: to the original destination
        server_port: 443              # (transparent traffic only)

"Server address/port" is where the client's connection went: the original destination for
intercepted traffic, the listener's own address otherwise. The protocol a route serves is
its upstream's `scheme` (APISIX's L4 upstream schemes `tcp` and `udp`; APISIX's `protocol`
field is the xRPC framework, which sluicegate does not implement). A route without an
upstream, or whose upstream sets no scheme, serves TCP and UDP alike, as an APISIX stream
route serves whichever listener the traffic arrived on. `upstream_id` refers to a top-level
`upstreams` entry.

Matching order (``StreamRouteTable.match``), first match wins:

1. routes with more conditions first (each of server_addr, server_port, remote_addr and a
   protocol counts one);
2. then the narrower address conditions first (the sum over server_addr and remote_addr of
   prefix length / address bits, so 10.0.0.1 before 10.0.0.0/8, and a v4 /32 ties a v6 /128);
3. then config order.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sluicegate.config.nodes import coerce_id, nodes_from_map
from sluicegate.http.balancer import Balancer, UpstreamNode, make_balancer

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "STREAM_HASH_VARS",
    "StreamContext",
    "StreamRoute",
    "StreamRouteConfig",
    "StreamRouteTable",
    "StreamTimeout",
    "StreamUpstream",
    "StreamUpstreamConfig",
    "StreamUpstreamNodeConfig",
    "compile_stream_routes",
    "parse_network",
]

# Same default as the L7 upstream model (config/model.py Timeout.connect).
DEFAULT_CONNECT_TIMEOUT = 6.0
# nginx stream `proxy_timeout` (10 min): a relay quiet in both directions this long closes.
DEFAULT_IDLE_TIMEOUT = 600.0
# What a stream chash can hash on (APISIX stream chash: `hash_on: vars`, key remote_addr).
STREAM_HASH_VARS = ("remote_addr", "remote_port", "server_addr", "server_port")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
StreamObjectId = Annotated[str, Field(min_length=1, max_length=64,
                                      pattern=r"^[A-Za-z0-9_.\-]+$")]


def parse_network(text: str) -> Network:
    """An IP or CIDR (``10.0.0.1``, ``10.0.0.0/8``, ``::1``, ``fd00::/8``) as a network.

    Host bits are ignored (``10.1.2.3/8`` is ``10.0.0.0/8``), as nginx's allow/deny does.
    IPv4-mapped IPv6 (``::ffff:10.0.0.1``) becomes the IPv4 network. Raises ValueError.
    """
    try:
        network = ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR") from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((int(mapped), network.prefixlen - 96))
    return network


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StreamTimeout(_Strict):
    """Upstream timeouts in seconds. ``connect``: per node tried. ``read``: the connection
    closes after this long with no bytes in either direction (nginx stream
    ``proxy_timeout``). ``send``: it closes when one side has not accepted the bytes
    waiting for it for this long."""

    connect: float = Field(DEFAULT_CONNECT_TIMEOUT, gt=0, le=3600)
    send: float = Field(DEFAULT_IDLE_TIMEOUT, gt=0, le=86_400)
    read: float = Field(DEFAULT_IDLE_TIMEOUT, gt=0, le=86_400)


class StreamUpstreamNodeConfig(_Strict):
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(ge=1, le=65535)
    weight: int = Field(1, ge=0, le=100_000)
    priority: int = 0


def _nodes_json_schema(schema: dict[str, Any]) -> None:
    # The validator also takes a {"host:port": weight} map: say so to editors.
    as_list = {key: value for key, value in schema.items() if key not in ("title",)}
    schema.clear()
    schema["anyOf"] = [as_list, {"type": "object", "minProperties": 1,
                                 "additionalProperties": {"type": "integer", "minimum": 0}}]
    schema["description"] = 'a list of {host, port, weight, priority}, or {"host:port": weight}'


class StreamUpstreamConfig(_Strict):
    """Where a stream route sends its connections (APISIX upstream fields that apply to L4).

    ``nodes`` is a map ``{"host:port": weight}`` or a list of ``{host, port, weight,
    priority}``; every node needs a port. ``retries`` is how many further nodes are tried
    after a failed connect (default: every node once). ``chash`` hashes on one of
    ``remote_addr``, ``remote_port``, ``server_addr``, ``server_port`` (``hash_on: vars``).
    """

    id: StreamObjectId | None = None
    name: str | None = None
    desc: str | None = None
    type: Literal["roundrobin", "chash", "least_conn", "ewma"] = "roundrobin"
    nodes: list[StreamUpstreamNodeConfig] = Field(min_length=1,
                                                  json_schema_extra=_nodes_json_schema)
    hash_on: Literal["vars"] = "vars"
    key: str | None = None
    timeout: StreamTimeout = Field(default_factory=StreamTimeout)
    retries: int | None = Field(None, ge=0, le=100)
    scheme: Literal["tcp", "udp"] | None = None

    _id = field_validator("id", mode="before")(coerce_id)

    @field_validator("nodes", mode="before")
    @classmethod
    def _nodes_from_map(cls, value: Any) -> Any:
        return nodes_from_map(value)  # L4 has no default port: each node names its own

    @model_validator(mode="after")
    def _check(self) -> StreamUpstreamConfig:
        if self.type == "chash":
            if not self.key:
                raise ValueError("type 'chash' needs key (one of "
                                 f"{', '.join(STREAM_HASH_VARS)})")
            if self.key not in STREAM_HASH_VARS:
                raise ValueError(f"key {self.key!r}: a stream chash hashes on one of "
                                 f"{', '.join(STREAM_HASH_VARS)}")
        if not any(node.weight > 0 for node in self.nodes):
            raise ValueError("nodes: at least one node needs a weight above 0")
        return self


class StreamRouteConfig(_Strict):
    """An L4 route: which connections (or UDP flows) it takes and where they go.

    Conditions, all optional: ``server_addr`` (IP or CIDR the client connected to),
    ``server_port``, ``remote_addr`` (client IP or CIDR). ``upstream`` or ``upstream_id``
    says where to; with neither, traffic goes to its original destination (transparent
    interception only; on an ordinary listener such a route refuses the connection).
    """

    id: StreamObjectId | None = None
    name: str | None = None
    desc: str | None = None
    server_addr: str | None = None
    server_port: int | None = Field(None, ge=1, le=65535)
    remote_addr: str | None = None
    upstream: StreamUpstreamConfig | None = None
    upstream_id: StreamObjectId | None = None

    _ids = field_validator("id", "upstream_id", mode="before")(coerce_id)

    @field_validator("server_addr", "remote_addr")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_network(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> StreamRouteConfig:
        if self.upstream is not None and self.upstream_id is not None:
            raise ValueError("use upstream or upstream_id, not both")
        return self


# -- compiled objects -------------------------------------------------------------------


class StreamContext:
    """What a balancer reads for an L4 connection or flow (`BalancerContext`)."""

    __slots__ = ("consumer_name", "remote_addr", "remote_port", "server_addr", "server_port")

    def __init__(self, remote: tuple[Any, ...], server: tuple[Any, ...]) -> None:
        self.consumer_name: str | None = None
        self.remote_addr = str(remote[0])
        self.remote_port = str(remote[1])
        self.server_addr = str(server[0])
        self.server_port = str(server[1])

    def var(self, name: str) -> str | None:
        if name in STREAM_HASH_VARS:
            return getattr(self, name)  # type: ignore[no-any-return]
        return None


class StreamUpstream:
    """A compiled upstream: nodes, their balancer and the timeouts.

    ``attempts`` is how many nodes a connection tries at most (1 + retries).
    """

    __slots__ = ("attempts", "balancer", "connect_timeout", "idle_timeout", "nodes",
                 "scheme", "send_timeout")

    def __init__(self, nodes: list[UpstreamNode], balancer: Balancer, *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 send_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 retries: int | None = None, scheme: str | None = None) -> None:
        self.nodes = nodes
        self.balancer = balancer
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        pickable = sum(1 for node in nodes if node.weight > 0)
        self.attempts = max(1, pickable if retries is None else retries + 1)
        self.scheme = scheme

    @classmethod
    def from_nodes(cls, nodes: Iterable[tuple[str, int] | UpstreamNode], type: str = "roundrobin",
                   **options: Any) -> StreamUpstream:
        """Build from ``(host, port)`` pairs or nodes; for tests and programmatic use."""
        built = [n if isinstance(n, UpstreamNode) else UpstreamNode(n[0], n[1], 1)
                 for n in nodes]
        hash_key = options.pop("key", None)
        return cls(built, make_balancer(type, built, "vars", hash_key), **options)

    def __repr__(self) -> str:
        return f"StreamUpstream({[n.address for n in self.nodes]!r})"


class StreamRoute:
    """A compiled stream route. ``upstream`` None means "the original destination"."""

    __slots__ = ("id", "order", "protocol", "rank", "remote_addr", "remote_net",
                 "server_addr", "server_net", "server_port", "upstream")

    def __init__(self, id: str | None = None, *, server_addr: str | None = None,
                 server_port: int | None = None, remote_addr: str | None = None,
                 protocol: str | None = None, upstream: StreamUpstream | None = None) -> None:
        if protocol not in (None, "tcp", "udp"):
            raise ValueError(f"protocol {protocol!r}: expected tcp or udp")
        self.id = id
        self.server_addr = server_addr
        self.server_port = server_port
        self.remote_addr = remote_addr
        self.server_net = _Match.of(server_addr)
        self.remote_net = _Match.of(remote_addr)
        self.protocol = protocol
        self.upstream = upstream
        self.order = 0
        conditions = sum(x is not None for x in (server_addr, server_port, remote_addr, protocol))
        width = 0.0
        for net in (self.server_net, self.remote_net):
            if net is not None:
                width += net.prefixlen / (32 if net.version == 4 else 128)
        # Sort key, ascending: more conditions, then narrower addresses, first.
        self.rank = (-conditions, -width)

    def matches(self, server: _Address, server_port: int, remote: _Address,
                protocol: str) -> bool:
        if self.protocol is not None and self.protocol != protocol:
            return False
        if self.server_port is not None and self.server_port != server_port:
            return False
        if self.server_net is not None and not self.server_net.contains(server.value()):
            return False
        return self.remote_net is None or self.remote_net.contains(remote.value())

    def __repr__(self) -> str:
        conditions = [f"{name}={value!r}" for name, value in (
            ("server_addr", self.server_addr), ("server_port", self.server_port),
            ("remote_addr", self.remote_addr), ("protocol", self.protocol)) if value is not None]
        return f"StreamRoute({self.id!r}, {', '.join(conditions)})"


class _Match:
    """An address condition as integers: (version, network, mask)."""

    __slots__ = ("mask", "network", "prefixlen", "version")

    def __init__(self, network: Network) -> None:
        self.version = network.version
        self.prefixlen = network.prefixlen
        self.mask = int(network.netmask)
        self.network = int(network.network_address)

    @classmethod
    def of(cls, text: str | None) -> _Match | None:
        return None if text is None else cls(parse_network(text))

    def contains(self, address: tuple[int, int] | None) -> bool:
        return (address is not None and address[0] == self.version
                and address[1] & self.mask == self.network)


class _Address:
    """An address string parsed only if a route asks (most tables only match ports)."""

    __slots__ = ("_parsed", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._parsed: tuple[int, int] | bool | None = False

    def value(self) -> tuple[int, int] | None:
        parsed = self._parsed
        if parsed is False:
            parsed = self._parsed = _parse_address(self.text)
        return parsed  # type: ignore[return-value]


def _parse_address(text: str) -> tuple[int, int] | None:
    try:
        address = ipaddress.ip_address(text.partition("%")[0])  # drop a v6 scope id
    except ValueError:
        return None
    if address.version == 6:
        mapped = address.ipv4_mapped  # a dual-stack listener sees v4 clients as ::ffff:a.b.c.d
        if mapped is not None:
            return 4, int(mapped)
    return address.version, int(address)


class StreamRouteTable:
    """The stream routes of one config snapshot, in matching order (see module docs).

    Immutable once built; a config change builds a new table and swaps it in.
    """

    __slots__ = ("_any_port", "_by_port", "routes")

    def __init__(self, routes: Iterable[StreamRoute] = ()) -> None:
        listed = list(routes)
        for index, route in enumerate(listed):
            route.order = index
        ordered = sorted(listed, key=lambda r: (r.rank, r.order))
        self.routes = tuple(ordered)
        # Candidates per port, precomputed: a lookup scans only routes that can match.
        self._any_port = tuple(r for r in ordered if r.server_port is None)
        self._by_port = {
            port: tuple(r for r in ordered if r.server_port in (None, port))
            for port in {r.server_port for r in ordered if r.server_port is not None}
        }

    def match(self, server_addr: str, server_port: int, remote_addr: str,
              protocol: str = "tcp") -> StreamRoute | None:
        """The first route (in matching order) for a connection to ``server_addr:port``
        from ``remote_addr`` over ``protocol`` (``tcp`` or ``udp``), or None."""
        candidates = self._by_port.get(server_port, self._any_port)
        if not candidates:
            return None
        server = _Address(server_addr)
        remote = _Address(remote_addr)
        for route in candidates:
            if route.matches(server, server_port, remote, protocol):
                return route
        return None

    def __len__(self) -> int:
        return len(self.routes)


def _compile_upstream(config: Any) -> StreamUpstream:
    """From a `StreamUpstreamConfig` or anything shaped like one (a top-level L7
    `UpstreamConfig` referenced by `upstream_id`: nodes, type, hash_on, key, timeout)."""
    nodes = [UpstreamNode(n.host, n.port, n.weight, getattr(n, "priority", 0))
             for n in config.nodes]
    hash_on = getattr(config, "hash_on", "vars")
    key = getattr(config, "key", None)
    if config.type == "chash" and (hash_on != "vars" or key not in STREAM_HASH_VARS):
        raise ValueError(f"a stream chash hashes on vars {', '.join(STREAM_HASH_VARS)}; "
                         f"got hash_on={hash_on!r} key={key!r}")
    balancer = make_balancer(config.type, nodes, hash_on, key)
    timeout = config.timeout
    scheme = getattr(config, "scheme", None)
    return StreamUpstream(
        nodes, balancer, connect_timeout=timeout.connect, idle_timeout=timeout.read,
        send_timeout=timeout.send, retries=getattr(config, "retries", None),
        scheme=scheme if scheme in ("tcp", "udp") else None)


def compile_stream_routes(configs: Iterable[StreamRouteConfig],
                          upstreams: Mapping[str, Any] | None = None) -> StreamRouteTable:
    """Compile validated stream route configs into a table.

    ``upstreams`` maps upstream ids to configs for ``upstream_id``. Raises ValueError with
    the field path (``stream_routes[2].upstream_id: ...``) for what the schema cannot check.
    """
    routes = []
    for index, config in enumerate(configs):
        path = f"stream_routes[{index}]"
        upstream_config: Any = config.upstream
        if config.upstream_id is not None:
            upstream_config = (upstreams or {}).get(config.upstream_id)
            if upstream_config is None:
                raise ValueError(f"{path}.upstream_id: no upstream {config.upstream_id!r}")
        try:
            upstream = None if upstream_config is None else _compile_upstream(upstream_config)
        except ValueError as exc:
            raise ValueError(f"{path}.upstream: {exc}") from None
        routes.append(StreamRoute(
            config.id, server_addr=config.server_addr, server_port=config.server_port,
            remote_addr=config.remote_addr,
            protocol=upstream.scheme if upstream is not None else None, upstream=upstream))
    return StreamRouteTable(routes)
