"""The sockmap copy path: bytes of an established client/upstream pair move in the kernel,
redirected by an sk_skb program from one socket's receive side to the other's send side
(`bpf/src/sockmap_splice.bpf.c`, loaded by `bpf/sockmap.py`; docs/ebpf.md).

How a pair is joined (`SockmapConnection.start_relay`):

1. both sockets get a `sg_sm_ctl` entry (peer cookie, "keep passing") and zeroed counters,
   then go into the SOCKHASH (client first: a client that already sent its FIN is in
   CLOSE_WAIT, which the map refuses, and the pair then takes the splice path whole);
2. `SO_RCVLOWAT` is set on each socket: it makes TCP call the (now replaced) data-ready
   callback, so bytes that arrived before the insert are handed to the program now, not
   when the next segment comes (which, for a client waiting for an answer, is never);
3. each direction starts in user space: it reads what the program passed, writes it to the
   other socket, and once its socket is drained, reads the program's `passed` count; if
   every byte it counts was read here (none still on its way to the socket or on the
   psock's backlog), it tells the program to redirect from that count on. A byte passed
   after that read keeps the program passing until user space has forwarded it too, so no
   byte overtakes another.

Backpressure: the kernel queues a redirected skb on the receiving socket's psock and sends
it from a work queue, without any bound, so the program bounds it: past the bound
(`stream_proxy.sockmap_backlog`, by default tcp_rmem's max within 16-64 MiB) of redirected
bytes not yet in dst (it reads dst's TCP counters; `written_base`, given at each resume,
tells which of dst's bytes came from user space), it passes instead. The direction then runs
as during setup: this side reads the passed bytes once every redirected byte is in dst,
forwards them, and resumes; bytes passed but not yet read are charged to src's receive
buffer, whose window closes, so the sender waits. Measured: iperf3 over veths, whose client
had run 1.5 GB ahead of its server in 4 s, now stays within a few MiB of it
(tests/stream/test_sockmap.py), and the relay moves about twice as much for it (6.4 instead
of 3.4 Gbit/s in the bench's core rig), as the client no longer spends the shared core on
bytes that only queue up. Each such pause costs about one receive window of user-space
copying (what the sender may still send once the program passes), so the bound defaults to
the largest receive buffer (`bpf.sockmap.default_backlog`), and both sockets ask for a large
send buffer, which sets how fast the kernel empties the queue at all
(`sockmap_send_buffer`).

End of stream: each socket stays registered with the event loop for readability. With the
program attached, `recv` returns only passed bytes, b"" at the peer's FIN and ECONNRESET
at a reset, never the redirected bytes, so EOF and RST arrive as on the other paths. EOF
becomes `shutdown(SHUT_WR)` of the other socket once the receive queue is empty and all
redirected bytes are in the other socket (the program redirects through a work queue, so
the FIN would otherwise overtake them). A reset after a socket's EOF, when it is no longer
read, is found by the 1 s timeout sweep (SO_ERROR). Timeouts: the sweep reads the counters
to tell an idle connection from one whose bytes move only in the kernel.

Bytes TCP hands the program twice (a retransmission overlapping what it already had; kernel
6.18's tcp_read_skb passes such an skb whole) are cut off by the program; if it can't, it
drops the skb and marks the socket broken, and the sweep resets the connection (docs/ebpf.md).

When the pair can't be joined (the map refused a socket), it falls back to the splice path;
when the object can't be loaded at all, the server does (`connection_class_for`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
import struct
import termios
from typing import Any

from sluicegate import sysctl
from sluicegate.bpf.libbpf import BpfError
from sluicegate.bpf.sockmap import backlog as sockmap_backlog
from sluicegate.http.clock import CLOCK
from sluicegate.stream.connection import StreamConnection
from sluicegate.stream.copy_relay import CopyConnection
from sluicegate.stream.splice_relay import SpliceConnection, splice_available

__all__ = ["COPY_PATHS", "SockmapConnection", "connection_class_for"]

log = logging.getLogger("sluicegate.stream")

COPY_PATHS = ("auto", "sockmap", "splice", "userspace")
# What user space reads per recv while it copies (setup, backpressure): the splice path's
# pipe size, which bench/stream_copy.py found the cheapest per GiB.
READ_CHUNK = 1024 * 1024
# While bytes redirected in the kernel are still on their way to the other socket (before
# an EOF or a user-space copy may follow them), check again this often. Only directions
# that wait poll; 2 ms keeps a request/response exchange that hits it short.
SETTLE_SECONDS = 0.002
# Bytes redirected but not yet in the receiving socket above which the sweep logs a warning
# (once per direction), or 4x the program's bound (sockmap_backlog) if that is more: past
# it, the bound did not hold (module docs).
BACKLOG_WARN_BYTES = 64 * 1024 * 1024
# Drain-and-resume rounds per readiness event before leaving the rest to the next event.
RESUME_ROUNDS = 4
# struct tcp_info (linux/tcp.h): offsets of tcpi_bytes_acked and tcpi_bytes_received (u64,
# kernel 4.1+). SIOCINQ can't tell unprocessed bytes: on a socket in a sockmap it reports
# the bytes the program passed to user space, not what waits in the TCP receive queue.
TCPI_BYTES_ACKED = 120
TCPI_BYTES_RECEIVED = 128
TCP_INFO_SIZE = 256
SIOCOUTQ = termios.TIOCOUTQ
_INT = struct.Struct("i")
_U64 = struct.Struct("<Q")


def _ioctl_int(sock: socket.socket, request: int) -> int:
    import fcntl

    return int(_INT.unpack(fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0])


def _tcp_info_u64(sock: socket.socket, offset: int) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    if len(info) < offset + 8:
        raise OSError(errno.ENOTSUP, "TCP_INFO without bytes_acked/bytes_received (kernel < 4.1)")
    return int(_U64.unpack_from(info, offset)[0])


def bytes_written(sock: socket.socket) -> int:
    """Bytes written into `sock` so far: acked (TCP_INFO) + still queued (SIOCOUTQ). Read
    in that order, an ACK in between makes the sum smaller, never larger than the truth, so
    "everything arrived" is never concluded early."""
    return _tcp_info_u64(sock, TCPI_BYTES_ACKED) + _ioctl_int(sock, SIOCOUTQ)


def bytes_received(sock: socket.socket) -> int:
    """Payload bytes TCP has received on `sock` (TCP_INFO), processed or not."""
    return _tcp_info_u64(sock, TCPI_BYTES_RECEIVED)


def connection_class_for(copy: str) -> tuple[str, type[StreamConnection]]:
    """The copy path a server really uses for `copy` (one of COPY_PATHS) and its
    connection class. `sockmap` falls back to splice, then to the user-space copy, when the
    sockmap object can't be loaded here (logged once). `auto` is splice, else the user-space
    copy: splice moved the most per connection in every rig measured, while sockmap spends
    the least of the gateway process's CPU (docs/ebpf.md, docs/tproxy-vs-ebpf.md)."""
    if copy not in COPY_PATHS:
        raise ValueError(f"copy must be one of {', '.join(COPY_PATHS)}, not {copy!r}")
    if copy == "auto":
        copy = "splice" if splice_available() else "userspace"
    if copy == "sockmap":
        from sluicegate.bpf import sockmap

        reason = sockmap.available()
        if reason is None:
            log.info("stream copy: sockmap (TCP pairs joined in the kernel; up to %d KiB per "
                     "direction wait there for a slower receiver)", sockmap.backlog() >> 10)
            return "sockmap", SockmapConnection
        fallback = "splice" if splice_available() else "userspace"
        log.warning("stream copy: sockmap unavailable (%s): using %s", reason, fallback)
        copy = fallback
    if copy == "splice":
        if not splice_available():
            raise RuntimeError("the splice path needs os.splice (Linux, Python 3.10+)")
        return "splice", SpliceConnection
    return "userspace", CopyConnection


class _KernelDirection:
    """One direction of a sockmap pair: src's bytes reach dst, redirected by the program
    or, while it passes them, copied here."""

    __slots__ = ("base", "broken", "connection", "done", "dst", "dst_cookie", "eof", "kernel",
                 "kernel_stalled", "loop", "pending", "reading", "redirected", "resume_at",
                 "settle_timer", "src", "src_cookie", "src_in_map", "stalled_since", "stopped",
                 "swept_written", "user_moved", "warned", "writing")

    def __init__(self, connection: SockmapConnection, loop: asyncio.AbstractEventLoop,
                 src: socket.socket, dst: socket.socket, src_cookie: int, dst_cookie: int,
                 src_in_map: bool, kernel: bool) -> None:
        self.connection = connection
        self.loop = loop
        self.src = src
        self.dst = dst
        self.src_cookie = src_cookie
        self.dst_cookie = dst_cookie
        self.src_in_map = src_in_map
        self.kernel = kernel  # False: dst is not in the map, so never redirect
        self.stopped = False
        self.base = bytes_written(dst)
        self.user_moved = 0
        self.redirected = 0  # the program's count, refreshed when needed
        self.resume_at = -1  # what we last told the program (-1: never)
        self.pending = b""
        self.eof = False
        self.done = False
        self.reading = False
        self.writing = False
        self.settle_timer: asyncio.TimerHandle | None = None
        self.stalled_since = 0.0
        self.kernel_stalled = False  # stalled_since set by the sweep (kernel queue stuck)
        self.swept_written = -1
        self.warned = False
        self.broken = False  # the program dropped an skb it could not trim (bpf/sockmap.py)

    @property
    def moved(self) -> int:
        return self.user_moved + self.redirected

    def _splice(self) -> Any:
        return self.connection.maps

    def start(self) -> None:
        self._read_on()
        self.on_readable()

    def _read_on(self) -> None:
        if not self.reading and not self.done:
            self.loop.add_reader(self.src.fileno(), self.on_readable)
            self.reading = True

    def _read_off(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src.fileno())
            self.reading = False

    # -- reading what the program passed --------------------------------------------------
    def on_readable(self) -> None:
        if self.pending or self.settle_timer is not None or self.done:
            return
        try:
            self._drain_and_resume()
        except BpfError as exc:  # our entries are gone: the connection is closing
            self.connection.fail(OSError(exc.errno or errno.EIO, str(exc)))

    def _drain_and_resume(self) -> None:
        maps = self._splice()
        for _ in range(RESUME_ROUNDS):
            while True:
                try:
                    data = self.src.recv(READ_CHUNK)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self.connection.fail(exc)
                    return
                if not data:
                    self.eof = True
                    break
                self.pending = data
                self.connection.last_activity = CLOCK.now
                if not self._forward():
                    return  # waiting for the kernel queue or for dst to take more
            if self.eof:
                self._read_off()
                self._end_when_settled()
                return
            if not self.kernel:
                return
            # The `passed` count read now, with the socket drained: if every byte it counts
            # was read (and forwarded) here, redirecting from it on keeps the order, and a
            # byte passed between this read and the resume makes the program pass again.
            # Read before the drain instead, it is stale whenever bytes keep coming, so a
            # busy direction could resume only when its sender paused (measured: passing
            # phases of 100+ ms at 1 GB/s, a third of the bytes copied here).
            passed = maps.counts(self.src_cookie)[1]
            if self.user_moved < passed:
                # Counted but not readable yet (still on its way to the psock's queue, or on
                # its backlog): it becomes readable and this runs again.
                return
            if self.resume_at != passed:
                # Every byte of dst not from a redirect is one this direction wrote.
                maps.resume(self.src_cookie, self.dst_cookie, passed,
                            self.base + self.user_moved)
                self.resume_at = passed
            if maps.counts(self.src_cookie)[1] == passed:
                return  # redirecting in the kernel from the next byte on
            # Bytes were passed meanwhile: forward them, then try again.

    def _settled(self) -> bool:
        """Everything redirected so far has been written into dst."""
        if self.resume_at < 0:
            return True  # the program never redirected this direction
        self.redirected = self._splice().counts(self.src_cookie)[0]
        return bytes_written(self.dst) - self.base >= self.user_moved + self.redirected

    def _forward(self) -> bool:
        """Write `pending` to dst (after the redirected bytes). False: not done yet; this
        direction continues from a timer or a writability event."""
        try:
            settled = self._settled()
        except (OSError, BpfError) as exc:
            self.connection.fail(OSError(getattr(exc, "errno", 0) or errno.EIO, str(exc)))
            return False
        if not settled:
            self._wait(self._resume_forwarding)
            return False
        data = self.pending
        try:
            sent = self.dst.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.connection.fail(exc)
            return False
        self.user_moved += sent
        if sent < len(data):
            self.pending = data[sent:]
            self._read_off()
            if not self.writing:
                self.loop.add_writer(self.dst.fileno(), self._on_writable)
                self.writing = True
            if not self.stalled_since:
                self.stalled_since = CLOCK.now
            return False
        self.pending = b""
        self.stalled_since = 0.0
        return True

    def _on_writable(self) -> None:
        if self.writing:
            self.loop.remove_writer(self.dst.fileno())
            self.writing = False
        self._resume_forwarding()

    def _resume_forwarding(self) -> None:
        if self.done:
            return
        if self.pending and not self._forward():
            return
        self.connection.last_activity = CLOCK.now
        if self.eof:
            self._end_when_settled()
            return
        self._read_on()
        self.on_readable()

    def _wait(self, then: Any) -> None:
        self._read_off()
        if not self.stalled_since:
            self.stalled_since = CLOCK.now
        self.settle_timer = self.loop.call_later(SETTLE_SECONDS, self._waited, then)

    def _waited(self, then: Any) -> None:
        self.settle_timer = None
        if not self.done and not self.connection.finished:
            then()

    # -- end of stream -----------------------------------------------------------------
    def _end_when_settled(self) -> None:
        if self.pending and not self._forward():
            return
        while self.src_in_map:
            # recv reports the FIN as soon as it came, also while earlier bytes still wait
            # for the program; what it passes from those arrives here after the EOF.
            try:
                data = self.src.recv(READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.connection.fail(exc)
                return
            if not data:
                break
            self.pending = data
            if not self._forward():
                return  # continues here once forwarded
        try:
            waiting = self.src_in_map and (not self._processed() or not self._settled())
        except (OSError, BpfError) as exc:
            self.connection.fail(OSError(getattr(exc, "errno", 0) or errno.EIO, str(exc)))
            return
        if waiting:
            # Bytes still on their way through the program: the FIN must follow them.
            _kick(self.src)
            self._wait(self._end_when_settled)
            return
        self.stalled_since = 0.0
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)
        self.done = True
        self.connection.direction_done()

    def _processed(self) -> bool:
        """Every byte src received was redirected or read here (none waits in its TCP
        queue for the program)."""
        redirected = self._splice().counts(self.src_cookie)[0]
        # The peer's FIN advances the received count by one (it takes a sequence number).
        received = bytes_received(self.src) - (1 if self.eof else 0)
        return received <= redirected + self.user_moved + len(self.pending)

    def sweep_backlog(self, now: float) -> None:
        """Once per timeout sweep: bytes redirected but not yet in dst that did not move
        since the last sweep make the direction stalled (the send timeout then applies, as
        for a peer that stopped reading on the other paths)."""
        if self.resume_at < 0 or self.done:
            return
        try:
            written = bytes_written(self.dst) - self.base
        except OSError:
            return
        waiting = self.redirected + self.user_moved - written
        if waiting > max(BACKLOG_WARN_BYTES, 4 * sockmap_backlog()) and not self.warned:
            self.warned = True
            log.warning("stream relay for %s: %d MiB redirected in the kernel wait for the "
                        "receiver (more than the program's bound: the kernel kept queueing)",
                        self.connection.client_address[0], waiting >> 20)
        if waiting > 0 and written == self.swept_written:
            if not self.stalled_since:
                self.stalled_since = now
                self.kernel_stalled = True
        elif self.kernel_stalled:
            self.stalled_since = 0.0
            self.kernel_stalled = False
        self.swept_written = written

    def refresh(self) -> int:
        """The program's redirected count (for idle detection); also notes `broken`."""
        if self.src_in_map:
            with contextlib.suppress(OSError, BpfError):
                redirected, _, _, self.broken = self._splice().all_counts(self.src_cookie)
                if self.resume_at >= 0:
                    self.redirected = redirected
        return self.redirected

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self._read_off()
        if self.writing:
            self.loop.remove_writer(self.dst.fileno())
            self.writing = False
        if self.settle_timer is not None:
            self.settle_timer.cancel()
            self.settle_timer = None
        self.refresh()


@functools.cache
def sockmap_send_buffer() -> int | None:
    """The SO_SNDBUF the sockmap path asks for on its sockets: net.core.wmem_max (the most a
    request without CAP_NET_ADMIN gets; the kernel doubles it), when that is more than TCP's
    autotuning would grow a send buffer to (tcp_wmem's max); else None, TCP's own.

    Why: the kernel sends a redirected skb from the psock's work queue only while the
    receiving socket is writable (less than half its send buffer used); otherwise it tries
    again one jiffy later (4 ms at HZ=250), not when an ACK frees room. So a direction moves
    about half a send buffer per jiffy when its receiver is fast: measured in the bench's
    copy rig, 7.2 Gbit/s with the 4 MiB autotuned buffer, 8.7 with 8 MiB (wmem_max 4 MiB),
    and fewer bytes left to user space by the backpressure (docs/ebpf.md). Read once per
    process; None also where the namespace has no such sysctls (kernels before they were
    per namespace)."""
    wmem_max = sysctl.read_ints(sysctl.WMEM_MAX)
    tcp_wmem = sysctl.read_ints(sysctl.TCP_WMEM)
    if not wmem_max or not tcp_wmem or len(tcp_wmem) < 3:
        return None
    return wmem_max[0] if 2 * wmem_max[0] > tcp_wmem[2] else None


def _kick(sock: socket.socket) -> None:
    """Make TCP call the socket's data-ready callback now (tcp_set_rcvlowat does), so bytes
    queued before the program was attached are handed to it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


class SockmapConnection(SpliceConnection):
    """The kernel path: the pair joined by the sockmap program (see the module docs); the
    splice path when the map refuses a socket. ``spliced`` tells which one ran."""

    __slots__ = ("cookies", "maps", "spliced", "swept")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.maps: Any = None
        self.cookies: list[int] = []
        self.spliced = False
        self.swept = 0  # redirected bytes seen by the last timeout sweep

    async def start_relay(self, client_sock: socket.socket, upstream_sock: socket.socket
                          ) -> None:
        from sluicegate.bpf import libbpf, sockmap

        maps = sockmap.shared()
        client_cookie = sockmap.socket_cookie(client_sock)
        upstream_cookie = sockmap.socket_cookie(upstream_sock)
        try:
            maps.prepare(client_cookie, upstream_cookie)
            maps.prepare(upstream_cookie, client_cookie)
            maps.insert(client_cookie, client_sock)
        except libbpf.BpfError as error:
            # Not established any more (its FIN or RST came already; EOPNOTSUPP), or the
            # maps are full (E2BIG): nothing is in the SOCKHASH yet, so the splice path
            # takes the pair as it is.
            if error.errno != errno.EOPNOTSUPP:
                log.info("stream relay for %s: not spliced (%s)", self.client_address[0],
                         error)
            maps.forget(client_cookie)
            maps.forget(upstream_cookie)
            await super().start_relay(client_sock, upstream_sock)
            return
        self.maps = maps
        self.cookies = [client_cookie, upstream_cookie]
        upstream_in_map = True
        try:
            maps.insert(upstream_cookie, upstream_sock)
        except libbpf.BpfError as error:
            # The client is in the map now and taking it out would drop what the program
            # passed to it: copy both directions in user space instead (never redirect).
            log.info("stream relay for %s: upstream socket not spliced (%s)",
                     self.client_address[0], error)
            upstream_in_map = False
        self.spliced = upstream_in_map
        loop = asyncio.get_running_loop()
        self.upstream_sock = upstream_sock
        self.up = _KernelDirection(  # type: ignore[assignment]
            self, loop, client_sock, upstream_sock, client_cookie, upstream_cookie,
            src_in_map=True, kernel=upstream_in_map)
        self.down = _KernelDirection(  # type: ignore[assignment]
            self, loop, upstream_sock, client_sock, upstream_cookie, client_cookie,
            src_in_map=upstream_in_map, kernel=upstream_in_map)
        send_buffer = sockmap_send_buffer() if upstream_in_map else None
        for sock in (client_sock, upstream_sock):
            if send_buffer:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
            _kick(sock)
        self.up.start()  # type: ignore[union-attr]
        if not self.finished:
            self.down.start()  # type: ignore[union-attr]

    def _close(self, reset: bool) -> None:
        if self.finished:
            return
        if self.maps is not None:
            for direction in (self.up, self.down):
                if direction is not None:
                    direction.stop()
            for cookie in self.cookies:
                self.maps.forget(cookie)
            self.cookies = []
        super()._close(reset)

    def check_timeouts(self, now: float) -> None:
        if self.maps is not None and not self.finished:
            moved = 0
            for direction in (self.up, self.down):
                if not isinstance(direction, _KernelDirection):
                    continue
                moved += direction.refresh()
                if direction.broken:
                    # The stream has a gap (sockmap_splice.bpf.c): a reset, never bytes
                    # silently missing.
                    self.fail(OSError(errno.EIO, "sockmap: a retransmitted skb could not be "
                                      "trimmed and was dropped"))
                    return
                direction.sweep_backlog(now)
                if direction.eof and not direction.reading:
                    # No longer read: a reset would go unnoticed but for SO_ERROR.
                    error = _socket_error(direction.src)
                    if error:
                        self.fail(OSError(error, os.strerror(error)))
                        return
            if moved != self.swept:  # bytes moved in the kernel: not idle
                self.last_activity = now
                self.swept = moved
        super().check_timeouts(now)


def _socket_error(sock: socket.socket) -> int:
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    except OSError as exc:
        return exc.errno or errno.EBADF
