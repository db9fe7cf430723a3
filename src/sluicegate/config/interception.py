"""Where interception is asked for: short-form `tproxy` plugin entries and the top-level
`interception:` block (the same options plus `service`). Both become the same entries."""

from __future__ import annotations

from typing import Any

from sluicegate.config.model import GatewayConfig


def tproxy_sources(config: GatewayConfig) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(config path, service, tproxy options) of every interception entry, in file order:
    the `plugins:` entries named tproxy, then the `interception:` block."""
    sources: list[tuple[str, str | None, dict[str, Any]]] = [
        (f"plugins[{index}]", entry.service, entry.config)
        for index, entry in enumerate(config.plugins) if entry.name == "tproxy"]
    if config.interception is not None:
        options = {k: v for k, v in config.interception.items() if k != "service"}
        service = config.interception.get("service")
        sources.append(("interception", service, options))
    return sources


def options_path(path: str) -> str:
    """Where an entry's tproxy options live: `plugins[0].config` or `interception`."""
    return path if path == "interception" else f"{path}.config"


def check_interception_block(config: GatewayConfig, errors: list[str],
                             warnings: list[str]) -> None:
    """The `interception:` block is validated as tproxy options (plus `service`); an
    undefined service is a warning, as for the plugin entry."""
    from sluicegate.config.load import find_service
    from sluicegate.plugins.base import validate_plugin

    block = config.interception
    if block is None:
        return
    service = block.get("service")
    if service is not None and not isinstance(service, str):
        errors.append("interception.service: must be a service id or name (a string)")
        return
    options = {k: v for k, v in block.items() if k != "service"}
    errors += validate_plugin("tproxy", options, "interception")[2]
    if service is not None and find_service(config, service) is None:
        warnings.append(f"interception.service: no service {service!r} is defined: "
                        "traffic goes to its original destination")
