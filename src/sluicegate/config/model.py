"""The config model: APISIX field names and shapes for what sluicegate supports.

Validation happens once, at load; the data plane reads compiled objects built from these
models and never touches pydantic on the request path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from sluicegate.config.checks import HealthChecks
from sluicegate.config.expr import compile_vars
from sluicegate.config.nodes import coerce_id, nodes_from_map
from sluicegate.config.tls import SslConfig, UpstreamTlsConfig
from sluicegate.stream.routes import StreamRouteConfig

ObjectId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]

# APISIX `labels`: key/value strings for selecting and grouping resources (label_value_def:
# no whitespace, 1-256 characters).
LabelText = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^\S+$")]
Labels = dict[LabelText, LabelText]

HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
                "PURGE")


class Strict(BaseModel):
    """Unknown fields are errors: a typo must not silently change behaviour."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Timeout(Strict):
    """Upstream timeouts in seconds (nginx proxy_*_timeout semantics: send and read bound the
    gap between two successive writes / reads, not the whole transfer)."""

    connect: float = Field(6.0, gt=0, le=3600)
    send: float = Field(60.0, gt=0, le=3600)
    read: float = Field(60.0, gt=0, le=3600)


class KeepalivePool(Strict):
    """Idle upstream connections kept per node (APISIX `keepalive_pool`)."""

    size: int = Field(320, ge=0, le=100_000)
    idle_timeout: float = Field(60.0, ge=0, le=86_400)
    requests: int = Field(1000, ge=1, le=10_000_000)


class UpstreamNodeConfig(Strict):
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(80, ge=1, le=65535)
    weight: int = Field(1, ge=0, le=100_000)
    priority: int = 0


class UpstreamConfig(Strict):
    """A set of nodes and how to reach them."""

    id: ObjectId | None = None
    name: str | None = None
    desc: str | None = None
    labels: Labels | None = None
    type: Literal["roundrobin", "chash", "least_conn", "ewma"] = "roundrobin"
    nodes: list[UpstreamNodeConfig] = Field(min_length=1)
    hash_on: Literal["vars", "header", "cookie", "consumer", "vars_combinations"] = "vars"
    key: str | None = None
    timeout: Timeout = Field(default_factory=Timeout)
    retries: int | None = Field(None, ge=0, le=100)
    retry_timeout: float = Field(0, ge=0)
    pass_host: Literal["pass", "node", "rewrite"] = "pass"
    upstream_host: str | None = None
    scheme: Literal["http", "https"] = "http"
    tls: UpstreamTlsConfig | None = None
    """With scheme https: verification (on by default), CA file, client cert, SNI."""
    keepalive_pool: KeepalivePool = Field(default_factory=KeepalivePool)
    checks: HealthChecks | None = None

    _id = field_validator("id", mode="before")(coerce_id)

    @field_validator("nodes", mode="before")
    @classmethod
    def _nodes_from_map(cls, value: Any) -> Any:
        return nodes_from_map(value, default_port=80)

    @model_validator(mode="after")
    def _check(self) -> UpstreamConfig:
        if self.pass_host == "rewrite" and not self.upstream_host:
            raise ValueError("pass_host 'rewrite' needs upstream_host")
        if self.type == "chash" and not self.key and self.hash_on != "consumer":
            raise ValueError("type 'chash' needs key (what to hash on)")
        if not any(node.weight > 0 for node in self.nodes):
            raise ValueError("nodes: at least one node needs a weight above 0")
        return self


PluginMap = dict[str, dict[str, Any]]


class RouteConfig(Strict):
    """Matches requests (uri, host, method, vars) and says where they go."""

    id: ObjectId | None = None
    name: str | None = None
    desc: str | None = None
    labels: Labels | None = None
    uri: str | None = None
    uris: list[str] | None = None
    host: str | None = None
    hosts: list[str] | None = None
    methods: list[Literal[HTTP_METHODS]] | None = None  # type: ignore[valid-type]
    remote_addrs: list[str] | None = None
    vars: list[Any] | None = None
    priority: int = 0
    plugins: PluginMap = Field(default_factory=dict)
    plugin_config_id: ObjectId | None = None
    """A `plugin_configs` entry whose plugins this route uses too (its own plugins win)."""
    upstream: UpstreamConfig | None = None
    upstream_id: ObjectId | None = None
    service_id: ObjectId | None = None
    status: Literal[0, 1] = 1

    _ids = field_validator("id", "upstream_id", "service_id", "plugin_config_id",
                           mode="before")(coerce_id)

    @field_validator("uri", "uris")
    @classmethod
    def _uri_shape(cls, value: Any) -> Any:
        for uri in [value] if isinstance(value, str) else value or []:
            if not uri.startswith("/"):
                raise ValueError(f"uri {uri!r} must start with '/'")
            if "*" in uri[:-1]:
                raise ValueError(f"uri {uri!r}: '*' is only allowed at the end (prefix match)")
        return value

    @field_validator("vars")
    @classmethod
    def _vars_shape(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            compile_vars(value, "vars")  # raises ValueError naming the bad element
        return value

    @model_validator(mode="after")
    def _check(self) -> RouteConfig:
        if not self.uri and not self.uris:
            raise ValueError("a route needs uri or uris")
        if self.uri and self.uris:
            raise ValueError("use uri or uris, not both")
        if self.host and self.hosts:
            raise ValueError("use host or hosts, not both")
        if self.upstream and self.upstream_id:
            raise ValueError("use upstream or upstream_id, not both")
        return self


class ServiceConfig(Strict):
    """Plugins and an upstream shared by several routes."""

    id: ObjectId | None = None
    name: str | None = None
    desc: str | None = None
    labels: Labels | None = None
    hosts: list[str] | None = None
    plugins: PluginMap = Field(default_factory=dict)
    upstream: UpstreamConfig | None = None
    upstream_id: ObjectId | None = None

    _ids = field_validator("id", "upstream_id", mode="before")(coerce_id)


class ConsumerConfig(Strict):
    """Someone who calls the API; auth plugins map credentials to a consumer. Plugins other
    than credentials run for this consumer's requests once an auth plugin identified it,
    over the route's and the group's plugins of the same name."""

    username: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_\-]+$")
    desc: str | None = None
    labels: Labels | None = None
    group_id: ObjectId | None = None
    """A `consumer_groups` entry whose plugins apply to this consumer too."""
    plugins: PluginMap = Field(default_factory=dict)

    _group_id = field_validator("group_id", mode="before")(coerce_id)


class ConsumerGroupConfig(Strict):
    """Plugins shared by the consumers whose `group_id` names this group (APISIX
    consumer_groups); a consumer's own plugin of the same name wins."""

    id: ObjectId | None = None
    desc: str | None = None
    labels: Labels | None = None
    plugins: PluginMap = Field(default_factory=dict)

    _id = field_validator("id", mode="before")(coerce_id)


class PluginConfigResource(Strict):
    """A reusable set of plugins (APISIX plugin_configs) that routes pull in with
    `plugin_config_id`; a route's own plugin of the same name wins."""

    id: ObjectId | None = None
    desc: str | None = None
    labels: Labels | None = None
    plugins: PluginMap = Field(default_factory=dict)

    _id = field_validator("id", mode="before")(coerce_id)


class GlobalRuleConfig(Strict):
    """Plugins that run for every request, before route plugins."""

    id: ObjectId | None = None
    plugins: PluginMap = Field(default_factory=dict)

    _id = field_validator("id", mode="before")(coerce_id)


class PluginEntry(Strict):
    """The short form: `plugins: [{name, service?, config}]` at the top of the file."""

    name: str = Field(min_length=1)
    service: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)


def _check_listen(address: str) -> str:
    parse_listen(address)
    return address


ListenAddress = Annotated[str, AfterValidator(_check_listen)]


class StreamProxySettings(Strict):
    """L4 listeners (APISIX `stream_proxy`): TCP and UDP addresses served by `stream_routes`."""

    tcp: list[ListenAddress] = Field(default_factory=list)
    udp: list[ListenAddress] = Field(default_factory=list)
    splice: bool | None = None
    """Relay TCP with os.splice (kernel copy, ~40% less CPU); null: wherever available."""
    # `copy` in the file; named copy_path here (a field named `copy` shadows BaseModel.copy).
    copy_path: Literal["auto", "sockmap", "splice", "userspace"] | None = Field(None,
                                                                             alias="copy")
    """`copy`: how TCP bytes are relayed (overrides `splice`): `sockmap` joins the two
    sockets in the kernel with an sk_skb program (docs/ebpf.md; falls back to splice when
    it can't load), `splice` uses os.splice, `userspace` the asyncio copy, `auto` splice
    where os.splice exists, else the asyncio copy. null: as `splice` says."""
    sockmap_backlog: int | None = Field(None, ge=256 << 10, le=1 << 30)
    """`copy: sockmap` only: bytes of one direction that may wait in the kernel for a slower
    receiver before the program hands the rest to user space until it caught up (the
    path's backpressure). More costs kernel memory per connection; less costs user-space
    copying. null: the largest TCP receive buffer of the gateway's network namespace
    (net.ipv4.tcp_rmem's max), at least 16 MiB, at most 64 MiB (docs/ebpf.md)."""
    udp_idle_timeout: float = Field(60.0, gt=0, le=86_400)
    """A UDP flow (session) ends after this many seconds without a datagram."""


class GatewaySettings(Strict):
    """Where sluicegate listens and how it runs."""

    listen: list[ListenAddress] = Field(default_factory=lambda: ["0.0.0.0:9080"],
                                        min_length=1)
    metrics_listen: ListenAddress = "127.0.0.1:9091"
    workers: int = Field(1, ge=1, le=256)
    drain_timeout: float = Field(10.0, ge=0, le=3600)
    client_header_timeout: float = Field(60.0, gt=0, le=3600)
    keepalive_timeout: float = Field(60.0, ge=0, le=86_400)
    stream_proxy: StreamProxySettings = Field(default_factory=StreamProxySettings)
    https_listen: list[ListenAddress] | None = None
    """HTTPS listeners (certificates from `ssls`); null: ["0.0.0.0:9443"] when `ssls` has
    an enabled entry, else none."""


def _check_cidr(value: str) -> str:
    import ipaddress

    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR") from None
    return value


class AdminSettings(Strict):
    """The Admin API (APISIX's paths and JSON shapes under /apisix/admin): where it listens,
    its key and who may call it. It runs in one process: the worker when there is one, else
    the supervisor."""

    enabled: bool = True
    listen: ListenAddress = "127.0.0.1:9180"
    """Keep it on loopback or a management network: it can change every route."""
    key: str | None = Field(None, min_length=1, repr=False)
    """The `X-API-KEY` every request needs. The environment variable SLUICEGATE_ADMIN_KEY
    overrides it; with neither, a random key is generated at start and logged once."""
    allow_admin: list[Annotated[str, AfterValidator(_check_cidr)]] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    """Client addresses (IPs or CIDRs) allowed to call the Admin API; others get 403."""


class DashboardSettings(Strict):
    """The built-in web dashboard (read-only): its own listener, the Admin API's key and
    `allow_admin`. It runs with the Admin API (in the same process) and not without it;
    the Admin API also serves it at /dashboard/."""

    enabled: bool = True
    listen: ListenAddress = "127.0.0.1:9000"
    """Keep it on loopback or a management network. When the address is taken, the
    gateway logs it and runs on (the page stays reachable under the Admin API)."""


def parse_listen(address: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `port` → (host, port); raises ValueError with the reason."""
    text = str(address).strip()
    if text.isdigit():
        host, port_text = "0.0.0.0", text
    elif text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:]
    else:
        host, _, port_text = text.rpartition(":")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{address!r}: expected host:port")
    return host or "0.0.0.0", int(port_text)


class GatewayConfig(Strict):
    """The whole config file. Both forms (short `plugins:` list and full resources) load
    into this one model."""

    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    plugins: list[PluginEntry] = Field(default_factory=list)
    routes: list[RouteConfig] = Field(default_factory=list)
    services: list[ServiceConfig] = Field(default_factory=list)
    upstreams: list[UpstreamConfig] = Field(default_factory=list)
    consumers: list[ConsumerConfig] = Field(default_factory=list)
    consumer_groups: list[ConsumerGroupConfig] = Field(default_factory=list)
    plugin_configs: list[PluginConfigResource] = Field(default_factory=list)
    global_rules: list[GlobalRuleConfig] = Field(default_factory=list)
    stream_routes: list[StreamRouteConfig] = Field(default_factory=list)
    ssls: list[SslConfig] = Field(default_factory=list)
    interception: dict[str, Any] | None = None
    """Transparent interception without a plugin entry: the `tproxy` plugin's options plus
    `service` (validated as those options; see plugins/tproxy.py)."""
    kernel: dict[str, Any] | None = None
    """In-kernel traffic control (XDP deny lists and rate limits) and kernel flow metrics
    (validated by config/kernel.py; see docs/ebpf.md)."""
