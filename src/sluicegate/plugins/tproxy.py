"""tproxy: transparent interception of traffic whose clients do not know a proxy exists.

With `tproxy: true` the gateway installs (and removes on exit) one nftables table
`inet sluicegate` (`mode: ebpf`: BPF programs instead, docs/ebpf.md), fwmark policy rules
and local routes, and listens with IP_TRANSPARENT on `listen`; TCP traffic routed through
this host to the captured ports is handed to the named service (its routes, plugins,
upstream), or, when the service has no upstream or is not defined, sent on to its original
destination. `tproxy: false` is an ordinary listener whose
traffic the named service handles.

This is an entry point, not a phase plugin: it adds no hooks to any chain.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from sluicegate.config.model import parse_listen
from sluicegate.intercept.spec import InterceptSpec
from sluicegate.plugins.base import Plugin, PluginConfig, register


class TproxyConfig(PluginConfig):
    listen: str = "0.0.0.0:80"
    """Address and port of the listener. With tproxy, the port is also the default captured
    destination port."""
    tproxy: bool = True
    """true: capture traffic transparently (TPROXY); false: an ordinary listener."""
    mode: Literal["tproxy", "ebpf"] = "tproxy"
    """The kernel mechanism that captures traffic: tproxy (an nftables table + policy
    routing) or ebpf (sk_lookup steering + a tcx marking program + the same policy routing,
    no firewall rule; needs libbpf1, see docs/ebpf.md)."""
    fail_open: bool | None = None
    """When the gateway dies (even kill -9), traffic flows to its original destinations
    instead of being captured by rules nobody serves. Default (null): true in ebpf mode
    (the BPF links die with the process); tproxy mode cannot (its rules stay until the next
    start or `sluicegate intercept down`), so true is refused there. false in ebpf mode
    pins the links: capture survives a crash, as in tproxy mode."""
    handle: Literal["http", "tcp"] = "http"
    """How intercepted TCP is handled: http parses it and runs it through the named
    service (routes, plugins); tcp relays bytes (stream_routes, else the original
    destination). Intercepted UDP is always relayed."""
    protocols: list[Literal["tcp", "udp"]] = Field(default_factory=lambda: ["tcp"],
                                                   min_length=1)
    """Protocols to capture."""
    ports: list[int | str] = Field(default_factory=list)
    """Destination ports or ranges to capture ("80", "8000-8099"); default: the listen port."""
    destinations: list[str] = Field(default_factory=list)
    """Destination CIDRs to capture (v4 and v6); default: any destination."""
    exclude: list[str] = Field(default_factory=list)
    """Destination CIDRs never captured (this host's own addresses never are)."""
    interfaces: list[str] = Field(default_factory=list)
    """Capture only traffic arriving on these interfaces; default: any."""
    preserve_source: bool = False
    """Upstream connections carry the client's own address (IP_TRANSPARENT bind)."""
    fwmark: int = Field(1, ge=1, le=0xFFFFFFFF)
    """Firewall mark that routes captured packets to the local listener."""
    route_table: int = Field(100, ge=1, le=0xFFFFFFF0)
    """Policy routing table holding the local routes."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value


@register
class Tproxy(Plugin):
    name = "tproxy"
    priority = 0
    schema = TproxyConfig
    # The named service may be absent: intercepted traffic then goes to its original
    # destination (validate warns instead of failing).
    service_optional = True
    entry_point = True
    available = True

    @classmethod
    def check(cls, conf: TproxyConfig) -> list[str]:
        if conf.mode == "tproxy" and conf.fail_open:
            return ["fail_open: true needs mode: ebpf (TPROXY rules stay after a crash until "
                    "the next start or `sluicegate intercept down`)"]
        if not conf.tproxy:
            return []
        try:
            spec_from_config(conf)
        except ValueError as exc:
            return [str(exc)]
        return []


def spec_from_config(conf: TproxyConfig) -> InterceptSpec:
    """The interception spec this entry asks for (raises ValueError naming the option)."""
    host, port = parse_listen(conf.listen)
    return InterceptSpec.from_options(
        port, protocols=conf.protocols, ports=conf.ports or [port],
        destinations=conf.destinations or None, exclude=conf.exclude,
        interfaces=conf.interfaces, preserve_source=conf.preserve_source,
        fwmark=conf.fwmark, route_table=conf.route_table,
        listen_address=None if host in ("0.0.0.0", "::") else host)
