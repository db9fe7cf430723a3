"""eBPF: programs (`src/*.bpf.c`, built by `make bpf` into the committed `obj/*.bpf.o`) and
their loader (`libbpf.py`, ctypes over libbpf.so.1). See docs/ebpf.md."""

from __future__ import annotations

from pathlib import Path

OBJECTS = Path(__file__).resolve().parent / "obj"


def object_path(name: str) -> Path:
    """The compiled object `NAME.bpf.o` shipped with the package."""
    return OBJECTS / f"{name}.bpf.o"
