"""ip-restriction: admit or refuse a request by the client's IP address (v4 and v6, CIDRs)."""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Annotated

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from sluicegate.http.context import RequestContext
from sluicegate.plugins.base import Plugin, PluginConfig, PluginEnv, Response, register

_JSON = ("Content-Type", "application/json")
_V4_BITS = 32
# ::ffff:0:0/96 (RFC 4291 §2.5.5.2): how a dual-stack socket shows an IPv4 client.
_V4_MAPPED_PREFIX = 0xFFFF


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address or CIDR; host bits after the prefix are ignored (`10.1.2.3/8` is
    `10.0.0.0/8`), as APISIX's ip matcher does."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or CIDR: {text!r}") from None


def _checked(text: str) -> str:
    parse_network(text)
    return text


IpOrCidr = Annotated[str, AfterValidator(_checked)]


class IpRestrictionConfig(PluginConfig):
    """Exactly one of `whitelist` (only these clients pass) or `blacklist` (these clients
    are refused). The client is the connection's peer address (`remote_addr`)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    whitelist: list[IpOrCidr] | None = Field(None, min_length=1)
    """Addresses and CIDR ranges allowed, e.g. `["127.0.0.1", "10.0.0.0/8", "2001:db8::/32"]`;
    every other client is refused."""
    blacklist: list[IpOrCidr] | None = Field(None, min_length=1)
    """Addresses and CIDR ranges refused; every other client passes."""
    message: str = Field("Your IP address is not allowed", min_length=1, max_length=1024)
    """Message of the refusal, sent as `{"message": ...}`."""
    response_code: int = Field(403, ge=403, le=404)
    """Status of the refusal: 403, or 404 to hide that the route exists."""

    @model_validator(mode="after")
    def _one_list(self) -> IpRestrictionConfig:
        if (self.whitelist is None) == (self.blacklist is None):
            raise ValueError("set exactly one of whitelist or blacklist")
        return self


class AddressMatcher:
    """A set of networks compiled for per-request checks: the exact addresses as strings
    (one set lookup, no parsing, for the common single-IP rule), then one set lookup per
    distinct prefix length on the address as an integer. 100 CIDRs cost ~0.5 µs a check
    (see tests/plugins/test_ip_restriction.py::test_ip_restriction_check_is_fast)."""

    __slots__ = ("exact", "v4", "v6")

    def __init__(self, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        exact: set[str] = set()
        buckets: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}
        for network in networks:
            if network.prefixlen == network.max_prefixlen:
                exact.add(str(network.network_address))
            shift = network.max_prefixlen - network.prefixlen
            buckets[network.version].setdefault(shift, set()).add(
                int(network.network_address) >> shift)
        self.exact = frozenset(exact)
        # Longest prefixes first: the specific rules are the likelier hits.
        self.v4 = tuple((shift, frozenset(values)) for shift, values in
                        sorted(buckets[4].items()))
        self.v6 = tuple((shift, frozenset(values)) for shift, values in
                        sorted(buckets[6].items()))

    def match(self, address: str) -> bool:
        if address in self.exact:
            return True
        try:
            if ":" in address:
                value = int.from_bytes(socket.inet_pton(socket.AF_INET6,
                                                        address.partition("%")[0]), "big")
                if value >> _V4_BITS == _V4_MAPPED_PREFIX:
                    # Single addresses are in the /32 bucket too, so no string lookup.
                    value &= 0xFFFFFFFF
                    buckets = self.v4
                else:
                    buckets = self.v6
            else:
                value = int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
                buckets = self.v4
        except OSError:  # not an IP address (a Unix socket peer): matches nothing
            return False
        # A loop, not any(<generator>): 0.24 against 0.45 µs for three prefix lengths.
        for shift, values in buckets:  # noqa: SIM110
            if value >> shift in values:
                return True
        return False


@register
class IpRestriction(Plugin):
    """Refuses clients by IP: with `whitelist` everyone outside it, with `blacklist`
    everyone inside it, answering `response_code` with `{"message": message}`."""

    name = "ip-restriction"
    priority = 3000
    schema = IpRestrictionConfig

    def __init__(self, conf: IpRestrictionConfig, env: PluginEnv) -> None:
        super().__init__(conf, env)
        listed = conf.whitelist if conf.whitelist is not None else conf.blacklist or []
        self.matcher = AddressMatcher([parse_network(text) for text in listed])
        self.allow_listed = conf.whitelist is not None
        self.refusal = (conf.response_code,
                        json.dumps({"message": conf.message}).encode())

    def access(self, ctx: RequestContext) -> Response | None:
        if self.matcher.match(ctx.remote_addr) is self.allow_listed:
            return None
        status, body = self.refusal
        return Response(status, body, [_JSON])
