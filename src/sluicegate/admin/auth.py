"""Who may call the Admin API: a client address inside `admin.allow_admin` (else 403) with
the right `X-API-KEY` header (else 401).

There is no default key: the key comes from SLUICEGATE_ADMIN_KEY, else `admin.key`, else a
random one generated at start and logged once, so a fresh install is never open with a
well-known key (APISIX's old default key was a common way in).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sluicegate.config.model import AdminSettings

KEY_ENV = "SLUICEGATE_ADMIN_KEY"
KEY_HEADER = "X-API-KEY"
# 192 random bits, URL-safe: typed into curl and shell variables.
GENERATED_KEY_BYTES = 24

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AdminKey:
    value: str
    source: str  # "env", "config" or "generated"

    def __repr__(self) -> str:  # never print the secret by accident
        return f"AdminKey(source={self.source!r})"


def resolve_admin_key(settings: AdminSettings) -> AdminKey:
    """The environment overrides the file, so the CLI on the same host (which reads the
    same variable) and the server agree."""
    from_env = os.environ.get(KEY_ENV)
    if from_env:
        return AdminKey(from_env, "env")
    if settings.key:
        return AdminKey(settings.key, "config")
    return AdminKey(secrets.token_urlsafe(GENERATED_KEY_BYTES), "generated")


def key_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison: the time taken must not tell how much of a guess was right."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


class AddressFilter:
    """`allow_admin`: the networks a client address must fall in."""

    def __init__(self, cidrs: Sequence[str]) -> None:
        self.networks: list[IpNetwork] = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def allows(self, host: str | None) -> bool:
        if not host:
            return False  # a Unix socket or unknown peer: not an allowed address
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
            address = address.ipv4_mapped
        return any(address in network for network in self.networks
                   if network.version == address.version)
