"""The BPF loader: ctypes over Debian's libbpf.so.1 (package libbpf1), and the only module
that knows ctypes.

What it covers is what sluicegate needs (KERNEL.md lists what this kernel supports):
open and load a CO-RE object, find its programs and maps by name, attach a program to a
network namespace (sk_lookup) or to an interface's tcx hook with a BPF link, map updates,
lookups and deletes (per-CPU values included), pinning in a bpffs folder, and describing
pinned or attached objects (ids, names, types) for `sluicegate bpf status`.

Every failure raises `BpfError` whose `str()` is one line naming what was being done, the
errno name and, for a program the verifier refused, the verifier's last words.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LIBRARY = "libbpf.so.1"
# enum bpf_attach_type / bpf_link_type / bpf_prog_type / bpf_map_type values (uapi/bpf.h)
# that sluicegate uses or names in status.
BPF_SK_LOOKUP = 36
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_XDP = 37
# XDP attach modes (uapi/linux/if_link.h): generic (skb) or the driver's native hook.
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
BPF_ANY = 0
LINK_TYPES = {1: "raw_tracepoint", 2: "tracing", 3: "cgroup", 4: "iter", 5: "netns",
              6: "xdp", 7: "perf_event", 8: "kprobe_multi", 9: "struct_ops",
              10: "netfilter", 11: "tcx", 12: "uprobe_multi", 13: "netkit"}
LINK_TYPE_NETNS = 5
LINK_TYPE_TCX = 11
LINK_TYPE_XDP = 6
PROG_TYPES = {3: "sched_cls", 6: "xdp", 14: "sk_skb", 16: "sk_msg", 30: "sk_lookup",
              26: "tracing"}
MAP_TYPES = {1: "hash", 2: "array", 5: "percpu_hash", 6: "percpu_array", 9: "lru_hash",
             10: "lru_percpu_hash", 11: "lpm_trie", 15: "sockmap", 18: "sockhash",
             27: "ringbuf"}
BPF_OBJ_NAME_LEN = 16
# How many libbpf log lines to keep for error messages (the verifier log is long).
LOG_LINES = 400


class BpfError(Exception):
    """A BPF operation failed. `str()` is one line for users; `errno` is the error number."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.errno = code


# -- the library ----------------------------------------------------------------------------

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_log: list[str] = []
_printer: Any = None  # keeps the ctypes callback alive


def library() -> ctypes.CDLL:
    """libbpf.so.1, loaded once, with its log captured for error messages."""
    global _lib, _printer
    with _lock:
        if _lib is not None:
            return _lib
        try:
            lib = ctypes.CDLL(LIBRARY, use_errno=True)
        except OSError:
            raise BpfError(f"{LIBRARY} is not installed: install libbpf1 (Debian: apt-get "
                           "install libbpf1)", errno.ENOENT) from None
        _declare(lib)
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        vsnprintf = libc.vsnprintf
        vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                              ctypes.c_void_p]

        # libbpf prints through a printf-style callback with a va_list (a pointer on
        # x86-64 and arm64): format it with libc's vsnprintf and keep the last lines.
        @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
        def printer(level: int, fmt: bytes, args: int) -> int:
            buffer = ctypes.create_string_buffer(1 << 16)  # the verifier log comes whole
            vsnprintf(buffer, len(buffer), fmt, args)
            for line in buffer.value.decode(errors="replace").splitlines():
                if line.strip():
                    _log.append(line.rstrip())
            del _log[:-LOG_LINES]
            return 0

        _printer = printer
        lib.libbpf_set_print(printer)
        _lib = lib
        return lib


def _declare(lib: ctypes.CDLL) -> None:
    p, i, u32, c = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_char_p
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "libbpf_set_print": (p, [p]),
        "bpf_object__open_file": (p, [c, p]),
        "bpf_object__load": (i, [p]),
        "bpf_object__close": (None, [p]),
        "bpf_object__find_program_by_name": (p, [p, c]),
        "bpf_object__find_map_by_name": (p, [p, c]),
        "bpf_program__fd": (i, [p]),
        "bpf_program__attach_netns": (p, [p, i]),
        "bpf_program__attach_trace": (p, [p]),
        "bpf_map__fd": (i, [p]),
        "bpf_link__fd": (i, [p]),
        "bpf_link__destroy": (i, [p]),
        "bpf_link_create": (i, [i, i, i, p]),
        "bpf_link_detach": (i, [i]),
        "bpf_map_update_elem": (i, [i, p, p, ctypes.c_uint64]),
        "bpf_map_lookup_elem": (i, [i, p, p]),
        "bpf_map_delete_elem": (i, [i, p]),
        "bpf_map_get_next_key": (i, [i, p, p]),
        "bpf_obj_pin": (i, [i, c]),
        "bpf_obj_get": (i, [c]),
        "bpf_obj_get_info_by_fd": (i, [i, p, ctypes.POINTER(u32)]),
        "bpf_link_get_next_id": (i, [u32, ctypes.POINTER(u32)]),
        "bpf_link_get_fd_by_id": (i, [u32]),
        "bpf_prog_get_fd_by_id": (i, [u32]),
        "bpf_prog_query": (i, [i, i, u32, ctypes.POINTER(u32), ctypes.POINTER(u32),
                               ctypes.POINTER(u32)]),
        "libbpf_num_possible_cpus": (i, []),
        "bpf_prog_load": (i, [i, c, c, p, ctypes.c_size_t, p]),
        "bpf_prog_test_run_opts": (i, [i, p]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes


def _fail(doing: str, code: int) -> BpfError:
    code = abs(code) or ctypes.get_errno() or errno.EIO
    name = errno.errorcode.get(code, str(code))
    reason = os.strerror(code)
    hint = ""
    if doing.startswith("loading"):
        # The verifier's reason is the line before its statistics ("processed N insns").
        for index, line in enumerate(_log):
            if line.startswith("processed ") and index > 0:
                hint = ": verifier: " + _log[index - 1].strip()
    if code in (errno.EPERM, errno.EACCES) and not hint:
        reason += " (BPF needs root, or CAP_BPF with CAP_NET_ADMIN)"
    return BpfError(f"{doing} failed: {reason} ({name}){hint}", code)


def _check(result: int, doing: str) -> int:
    if result < 0:
        raise _fail(doing, -result if result != -1 else ctypes.get_errno())
    return result


def _pointer(result: int | None, doing: str) -> int:
    if not result:
        raise _fail(doing, ctypes.get_errno())
    return result


# -- objects --------------------------------------------------------------------------------

class Program:
    """A loaded program of an open `BpfObject`."""

    def __init__(self, obj: BpfObject, name: str, pointer: int) -> None:
        self.obj = obj
        self.name = name
        self.pointer = pointer

    @property
    def fd(self) -> int:
        return _check(library().bpf_program__fd(self.pointer), f"program {self.name}")

    def attach_netns(self, netns_fd: int) -> Link:
        """Attach (sk_lookup, flow_dissector) to the network namespace `netns_fd` names."""
        lib = library()
        link = _pointer(lib.bpf_program__attach_netns(self.pointer, netns_fd),
                        f"attaching {self.name} to the network namespace")
        return Link(self.name, lib.bpf_link__fd(link), link)

    def attach_tcx_ingress(self, ifindex: int, ifname: str = "") -> Link:
        """Attach (sched_cls) to the tcx ingress hook of interface `ifindex` (kernel 6.6+)."""
        fd = library().bpf_link_create(self.fd, ifindex, BPF_TCX_INGRESS, None)
        _check(fd, f"attaching {self.name} to tcx ingress of {ifname or ifindex}")
        return Link(self.name, fd, None)

    def attach_tcx_egress(self, ifindex: int, ifname: str = "") -> Link:
        """Attach (sched_cls) to the tcx egress hook of interface `ifindex` (kernel 6.6+)."""
        fd = library().bpf_link_create(self.fd, ifindex, BPF_TCX_EGRESS, None)
        _check(fd, f"attaching {self.name} to tcx egress of {ifname or ifindex}")
        return Link(self.name, fd, None)

    def attach_xdp(self, ifindex: int, flags: int, ifname: str = "") -> Link:
        """Attach (xdp) to interface `ifindex` with a BPF link; `flags`: XDP_FLAGS_SKB_MODE
        (generic), XDP_FLAGS_DRV_MODE (native) or 0 (native where the driver has it)."""
        opts = _LinkCreateOpts(ctypes.sizeof(_LinkCreateOpts), flags)
        fd = library().bpf_link_create(self.fd, ifindex, BPF_XDP, ctypes.byref(opts))
        _check(fd, f"attaching {self.name} to XDP of {ifname or ifindex}")
        return Link(self.name, fd, None)

    def attach_trace(self) -> Link:
        """Attach a tracing program (tp_btf/, raw_tp/) to the hook its section names."""
        lib = library()
        link = _pointer(lib.bpf_program__attach_trace(self.pointer),
                        f"attaching {self.name} to its tracepoint")
        return Link(self.name, lib.bpf_link__fd(link), link)


class _LinkCreateOpts(ctypes.Structure):
    # The head of libbpf's struct bpf_link_create_opts: sz, then flags (for XDP links, the
    # XDP_FLAGS_* mode). libbpf reads only the fields `sz` covers.
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32)]


class Map:
    """A map of an open `BpfObject` (or one opened from a pin)."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        result = library().bpf_map_update_elem(self.fd, key, value, flags)
        _check(result, f"updating map {self.name}")

    def lookup(self, key: bytes, value_size: int) -> bytes | None:
        value = ctypes.create_string_buffer(value_size)
        result = library().bpf_map_lookup_elem(self.fd, key, value)
        if result < 0:
            if -result == errno.ENOENT or ctypes.get_errno() == errno.ENOENT:
                return None
            _check(result, f"reading map {self.name}")
        return value.raw

    def lookup_percpu(self, key: bytes, value_size: int) -> list[bytes]:
        """A per-CPU map's values, one per possible CPU (slots rounded up to 8 bytes)."""
        slot = (value_size + 7) // 8 * 8
        cpus = _check(library().libbpf_num_possible_cpus(), "counting CPUs")
        raw = self.lookup(key, slot * cpus)
        if raw is None:
            return []
        return [raw[i * slot:i * slot + value_size] for i in range(cpus)]

    def delete(self, key: bytes) -> bool:
        """Delete `key`; False when it was absent."""
        result = library().bpf_map_delete_elem(self.fd, key)
        if result < 0:
            if -result == errno.ENOENT or ctypes.get_errno() == errno.ENOENT:
                return False
            _check(result, f"deleting from map {self.name}")
        return True

    def keys(self, key_size: int) -> Iterator[bytes]:
        lib = library()
        previous: bytes | None = None
        while True:
            following = ctypes.create_string_buffer(key_size)
            if lib.bpf_map_get_next_key(self.fd, previous, following) < 0:
                return
            previous = following.raw
            yield previous


class Link:
    """An attachment; detached when closed unless pinned (or held by another process)."""

    def __init__(self, name: str, fd: int, pointer: int | None) -> None:
        self.name = name
        self.fd = fd
        self.pointer = pointer  # a struct bpf_link * when libbpf made it

    def pin(self, path: str | Path) -> None:
        pin(self.fd, path, f"link {self.name}")

    def close(self) -> None:
        if self.pointer is not None:
            library().bpf_link__destroy(self.pointer)
            self.pointer = None
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class BpfObject:
    """An ELF object opened and loaded with libbpf; `close()` unloads what nothing else
    (a link, a pin, another fd) holds."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        lib = library()
        if not Path(self.path).is_file():
            raise BpfError(f"BPF object {self.path} is missing (reinstall sluicegate, or "
                           "`make bpf`)", errno.ENOENT)
        self.pointer: int | None = _pointer(
            lib.bpf_object__open_file(self.path.encode(), None), f"opening {self.path}")
        try:
            del _log[:]
            _check(lib.bpf_object__load(self.pointer), f"loading {Path(self.path).name}")
        except BpfError:
            self.close()
            raise

    def program(self, name: str) -> Program:
        assert self.pointer is not None
        found = library().bpf_object__find_program_by_name(self.pointer, name.encode())
        if not found:
            raise BpfError(f"{self.path} has no program {name}", errno.ENOENT)
        return Program(self, name, found)

    def map(self, name: str) -> Map:
        assert self.pointer is not None
        lib = library()
        found = lib.bpf_object__find_map_by_name(self.pointer, name.encode())
        if not found:
            raise BpfError(f"{self.path} has no map {name}", errno.ENOENT)
        return Map(name, _check(lib.bpf_map__fd(found), f"map {name}"))

    def close(self) -> None:
        if self.pointer is not None:
            library().bpf_object__close(self.pointer)
            self.pointer = None


# -- raw programs and test runs -------------------------------------------------------------

class _TestRunOpts(ctypes.Structure):
    # struct bpf_test_run_opts of libbpf 1.1 (bpf/bpf.h), `sz` first.
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p),
                ("data_out", ctypes.c_void_p), ("data_size_in", ctypes.c_uint32),
                ("data_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_void_p),
                ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]


def load_instructions(prog_type: int, name: str, instructions: bytes) -> int:
    """Load a program given as raw `struct bpf_insn` bytes (8 each); returns its fd. For
    programs of a few instructions that need no object file (the bench's frame source)."""
    buffer = ctypes.create_string_buffer(instructions, len(instructions))
    return _check(library().bpf_prog_load(prog_type, name.encode(), b"GPL", buffer,
                                          len(instructions) // 8, None),
                  f"loading the program {name}")


def test_run(prog_fd: int, data: bytes, repeat: int, flags: int = 0,
             batch_size: int = 0) -> int:
    """BPF_PROG_TEST_RUN `repeat` times on `data`; returns the program's last verdict.
    With BPF_F_TEST_XDP_LIVE_FRAMES an XDP program's verdicts are carried out (a redirect
    transmits the frame): the kernel's own packet source."""
    buffer = ctypes.create_string_buffer(data, len(data))
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.addressof(buffer),
                        data_size_in=len(data), repeat=repeat, flags=flags,
                        batch_size=batch_size)
    _check(library().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)),
           "running the program (BPF_PROG_TEST_RUN)")
    return opts.retval


# -- pins -----------------------------------------------------------------------------------

def pin(fd: int, path: str | Path, what: str = "object") -> None:
    _check(library().bpf_obj_pin(fd, str(path).encode()), f"pinning {what} at {path}")


def open_pinned(path: str | Path) -> int:
    """An fd for the object pinned at `path` (close it with os.close)."""
    return _check(library().bpf_obj_get(str(path).encode()), f"opening the pin {path}")


def open_pinned_map(path: str | Path) -> Map:
    return Map(Path(path).name, open_pinned(path))


# -- describing objects ---------------------------------------------------------------------

class _ProgInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("tag", ctypes.c_uint8 * 8), ("jited_prog_len", ctypes.c_uint32),
                ("xlated_prog_len", ctypes.c_uint32), ("jited_prog_insns", ctypes.c_uint64),
                ("xlated_prog_insns", ctypes.c_uint64), ("load_time", ctypes.c_uint64),
                ("created_by_uid", ctypes.c_uint32), ("nr_map_ids", ctypes.c_uint32),
                ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * BPF_OBJ_NAME_LEN)]


class _MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * BPF_OBJ_NAME_LEN)]


class _LinkInfo(ctypes.Structure):
    # type, id, prog_id, then a union aligned to 8 bytes; netns: {netns_ino, attach_type},
    # tcx: {ifindex, attach_type}.
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("first", ctypes.c_uint32), ("second", ctypes.c_uint32),
                ("_rest", ctypes.c_uint64 * 6)]


def _info(fd: int, info: ctypes.Structure) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(library().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
           "reading object info")


def fd_kind(fd: int) -> str:
    """"program", "map", "link" (or "other"): the anon inode an fd points at says which."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    # A link made by BPF_LINK_CREATE reads "bpf_link", one opened by id "bpf-link".
    return {"anon_inode:bpf-prog": "program", "anon_inode:bpf-map": "map",
            "anon_inode:bpf_link": "link", "anon_inode:bpf-link": "link"}.get(target, "other")


def describe(fd: int) -> dict[str, Any]:
    """{kind, id, name, type, ...} of a program, map or link fd."""
    kind = fd_kind(fd)
    if kind == "link":
        link = _LinkInfo()
        _info(fd, link)
        described: dict[str, Any] = {
            "kind": "link", "id": link.id, "type": LINK_TYPES.get(link.type, str(link.type)),
            "prog_id": link.prog_id, "program": program_name(link.prog_id)}
        if link.type == LINK_TYPE_NETNS:
            described["netns_ino"] = link.first
        elif link.type in (LINK_TYPE_TCX, LINK_TYPE_XDP):
            described["ifindex"] = link.first
        return described
    if kind == "program":
        prog = _ProgInfo()
        _info(fd, prog)
        return {"kind": "program", "id": prog.id, "name": prog.name.decode(),
                "type": PROG_TYPES.get(prog.type, str(prog.type)),
                "tag": bytes(prog.tag).hex()}
    if kind == "map":
        mapped = _MapInfo()
        _info(fd, mapped)
        return {"kind": "map", "id": mapped.id, "name": mapped.name.decode(),
                "type": MAP_TYPES.get(mapped.type, str(mapped.type)),
                "max_entries": mapped.max_entries}
    return {"kind": kind}


def program_name(prog_id: int) -> str:
    fd = library().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return ""
    try:
        info = _ProgInfo()
        _info(fd, info)
        return info.name.decode()
    finally:
        os.close(fd)


def links() -> Iterator[tuple[int, dict[str, Any]]]:
    """(fd, description) of every BPF link on the host (needs CAP_SYS_ADMIN); the caller
    closes each fd (or keeps it to detach the link)."""
    lib = library()
    current = ctypes.c_uint32(0)
    while lib.bpf_link_get_next_id(current.value, ctypes.byref(current)) == 0:
        fd = lib.bpf_link_get_fd_by_id(current.value)
        if fd < 0:
            continue  # gone meanwhile
        try:
            described = describe(fd)
        except BpfError:
            os.close(fd)
            continue
        yield fd, described


def attached_programs(ifindex: int, attach_type: int = BPF_TCX_INGRESS,
                      limit: int = 64) -> list[int]:
    """Ids of the programs attached to interface `ifindex` (of the caller's network
    namespace) at `attach_type` (BPF_PROG_QUERY)."""
    ids = (ctypes.c_uint32 * limit)()
    count = ctypes.c_uint32(limit)
    flags = ctypes.c_uint32(0)
    result = library().bpf_prog_query(ifindex, attach_type, 0, ctypes.byref(flags), ids,
                                      ctypes.byref(count))
    _check(result, f"querying the programs of interface {ifindex}")
    return list(ids[:count.value])


def detach_link(fd: int, what: str = "link") -> None:
    """Detach a link whoever holds it (BPF_LINK_DETACH): the program stops running there."""
    _check(library().bpf_link_detach(fd), f"detaching {what}")


def describe_pins(folder: str | Path) -> list[dict[str, Any]]:
    """What is pinned in `folder` (not recursive): one description per pin, with `pin`."""
    found = []
    root = Path(folder)
    if not root.is_dir():
        return []
    for path in sorted(root.iterdir()):
        try:
            fd = open_pinned(path)
        except BpfError as error:
            found.append({"pin": str(path), "error": str(error)})
            continue
        try:
            found.append({"pin": str(path), **describe(fd)})
        finally:
            os.close(fd)
    return found
