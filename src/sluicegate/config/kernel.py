"""The top-level `kernel:` block: in-kernel traffic control (an XDP filter) and kernel flow
metrics (tc + a TCP retransmit tracepoint). See docs/ebpf.md and sluicegate/bpf/kernel.py.

```yaml
kernel:
  optional: false            # true: run without what this kernel cannot do (logged)
  xdp:
    interfaces: [eth1]
    mode: auto               # native | generic | auto
    deny: ["192.0.2.0/24", "2001:db8:bad::/48"]
    rate_limit: {rate: 1000, burst: 2000}     # packets/s per source address
    syn_rate_limit: {rate: 20, burst: 40}     # new TCP connections/s per source address
    exempt: ["10.0.9.0/24"]                   # sources the rate limits skip
  flow_metrics: {}           # or true; interfaces default to xdp.interfaces
```

The block is validated here (errors as `kernel.xdp.deny[2]: ...`) by the one validation
path (`config/load.py` calls `check_kernel_block`).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# Mirrors of bpf/src/xdp_filter.h and flow_stats.h (the maps are sized at build time).
MAX_DENY_RULES = 8192
MAX_INTERFACES = 64
# Linux interface names: up to IFNAMSIZ-1 bytes, no slash or whitespace.
IFNAME = re.compile(r"^[^/\s]{1,15}$")
# Faster than one packet per 10 ns per source is no limit at all on any NIC we know; the
# bound also keeps burst * interval far inside 64 bits.
MAX_RATE = 100_000_000


class _Strict(BaseModel):
    """Unknown fields are errors: a typo must not silently turn a filter off."""

    model_config = ConfigDict(extra="forbid")


def _check_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR") from None
    return value


def _check_ifname(value: str) -> str:
    if not IFNAME.match(value):
        raise ValueError(f"{value!r} is not an interface name")
    return value


Cidr = Annotated[str, AfterValidator(_check_cidr)]
Interface = Annotated[str, AfterValidator(_check_ifname)]


class RateLimit(_Strict):
    """A per-source limit: `rate` per second on average, up to `burst` at once (a token
    bucket of `burst` tokens refilled at `rate`)."""

    rate: float = Field(gt=0, le=MAX_RATE)
    burst: int | None = Field(None, ge=1, le=MAX_RATE)
    """Default: one second's worth of `rate` (at least 1)."""

    @property
    def bucket(self) -> int:
        return self.burst if self.burst is not None else max(1, round(self.rate))


class XdpSettings(_Strict):
    """The XDP filter: per interface, before the kernel's network stack."""

    interfaces: list[Interface] = Field(min_length=1, max_length=MAX_INTERFACES)
    mode: Literal["native", "generic", "auto"] = "auto"
    """native: the driver's hook (fastest; fails where the driver has none); generic: after
    the driver (any interface); auto: native where available, else generic."""
    deny: list[Cidr] = Field(default_factory=list, max_length=MAX_DENY_RULES)
    """Source prefixes whose packets are dropped (IPv4 and IPv6)."""
    rate_limit: RateLimit | None = None
    """Packets per second per source address (every IPv4/IPv6 packet it sends in)."""
    exempt: list[Cidr] = Field(default_factory=list, max_length=MAX_DENY_RULES)
    """Source prefixes the rate limits never apply to (health checkers, upstream networks);
    a deny rule still does."""
    syn_rate_limit: RateLimit | None = None
    """New TCP connections (SYNs) per second per source address."""

    @field_validator("interfaces")
    @classmethod
    def _unique_interfaces(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("an interface is listed twice")
        return value

    def deny_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(cidr, strict=False) for cidr in self.deny]

    def exempt_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(cidr, strict=False) for cidr in self.exempt]


class FlowMetricsSettings(_Strict):
    """Kernel flow metrics: packets, bytes and new TCP connections per interface, direction
    and port (tc), TCP retransmits (tracepoint), and the busiest remote prefixes."""

    interfaces: list[Interface] | None = Field(None, min_length=1, max_length=MAX_INTERFACES)
    """Default: the XDP filter's interfaces."""
    retransmits: bool = True
    """Count this network namespace's TCP retransmits (tp_btf/tcp_retransmit_skb)."""
    top_remotes: int = Field(10, ge=0, le=1000)
    """How many remote prefixes /metrics lists (the busiest by bytes); 0: none."""
    remote_prefix_v4: int = Field(24, ge=0, le=32)
    remote_prefix_v6: int = Field(64, ge=0, le=128)


class KernelSettings(_Strict):
    """The `kernel:` block."""

    optional: bool = False
    """true: when this kernel (or the process's privileges) lacks a hook, log one line and
    run without that part; false: refuse to start (exit 3)."""
    xdp: XdpSettings | None = None
    flow_metrics: FlowMetricsSettings | None = None

    @field_validator("flow_metrics", mode="before")
    @classmethod
    def _flow_metrics_switch(cls, value: Any) -> Any:
        # `flow_metrics: true` turns them on with the defaults.
        if value is True:
            return {}
        if value is False:
            return None
        return value

    @model_validator(mode="after")
    def _flow_interfaces(self) -> KernelSettings:
        if self.flow_metrics is not None and self.flow_metrics.interfaces is None \
                and self.xdp is None:
            raise ValueError("flow_metrics.interfaces: required when there is no xdp block")
        return self

    def flow_interfaces(self) -> list[str]:
        if self.flow_metrics is None:
            return []
        if self.flow_metrics.interfaces is not None:
            return list(self.flow_metrics.interfaces)
        return list(self.xdp.interfaces) if self.xdp is not None else []


def parse_kernel_block(block: dict[str, Any] | None) -> KernelSettings | None:
    """The validated block (None when absent); raises ValueError with `kernel.` paths."""
    if block is None:
        return None
    errors = kernel_block_errors(block)
    if errors:
        raise ValueError("; ".join(errors))
    return KernelSettings.model_validate(block)


def kernel_block_errors(block: Any) -> list[str]:
    """`kernel.path: reason` lines for an invalid block, [] for a valid one."""
    from sluicegate.plugins.base import validation_errors

    if block is None:
        return []
    if not isinstance(block, dict):
        return ["kernel: must be a mapping"]
    try:
        KernelSettings.model_validate(block)
    except ValidationError as exc:
        return validation_errors("kernel", exc)
    return []


def check_kernel_block(config: Any, errors: list[str]) -> None:
    """Called by config/load.py's `validate_config` (the one validation path)."""
    errors += kernel_block_errors(getattr(config, "kernel", None))
