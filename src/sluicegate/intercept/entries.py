"""From config to interception: which entries (short-form `tproxy` plugins and the
top-level `interception:` block) ask for what,
and the lifecycle around a worker: listeners first, then rules (so nothing is captured
before a socket can take it), rules removed on the way out."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sluicegate.config.interception import options_path, tproxy_sources
from sluicegate.config.model import GatewayConfig, parse_listen
from sluicegate.intercept.spec import InterceptSpec
from sluicegate.intercept.tproxy import InterceptError, TproxyInterceptor
from sluicegate.plugins.base import validate_plugin
from sluicegate.plugins.tproxy import TproxyConfig, spec_from_config

log = logging.getLogger("sluicegate.intercept")


@dataclass(frozen=True)
class InterceptEntry:
    """One `tproxy` entry: where it listens, which scope (service) handles its traffic, and
    the interception spec when it is transparent."""

    path: str  # where it is configured: "plugins[0]" or "interception"
    scope: str
    host: str
    port: int
    conf: TproxyConfig
    spec: InterceptSpec | None

    @property
    def http(self) -> bool:
        """Intercepted TCP goes through the L7 pipeline (else the L4 relay)."""
        return "tcp" in self.conf.protocols and self.conf.handle == "http"

    @property
    def listen_hosts(self) -> list[str]:
        # A TPROXY target needs a socket per family; a wildcard listen means both.
        if self.spec is not None and self.host in ("0.0.0.0", "::"):
            return ["0.0.0.0", "::"]
        return [self.host]


def intercept_entries(config: GatewayConfig) -> list[InterceptEntry]:
    entries = []
    for path, service, options in tproxy_sources(config):
        conf, _, errors = validate_plugin("tproxy", options, options_path(path))
        if errors:  # validate_config ran first
            raise ValueError("; ".join(errors))
        host, port = parse_listen(conf.listen)
        entries.append(InterceptEntry(path, service or path, host, port,
                                      conf, spec_from_config(conf) if conf.tproxy else None))
    return entries


def unsupported(entries: list[InterceptEntry]) -> list[str]:
    """What this version cannot do yet, as `path: reason` lines."""
    reasons = []
    transparent = [e for e in entries if e.spec is not None]
    for entry in transparent[1:]:
        reasons.append(f"{entry.path}: only one transparent (tproxy: true) entry is "
                       "supported")
    for entry in entries:
        if entry.spec is None and (entry.conf.handle == "tcp" or "udp" in entry.conf.protocols):
            reasons.append(f"{options_path(entry.path)}: an ordinary listener (tproxy: "
                           "false) serves HTTP; use gateway.stream_proxy for TCP/UDP")
    return reasons


class InterceptionOwner:
    """Installs the transparent entry's rules and removes them, exactly once per process
    that owns them (the single worker, or the supervisor of several)."""

    def __init__(self, entries: list[InterceptEntry]) -> None:
        self.spec = next((e.spec for e in entries if e.spec is not None), None)
        self.interceptor: TproxyInterceptor | None = None

    def install(self) -> None:
        if self.spec is None:
            return
        self.interceptor = TproxyInterceptor()
        self.interceptor.install(self.spec)
        log.info("interception installed: %s", self.spec.to_dict())

    def remove(self) -> None:
        if self.interceptor is None:
            return
        try:
            self.interceptor.remove()
            log.info("interception removed")
        except InterceptError as exc:
            log.error("could not remove interception: %s", exc)
        self.interceptor = None
