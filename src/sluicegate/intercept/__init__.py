"""Transparent interception: capture traffic whose clients do not know a proxy exists.

One contract (DESIGN.md, "Interceptor"): `install(spec)`, `remove()`, `status()`,
idempotent, and `remove()` also deletes what a crashed earlier process left. Implementations:
`TproxyInterceptor` (nftables TPROXY + policy routing). Whatever the mode, the gateway
receives an accepted socket and its original destination (`sockets.original_destination`)
and hands both to the same pipeline (`HttpServer.accept_socket`).
"""

from __future__ import annotations

from sluicegate.intercept.spec import (
    DEFAULT_FWMARK,
    DEFAULT_ROUTE_TABLE,
    InterceptSpec,
    check_loop,
    is_listener_destination,
)
from sluicegate.intercept.tproxy import InterceptError, TproxyInterceptor, local_addresses

__all__ = [
    "DEFAULT_FWMARK",
    "DEFAULT_ROUTE_TABLE",
    "InterceptError",
    "InterceptSpec",
    "TproxyInterceptor",
    "check_loop",
    "is_listener_destination",
    "local_addresses",
]
