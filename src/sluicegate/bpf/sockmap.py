"""Sockmap splicing: the loaded `sockmap_splice.bpf.o` that joins two TCP sockets in the
kernel (docs/ebpf.md, "Sockmap splicing"; the relay that drives it is
`sluicegate/stream/sockmap_relay.py`).

One `SockmapSplice` per process serves every relayed pair: a SOCKHASH keyed by socket cookie
with the `sg_sm_verdict` sk_skb program attached to it, and two hash maps
per socket, `sg_sm_ctl` (the peer and the resume point, written here) and `sg_sm_count`
(bytes redirected and passed, written by the program). The objects are not pinned: they only
ever hold this process's own sockets, which the kernel removes from the map when they close,
and they go away with the process (`bpftool prog show name sg_sm_verdict` finds them while it
runs). Nothing is attached to a network namespace or an interface.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import socket
import struct
import threading
from typing import Any

from sluicegate import sysctl
from sluicegate.bpf import object_path

log = logging.getLogger("sluicegate.bpf")

OBJECT = "sockmap_splice"
VERDICT_PROGRAM = "sg_sm_verdict"
SOCKETS_MAP = "sg_sm_socks"
CTL_MAP = "sg_sm_ctl"
COUNT_MAP = "sg_sm_count"
# enum bpf_attach_type (uapi/bpf.h)
BPF_SK_SKB_STREAM_VERDICT = 5
# Mirrors of bpf/src/sockmap_splice.h (change both together).
NO_RESUME = 0xFFFF_FFFF_FFFF_FFFF
_KEY = struct.Struct("<Q")
_CTL = struct.Struct("<QQQQ")  # peer, resume_at, written_base, backlog_max
# SG_SM_BACKLOG_MAX: redirected bytes that may wait for the peer before the program passes
# to user space (backpressure), and the least bound `default_backlog` gives;
# gateway.stream_proxy.sockmap_backlog sets another.
DEFAULT_BACKLOG = 16 << 20
MAX_BACKLOG = 1 << 30  # the most the setting allows (config/model.py)
# The most `default_backlog` picks, however large tcp_rmem's max: the queue is outside the
# kernel's TCP memory accounting (tcp_mem), so a large bound is a choice to make in config.
MAX_DEFAULT_BACKLOG = 64 << 20
_COUNT = struct.Struct("<QQQII")  # redirected, passed, trimmed, next_seq, flags
BROKEN = 2  # sg_sm_count.flags: old bytes could not be cut off, the stream has a gap
SO_COOKIE = 57  # socket.SO_COOKIE is missing from Python 3.11

_lock = threading.Lock()
_shared: SockmapSplice | None = None
_failure: str | None = None
# The process's bound on what waits in the kernel per direction (set_backlog); None: not
# set, `default_backlog()`.
_backlog: int | None = None


class SockmapUnavailable(Exception):
    """The sockmap programs cannot run here; `str()` is the one-line reason."""


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's 64-bit id of a socket (SO_COOKIE): the program sees the same value."""
    return int(_KEY.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])


class SockmapSplice:
    """The loaded object with both programs attached to its SOCKHASH (see the module docs).

    Methods take socket cookies; `insert` also needs the socket. Errors are `BpfError`
    (sluicegate.bpf.libbpf)."""

    def __init__(self) -> None:
        from sluicegate.bpf import libbpf

        self._libbpf = libbpf
        self.obj = libbpf.BpfObject(object_path(OBJECT))
        try:
            self.sockets = self.obj.map(SOCKETS_MAP)
            self.ctl = self.obj.map(CTL_MAP)
            self.count = self.obj.map(COUNT_MAP)
            lib = libbpf.library()
            # bpf_prog_attach(prog_fd, target_fd, type, flags): sk_skb programs attach to the
            # map, not to a netns or interface. (libbpf.py does not declare it yet.)
            attach = lib.bpf_prog_attach
            attach.restype = ctypes.c_int
            attach.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint]
            # Verdict only, no stream_parser: see sockmap_splice.bpf.c for what the parser
            # did on this kernel.
            result = attach(self.obj.program(VERDICT_PROGRAM).fd, self.sockets.fd,
                            BPF_SK_SKB_STREAM_VERDICT, 0)
            if result < 0:
                code = -result if result != -1 else ctypes.get_errno()
                raise libbpf.BpfError(
                    f"attaching {VERDICT_PROGRAM} to the map {SOCKETS_MAP} failed: "
                    f"{errno.errorcode.get(code, code)}", code)
        except BaseException:
            self.obj.close()
            raise

    # -- a pair's entries ----------------------------------------------------------------
    def prepare(self, cookie: int, peer: int) -> None:
        """Zero the counters and start passing (user space copies until `resume`)."""
        self.count.update(_KEY.pack(cookie), _COUNT.pack(0, 0, 0, 0, 0))
        self.ctl.update(_KEY.pack(cookie), _CTL.pack(peer, NO_RESUME, 0, backlog()))

    def insert(self, cookie: int, sock: socket.socket) -> None:
        """Put a socket in the SOCKHASH (an established TCP socket, else EOPNOTSUPP)."""
        self.sockets.update(_KEY.pack(cookie), _KEY.pack(sock.fileno()))

    def resume(self, cookie: int, peer: int, resume_at: int, written_base: int) -> None:
        """Redirect in the kernel once the program's `passed` count equals `resume_at`.
        `written_base`: the peer's bytes written (`bytes_written`) that did not come from
        this socket's redirects, so the program can tell how many redirected bytes still
        wait for the peer, and pass instead past SG_SM_BACKLOG_MAX (backpressure)."""
        self.ctl.update(_KEY.pack(cookie), _CTL.pack(peer, resume_at, written_base, backlog()))

    def counts(self, cookie: int) -> tuple[int, int]:
        """(redirected, passed) bytes of the socket; zeros when unknown."""
        redirected, passed, _trimmed, _broken = self.all_counts(cookie)
        return redirected, passed

    def all_counts(self, cookie: int) -> tuple[int, int, int, bool]:
        """(redirected, passed, trimmed, broken) of the socket; zeros when unknown.
        `trimmed`: bytes TCP handed to the program a second time, which it cut off;
        `broken`: it could not, and dropped an skb (sockmap_splice.bpf.c)."""
        raw = self.count.lookup(_KEY.pack(cookie), _COUNT.size)
        if raw is None:
            return 0, 0, 0, False
        redirected, passed, trimmed, _next_seq, flags = _COUNT.unpack(raw)
        return redirected, passed, trimmed, bool(flags & BROKEN)

    def forget(self, cookie: int) -> None:
        """Take the socket out of the map and drop its entries (absent ones are fine)."""
        key = _KEY.pack(cookie)
        for bpf_map in (self.sockets, self.ctl, self.count):
            try:
                bpf_map.delete(key)
            except self._libbpf.BpfError:
                log.debug("sockmap: deleting %d from %s failed", cookie, bpf_map.name)

    def close(self) -> None:
        self.obj.close()

    def describe(self) -> dict[str, Any]:
        """Program and map ids, for status output and bpftool."""
        libbpf = self._libbpf
        return {"programs": [libbpf.describe(self.obj.program(VERDICT_PROGRAM).fd)],
                "maps": [libbpf.describe(m.fd) for m in (self.sockets, self.ctl, self.count)]}


def set_backlog(limit: int | None) -> None:
    """Redirected bytes a direction may have waiting for its peer in the kernel before the
    program passes to user space until the peer caught up (backpressure), for pairs joined
    from now on: more costs memory, less costs user-space copying (docs/ebpf.md). None:
    `default_backlog()`."""
    global _backlog
    _backlog = limit


def backlog() -> int:
    """The bound `set_backlog` gave, else `default_backlog()` (read once; `set_backlog`
    again, which each config load does, reads the sysctl anew)."""
    global _backlog
    if _backlog is None:
        _backlog = default_backlog()
    return _backlog


def default_backlog(rmem_path: str = sysctl.TCP_RMEM) -> int:
    """The bound when the config sets none: the largest receive buffer TCP may give a socket
    in this network namespace (net.ipv4.tcp_rmem's max), at least DEFAULT_BACKLOG, at most
    MAX_DEFAULT_BACKLOG.

    Why the receive buffer: when the bound is reached the program passes, and the sender
    may still fill the window it was given, which the receive buffer sizes; user space
    copies those bytes. So about one window is copied in user space per bound moved in the
    kernel, and a bound below the window leaves a fast sender's bytes mostly to user space
    (measured with tcp_rmem's max at 32 MiB and a 16 MiB bound: a quarter of the bytes).
    Why a cap: the queued bytes are not charged to any socket nor to tcp_mem, so up to two
    bounds per connection are kernel memory no TCP limit sees (docs/ebpf.md, "Memory")."""
    rmem = sysctl.read_ints(rmem_path)
    if not rmem or len(rmem) < 3:
        return DEFAULT_BACKLOG
    return min(max(DEFAULT_BACKLOG, rmem[2]), MAX_DEFAULT_BACKLOG)


def shared() -> SockmapSplice:
    """The process's `SockmapSplice`, loaded on first use. Raises `SockmapUnavailable` with
    the one-line reason (libbpf missing, no privilege, kernel without the hook), and
    remembers it so the reason is found once per process."""
    global _shared, _failure
    with _lock:
        if _shared is not None:
            return _shared
        if _failure is not None:
            raise SockmapUnavailable(_failure)
        try:
            _shared = SockmapSplice()
        except Exception as error:  # BpfError, OSError from ctypes: all mean "not here"
            _failure = str(error) or type(error).__name__
            raise SockmapUnavailable(_failure) from None
        return _shared


def available() -> str | None:
    """None when sockmap splicing works in this process, else the reason it does not."""
    try:
        shared()
    except SockmapUnavailable as error:
        return str(error)
    return None
