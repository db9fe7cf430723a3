"""Kernel settings of the process's network namespace, read from /proc/sys (the values a
gateway running in a namespace sees are that namespace's own)."""

from __future__ import annotations

__all__ = ["TCP_RMEM", "TCP_WMEM", "WMEM_MAX", "read_ints"]

TCP_RMEM = "/proc/sys/net/ipv4/tcp_rmem"  # "min default max" of a TCP receive buffer
TCP_WMEM = "/proc/sys/net/ipv4/tcp_wmem"  # the same for send buffers (autotuning's max)
WMEM_MAX = "/proc/sys/net/core/wmem_max"  # the most SO_SNDBUF may ask for (unprivileged)


def read_ints(path: str) -> list[int] | None:
    """The whitespace-separated integers of a sysctl file; None if it can't be read or is
    not all integers."""
    try:
        with open(path) as sysctl:
            return [int(word) for word in sysctl.read().split()]
    except (OSError, ValueError):
        return None
