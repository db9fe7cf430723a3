"""From config to interception: which entries (short-form `tproxy` plugins and the
top-level `interception:` block) ask for what,
and the lifecycle around a worker: listeners first, then rules (so nothing is captured
before a socket can take it), rules removed on the way out.

The transparent listeners of a process are opened through `transparent_socket`, which
remembers them (`LISTENERS`): eBPF mode puts them into its SOCKMAP. With `--workers N`
in eBPF mode the supervisor, which owns the interception, opens them (one SO_REUSEPORT
group per protocol and family, one socket of the group per worker) and each worker
inherits its own through `LISTEN_FDS_ENV`. The SOCKMAP holds the group's first socket; the
kernel's reuseport selection, which runs after `bpf_sk_assign`, spreads flows over the
group by hash (so a UDP flow stays with one worker), and a restarted worker inherits the
same socket: nothing queued on it is lost. In TPROXY mode each worker opens its own
listeners, as before (the nftables rule finds them by port).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from sluicegate.config.interception import options_path, tproxy_sources
from sluicegate.config.model import GatewayConfig, parse_listen
from sluicegate.intercept.ebpf import EbpfInterceptor
from sluicegate.intercept.sockets import family_of, transparent_listener
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

    @property
    def mode(self) -> str:
        """"tproxy" or "ebpf": the kernel mechanism capturing this entry's traffic."""
        return self.conf.mode

    @property
    def fail_open(self) -> bool:
        """Whether capture stops when the gateway dies (eBPF default; never TPROXY)."""
        return self.conf.fail_open if self.conf.fail_open is not None \
            else self.conf.mode == "ebpf"

    def transparent_listeners(self) -> list[tuple[str, str]]:
        """(host, protocol) of every transparent listener this entry needs."""
        if self.spec is None:
            return []
        return [(host, protocol) for protocol in self.conf.protocols
                for host in self.listen_hosts]


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


# Inherited transparent listeners: "PROTO/HOST/PORT=FD;..." (HOST may contain colons).
LISTEN_FDS_ENV = "SLUICEGATE_LISTEN_FDS"


class TransparentListeners:
    """The transparent listening sockets of this process, in the order opened."""

    def __init__(self) -> None:
        self.sockets: list[tuple[str, str, int, socket.socket]] = []
        self._inherited: dict[tuple[str, str, int], int] | None = None

    def open(self, host: str, port: int, proto: str = "tcp", reuse_port: bool = False
             ) -> socket.socket:
        """An inherited listener for (proto, host, port) if the supervisor passed one,
        else a new `transparent_listener`; remembered either way."""
        fd = self._take_inherited(proto, host, port)
        if fd is not None:
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
        else:
            sock = transparent_listener(host, port, proto, reuse_port=reuse_port)
        self.sockets.append((proto, host, port, sock))
        return sock

    def by_family(self) -> dict[tuple[str, int], socket.socket]:
        """(protocol, IP version) → the first open listener of that kind (for a SOCKMAP)."""
        chosen: dict[tuple[str, int], socket.socket] = {}
        for proto, host, _, sock in self.sockets:
            version = 6 if family_of(host) == socket.AF_INET6 else 4
            if sock.fileno() >= 0:
                chosen.setdefault((proto, version), sock)
        return chosen

    def _take_inherited(self, proto: str, host: str, port: int) -> int | None:
        if self._inherited is None:
            self._inherited = {}
            for item in filter(None, os.environ.pop(LISTEN_FDS_ENV, "").split(";")):
                name, _, fd = item.rpartition("=")
                kind, _, rest = name.partition("/")
                address, _, number = rest.rpartition("/")
                self._inherited[(kind, address, int(number))] = int(fd)
        return self._inherited.pop((proto, host, port), None)


LISTENERS = TransparentListeners()


def transparent_socket(host: str, port: int, proto: str = "tcp", reuse_port: bool = False
                       ) -> socket.socket:
    """The transparent listener the worker serves on (see `TransparentListeners.open`)."""
    return LISTENERS.open(host, port, proto, reuse_port)


class InterceptionOwner:
    """Installs the transparent entry's rules and removes them, exactly once per process
    that owns them (the single worker, or the supervisor of several)."""

    def __init__(self, entries: list[InterceptEntry]) -> None:
        self.entry = next((e for e in entries if e.spec is not None), None)
        self.spec = self.entry.spec if self.entry is not None else None
        self.interceptor: TproxyInterceptor | EbpfInterceptor | None = None

    def share_listeners(self, workers: int) -> list[tuple[list[int], dict[str, str]]]:
        """For a supervisor of `workers` processes: per worker, the fds to pass and the
        environment naming them. Empty lists in TPROXY mode (workers open their own)."""
        shared: list[tuple[list[int], dict[str, str]]] = [([], {}) for _ in range(workers)]
        if self.entry is None or self.entry.mode != "ebpf":
            return shared
        for host, proto in self.entry.transparent_listeners():
            for fds, env in shared:
                sock = transparent_socket(host, self.entry.port, proto, reuse_port=True)
                fds.append(sock.fileno())
                item = f"{proto}/{host}/{self.entry.port}={sock.fileno()}"
                env[LISTEN_FDS_ENV] = ";".join(filter(None, [env.get(LISTEN_FDS_ENV), item]))
        return shared

    def install(self) -> None:
        if self.spec is None or self.entry is None:
            return
        self.interceptor = self._interceptor(self.entry)
        # Leftovers of the other mode (a crash, a changed config) go first.
        other: Any = EbpfInterceptor() if self.entry.mode == "tproxy" else TproxyInterceptor()
        try:
            other.remove()
        except InterceptError as exc:
            log.warning("could not remove %s leftovers: %s", other.mode, exc)
        self.interceptor.install(self.spec)
        log.info("interception installed (%s): %s", self.entry.mode, self.spec.summary())

    @staticmethod
    def _interceptor(entry: InterceptEntry) -> TproxyInterceptor | EbpfInterceptor:
        if entry.mode == "ebpf":
            return EbpfInterceptor(LISTENERS.by_family(), fail_open=entry.fail_open)
        return TproxyInterceptor()

    def remove(self) -> None:
        if self.interceptor is None:
            return
        try:
            self.interceptor.remove()
            log.info("interception removed")
        except InterceptError as exc:
            log.error("could not remove interception: %s", exc)
        self.interceptor = None
