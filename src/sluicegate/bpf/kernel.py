"""The `kernel:` block at run time: the XDP filter (bpf/xdp.py) and the flow metrics
(bpf/flow_stats.py), installed and removed by the process that owns interception (the single
worker, or the supervisor of several), in its network namespace.

Lifecycle, as for eBPF interception (docs/ebpf.md): programs and maps are pinned under the
same bpffs folder (default /sys/fs/bpf/sluicegate, $SLUICEGATE_BPFFS), so `sluicegate bpf
status` and bpftool see them; the links are held by this process only, so a dead gateway
(even kill -9) filters and counts nothing; a start first detaches whatever still runs the
pinned programs and unpins them; a stop removes everything.

Errors are one line. `KernelTrafficError.unavailable` says the kernel or the process's
privileges lack a hook (exit 3; with `optional: true` the gateway logs the line and runs
without that part); anything else (a missing interface, another program's XDP) is exit 4.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sluicegate.config.kernel import KernelSettings, parse_kernel_block

log = logging.getLogger("sluicegate.kernel")

# The exit codes of cli/main.py's ExitCode for the two kinds of failure.
EXIT_UNAVAILABLE = 3
EXIT_FAILED = 4
SIOCGIFHWADDR = 0x8927  # <linux/sockios.h>: the interface's hardware type (ARPHRD_*)
# Errors meaning this kernel or these privileges lack what a part needs.
UNAVAILABLE = {errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL,
               errno.E2BIG, 524}  # 524: the kernel's ENOTSUPP
# How many rate-limited sources `bpf status` lists.
STATUS_SOURCES = 20


class KernelTrafficError(Exception):
    """A part of the `kernel:` block could not be installed; `str()` is one line."""

    def __init__(self, message: str, unavailable: bool) -> None:
        super().__init__(message)
        self.unavailable = unavailable

    @property
    def exit_code(self) -> int:
        return EXIT_UNAVAILABLE if self.unavailable else EXIT_FAILED


def _bpf() -> Any:
    """The loader, imported on use: a gateway without a `kernel:` block needs no libbpf."""
    from sluicegate.bpf import libbpf

    return libbpf


def _folder(folder: str | Path | None) -> Path:
    from sluicegate.intercept.ebpf import bpffs_folder

    return bpffs_folder(folder)


def all_pins() -> tuple[str, ...]:
    from sluicegate.bpf import flow_stats, xdp

    return (*xdp.PINS, *flow_stats.PINS)


def xdp_pins() -> tuple[str, ...]:
    from sluicegate.bpf import xdp

    return xdp.PINS


def flow_pins() -> tuple[str, ...]:
    from sluicegate.bpf import flow_stats

    return flow_stats.PINS


def _unpin(folder: Path, names: tuple[str, ...]) -> None:
    """Unpin what a part that failed had pinned (its links were never made or are gone)."""
    for name in names:
        with contextlib.suppress(OSError):
            (folder / name).unlink()


def program_pins() -> tuple[str, ...]:
    from sluicegate.bpf import flow_stats, xdp

    return (xdp.PROGRAM, *flow_stats.PROGRAMS)


def interface(name: str) -> tuple[int, str, int]:
    """(ifindex, name, ARPHRD type) of an interface of this network namespace."""
    try:
        ifindex = socket.if_nametoindex(name)
    except OSError:
        raise KernelTrafficError(f"interface {name} not found in this network namespace",
                                 unavailable=False) from None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16s16x", name.encode())
        try:
            answer = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, request)
            kind = struct.unpack_from("<H", answer, 16)[0]
        except OSError:
            kind = 0
    return ifindex, name, kind


def remove_pinned(folder: Path) -> list[str]:
    """Detach every link running one of our pinned programs (wherever it is held), then
    unpin our objects; the folder goes too when nothing else is in it. Returns failures."""
    failures: list[str] = []
    if not folder.is_dir():
        return failures
    libbpf = _bpf()
    ids = set()
    for name in program_pins():
        path = folder / name
        if path.exists():
            try:
                fd = libbpf.open_pinned(path)
            except libbpf.BpfError as error:
                failures.append(str(error))
                continue
            try:
                ids.add(libbpf.describe(fd)["id"])
            finally:
                os.close(fd)
    if ids:
        try:
            for fd, described in libbpf.links():
                try:
                    if described.get("prog_id") in ids:
                        libbpf.detach_link(fd, f"{described['type']} link {described['id']}")
                finally:
                    os.close(fd)
        except libbpf.BpfError as error:
            failures.append(str(error))
    for name in all_pins():
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            failures.append(f"unpinning {folder / name} failed: {error.strerror}")
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when empty: interception's pins may share it
    return failures


class KernelTraffic:
    """Installs the `kernel:` block's parts and removes them (see the module docstring)."""

    def __init__(self, block: dict[str, Any] | None, folder: str | Path | None = None) -> None:
        self.settings: KernelSettings | None = parse_kernel_block(block)
        self.folder = _folder(folder)
        self.xdp: Any = None    # an installed bpf.xdp.XdpFilter
        self.flows: Any = None  # an installed bpf.flow_stats.FlowStats
        self.skipped: list[str] = []  # optional parts this kernel could not run

    @property
    def configured(self) -> bool:
        return self.settings is not None and (self.settings.xdp is not None
                                              or self.settings.flow_metrics is not None)

    def install(self) -> None:
        """Install every configured part; raises KernelTrafficError (after removing what
        was done) unless the part is optional and the kernel lacks it."""
        if not self.configured:
            return
        assert self.settings is not None
        self._clear_stale()
        if self.settings.xdp is not None:
            self.xdp = self._part("XDP filter", self._install_xdp)
        if self.settings.flow_metrics is not None:
            self.flows = self._part("kernel flow metrics", self._install_flows)

    def _part(self, what: str, install: Any) -> Any:
        assert self.settings is not None
        try:
            return install()
        except KernelTrafficError as error:
            if error.unavailable and self.settings.optional:
                reason = f"{what} not available, running without it: {error}"
                log.warning("%s", reason)
                self.skipped.append(reason)
                return None
            self.remove()
            raise KernelTrafficError(f"{what}: {error}", error.unavailable) from None

    def _clear_stale(self) -> None:
        try:
            failures = remove_pinned(self.folder)
        except KernelTrafficError:
            raise
        except Exception as error:  # libbpf missing: the parts say it in their own words
            failures = [str(error)]
        if failures:
            log.warning("could not remove leftovers of an earlier run: %s", failures[0])

    def _prepare(self) -> Any:
        libbpf = _bpf_or_unavailable()
        from sluicegate.intercept.ebpf import ensure_bpffs
        from sluicegate.intercept.tproxy import InterceptError

        try:
            ensure_bpffs(self.folder)
        except (InterceptError, OSError) as error:
            raise KernelTrafficError(str(error), unavailable=True) from None
        return libbpf

    def _install_xdp(self) -> Any:
        from sluicegate.bpf.xdp import XdpFilter

        assert self.settings is not None and self.settings.xdp is not None
        libbpf = self._prepare()
        interfaces = [interface(name)[:2] for name in self.settings.xdp.interfaces]
        part = XdpFilter(self.settings.xdp, self.folder)
        try:
            part.install(interfaces)
        except libbpf.BpfError as error:
            part.close()
            _unpin(self.folder, xdp_pins())
            raise _classified(error, self.folder) from None
        log.info("XDP filter attached: %s (%d deny rules, rate_limit %s, syn_rate_limit %s)",
                 ", ".join(f"{name} ({mode})" for name, mode in part.modes.items()),
                 len(self.settings.xdp.deny), _limit_text(self.settings.xdp.rate_limit),
                 _limit_text(self.settings.xdp.syn_rate_limit))
        return part

    def _install_flows(self) -> Any:
        from sluicegate.bpf.flow_stats import FlowStats

        assert self.settings is not None and self.settings.flow_metrics is not None
        libbpf = self._prepare()
        interfaces = [interface(name) for name in self.settings.flow_interfaces()]
        part = FlowStats(self.settings.flow_metrics, self.folder)
        try:
            part.install(interfaces)
        except (libbpf.BpfError, OSError) as error:
            part.close()
            _unpin(self.folder, flow_pins())
            if isinstance(error, OSError) and not isinstance(error, libbpf.BpfError):
                raise KernelTrafficError(f"reading the network namespace cookie failed: "
                                         f"{error.strerror or error}", unavailable=True
                                         ) from None
            raise _classified(error, self.folder) from None
        log.info("kernel flow metrics attached: %s%s",
                 ", ".join(self.settings.flow_interfaces()),
                 " + TCP retransmits" if self.settings.flow_metrics.retransmits else "")
        return part

    def remove(self) -> None:
        """Detach and unpin everything of ours; logs (never raises) what it could not."""
        for part in (self.flows, self.xdp):
            if part is not None:
                part.close()
        self.flows = self.xdp = None
        if not self.configured:
            return
        try:
            failures = remove_pinned(self.folder)
        except Exception as error:
            failures = [str(error)]
        if failures:
            log.error("could not remove the kernel programs: %s", failures[0])

    def metrics(self) -> dict[str, Any]:
        """Counter rows for /metrics (observe/kernel_metrics.py), read now from the maps."""
        shown: dict[str, Any] = {}
        try:
            if self.xdp is not None:
                shown.update(self.xdp.read())
            if self.flows is not None:
                shown.update(self.flows.read())
        except Exception as error:  # a scrape must not fail on a map read
            log.warning("reading kernel counters failed: %s", error)
        return shown


def _bpf_or_unavailable() -> Any:
    try:
        libbpf = _bpf()
        libbpf.library()
    except ImportError as error:
        raise KernelTrafficError(str(error), unavailable=True) from None
    except Exception as error:  # BpfError: libbpf.so.1 missing
        raise KernelTrafficError(str(error), unavailable=True) from None
    return libbpf


def _classified(error: Any, folder: Path) -> KernelTrafficError:
    """A loader error as a KernelTrafficError of the right kind, in one line."""
    if error.errno == errno.EBUSY or error.errno == errno.EEXIST:
        return KernelTrafficError(f"{error} (another XDP program is attached there: "
                                  "`ip link show` names it; sluicegate does not replace "
                                  "programs it did not attach)", unavailable=False)
    if error.errno == errno.ENOENT and "is missing" in str(error):
        return KernelTrafficError(str(error), unavailable=False)
    return KernelTrafficError(str(error), unavailable=error.errno in UNAVAILABLE
                              or str(error).startswith("loading"))


def _limit_text(limit: Any) -> str:
    return "off" if limit is None else f"{limit.rate:g}/s burst {limit.bucket}"


class PinnedMaps:
    """Map source over the pins of `folder` (for a process that did not load them)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.opened: dict[str, Any] = {}

    def __call__(self, name: str) -> Any:
        if name not in self.opened:
            self.opened[name] = _bpf().open_pinned_map(self.folder / name)
        return self.opened[name]

    def close(self) -> None:
        for opened in self.opened.values():
            os.close(opened.fd)
        self.opened.clear()


@contextlib.contextmanager
def pinned_maps(folder: Path) -> Iterator[PinnedMaps]:
    maps = PinnedMaps(folder)
    try:
        yield maps
    finally:
        maps.close()


def kernel_status(folder: str | Path | None = None) -> dict[str, Any]:
    """The counters of the pinned XDP filter and flow programs, for `sluicegate bpf status`
    (empty when neither is pinned)."""
    from sluicegate.bpf import flow_stats, xdp

    path = _folder(folder)
    shown: dict[str, Any] = {}
    if (path / xdp.PROGRAM).exists():
        with pinned_maps(path) as maps:
            counters = xdp.read_xdp(maps, {}, sources=STATUS_SOURCES)
        counters["xdp_modes"] = xdp_modes([row["interface"] for row in counters["xdp"]])
        shown.update(counters)
    if (path / flow_stats.TC_INGRESS).exists():
        with pinned_maps(path) as maps:
            shown.update(flow_stats.read_flows(maps, {}, top_remotes=STATUS_SOURCES))
    return shown


def xdp_modes(names: list[str]) -> dict[str, str]:
    """Interface → how its XDP program runs ("native", "generic"), from the kernel."""
    from pyroute2 import IPRoute

    # IFLA_XDP_ATTACHED: pyroute2 gives the number or its name (`ip link` prints the name).
    modes = {1: "native", 2: "generic", 3: "offloaded", 4: "multiple", "xdp": "native",
             "xdpgeneric": "generic", "xdpoffload": "offloaded", "xdpmulti": "multiple"}
    shown = {}
    with IPRoute() as ipr:
        for name in dict.fromkeys(names):
            try:
                found = ipr.link_lookup(ifname=name)
                link = ipr.get_links(found[0])[0] if found else None
            except Exception:  # NetlinkError: gone meanwhile
                link = None
            attrs = link.get_attr("IFLA_XDP") if link is not None else None
            attached = attrs.get_attr("IFLA_XDP_ATTACHED") if attrs is not None else None
            shown[name] = modes.get(attached, "none") if attached else "none"
    return shown
