"""Shapes shared by every resource that lists upstream nodes (HTTP upstreams, stream
routes): APISIX's `{"host:port": weight}` map and ids written as YAML integers.

No imports from the rest of the config package, so any model may use it.
"""

from __future__ import annotations

from typing import Any


def coerce_id(value: Any) -> Any:
    """APISIX ids are strings, but YAML users write `id: 1`."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int | str]:
    """`host:port` / `[v6]:port` / `host`; a port that is missing (and has no default) or
    is not a number is returned as text, for the validator to name."""
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
        if not host:
            host, port_text = text, ""
    if not port_text and default_port is not None:
        return host, default_port
    return host, int(port_text) if port_text.isdigit() else port_text


def nodes_from_map(value: Any, default_port: int | None = None) -> Any:
    """A `{"host:port": weight}` map as a list of node objects; every bad address is
    reported at once, named as the user wrote it. Other shapes pass through unchanged."""
    if not isinstance(value, dict):
        return value
    nodes, problems = [], []
    for address, weight in value.items():
        host, port = split_host_port(str(address), default_port)
        if not isinstance(port, int) or not 1 <= port <= 65535:
            problems.append(f"{str(address)!r} (expected host:port, port 1-65535)")
        nodes.append({"host": host, "port": port, "weight": weight})
    if problems:
        raise ValueError(f"bad node address {', '.join(problems)}")
    return nodes
