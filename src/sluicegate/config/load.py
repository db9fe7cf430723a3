"""Load and validate a config: YAML → schema (defaults) → semantic checks.

The file loader, and later the Admin API and the etcd watcher, all call `validate_config`:
one validation path. Every error names the field (`routes[0].upstream.nodes[1].port: ...`)
and all errors are reported at once; nothing is applied unless everything is valid.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sluicegate.config.interception import check_interception_block
from sluicegate.config.kernel import check_kernel_block
from sluicegate.config.model import GatewayConfig, RouteConfig, ServiceConfig
from sluicegate.config.tls import check_tls
from sluicegate.plugins.base import load_plugins, validate_plugin, validation_errors
from sluicegate.stream.routes import compile_stream_routes


class ConfigError(Exception):
    """A config that cannot be applied; `errors` lists `path: reason` lines."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass
class ValidatedConfig:
    config: GatewayConfig
    warnings: list[str] = field(default_factory=list)


# LibYAML's parser when PyYAML was built with it (the wheels are): ~8x faster than the
# pure-Python one, which made YAML parsing 70 % of an Admin API write (profile, file store).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML file into a mapping; errors name the file and the line."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}:{where}: invalid YAML: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping"])
    return data


def load_config_file(path: str | Path) -> ValidatedConfig:
    return validate_config(read_config_file(path))


def validate_config(data: dict[str, Any]) -> ValidatedConfig:
    """Validate a whole config; raises ConfigError listing every problem."""
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        # Report what else is wrong too (references, plugin options), from the raw data:
        # one run of `validate` should list every problem.
        raise ConfigError(validation_errors("", exc) + _raw_errors(data)) from None
    errors: list[str] = []
    warnings: list[str] = []
    _check_unique_ids(config, errors)
    _check_plugins(config, errors, warnings)
    check_interception_block(config, errors, warnings)
    check_kernel_block(config, errors)
    _check_references(config, errors)
    check_tls(config, errors, warnings)
    for index, route in enumerate(config.routes):
        _check_route_addresses(route, f"routes[{index}]", errors)
    try:
        compile_stream_routes(config.stream_routes, {u.id: u for u in config.upstreams if u.id})
    except ValueError as exc:
        errors.append(str(exc))
    if errors:
        raise ConfigError(errors)
    return ValidatedConfig(config, warnings)


def _check_unique_ids(config: GatewayConfig, errors: list[str]) -> None:
    for kind in ("routes", "services", "upstreams", "global_rules", "consumer_groups",
                 "plugin_configs"):
        seen: dict[str, int] = {}
        for index, item in enumerate(getattr(config, kind)):
            if item.id is None:
                if kind != "routes":
                    errors.append(f"{kind}[{index}].id: required")
                continue
            if item.id in seen:
                errors.append(f"{kind}[{index}].id: {item.id!r} already used by "
                              f"{kind}[{seen[item.id]}]")
            seen[item.id] = index
    names: dict[str, int] = {}
    for index, consumer in enumerate(config.consumers):
        if consumer.username in names:
            errors.append(f"consumers[{index}].username: {consumer.username!r} already used")
        names[consumer.username] = index


def find_service(config: GatewayConfig, name: str) -> ServiceConfig | None:
    """A service by id, or else by name (the short form names services)."""
    for service in config.services:
        if service.id == name:
            return service
    for service in config.services:
        if service.name == name:
            return service
    return None


def _check_plugins(config: GatewayConfig, errors: list[str], warnings: list[str]) -> None:
    registry = load_plugins()
    for index, entry in enumerate(config.plugins):
        path = f"plugins[{index}]"
        _, _, problems = validate_plugin(entry.name, entry.config, f"{path}.config")
        if problems and problems[0].endswith(")") and "unknown plugin" in problems[0]:
            problems = [problems[0].replace(f"{path}.config:", f"{path}.name:", 1)]
        errors += problems
        if entry.service is not None and find_service(config, entry.service) is None:
            cls = registry.get(entry.name)
            if cls is not None and cls.service_optional:
                warnings.append(f"{path}.service: no service {entry.service!r} is defined: "
                                "traffic goes to its original destination")
            else:
                errors.append(f"{path}.service: no service with id or name {entry.service!r}")
    for kind in ("routes", "services", "global_rules", "plugin_configs"):
        for index, item in enumerate(getattr(config, kind)):
            for name, conf in item.plugins.items():
                path = f"{kind}[{index}].plugins.{name}"
                _, _, problems = validate_plugin(name, conf, path)
                errors += problems
                if not problems and name in registry:
                    errors += [f"{path}.{reason}" for reason in
                               registry[name].check_siblings(conf, item.plugins)]
    for index, group in enumerate(config.consumer_groups):
        for name, conf in group.plugins.items():
            path = f"consumer_groups[{index}].plugins.{name}"
            if name in registry and registry[name].consumer_schema is not None:
                # A credential names one consumer; shared by a group it would name many.
                errors.append(f"{path}: credentials belong to consumers, not groups")
                continue
            errors += validate_plugin(name, conf, path)[2]
    credentials: dict[tuple[str, Any], int] = {}
    for index, consumer in enumerate(config.consumers):
        for name, conf in consumer.plugins.items():
            path = f"consumers[{index}].plugins.{name}"
            if name in registry and registry[name].consumer_schema is None:
                # Not a credential: a plugin that runs for this consumer's requests.
                errors += validate_plugin(name, conf, path)[2]
                continue
            model, _, problems = validate_plugin(name, conf, path, for_consumer=True)
            errors += problems
            unique = registry[name].consumer_unique_field if name in registry else None
            if model is not None and unique:
                value = getattr(model, unique)
                owner = credentials.setdefault((name, value), index)
                if owner != index:
                    # Two consumers with one credential: which one a request is becomes
                    # a guess. The value itself is a secret and is not echoed.
                    errors.append(f"{path}.{unique}: already used by consumers[{owner}]")


def _check_references(config: GatewayConfig, errors: list[str]) -> None:
    upstream_ids = {u.id for u in config.upstreams}
    services = {s.id: s for s in config.services}
    group_ids = {g.id for g in config.consumer_groups}
    plugin_config_ids = {p.id for p in config.plugin_configs}
    for index, consumer in enumerate(config.consumers):
        if consumer.group_id and consumer.group_id not in group_ids:
            errors.append(f"consumers[{index}].group_id: no consumer_group with id "
                          f"{consumer.group_id!r}")
    for index, service in enumerate(config.services):
        if service.upstream_id and service.upstream_id not in upstream_ids:
            errors.append(f"services[{index}].upstream_id: no upstream {service.upstream_id!r}")
    for index, route in enumerate(config.routes):
        path = f"routes[{index}]"
        if route.upstream_id and route.upstream_id not in upstream_ids:
            errors.append(f"{path}.upstream_id: no upstream {route.upstream_id!r}")
        if route.plugin_config_id and route.plugin_config_id not in plugin_config_ids:
            errors.append(f"{path}.plugin_config_id: no plugin_config with id "
                          f"{route.plugin_config_id!r}")
        service = services.get(route.service_id) if route.service_id else None
        if route.service_id and service is None:
            errors.append(f"{path}.service_id: no service {route.service_id!r}")
        if not _has_upstream(route, service) and not _served_by_plugin(
                route, service, config.plugin_configs):
            errors.append(f"{path}: no upstream (set upstream, upstream_id, or a service_id "
                          "whose service has one)")


def _served_by_plugin(route: RouteConfig, service: ServiceConfig | None,
                      plugin_configs: list[Any]) -> bool:
    """A plugin of the route (its own, its service's or its plugin_config's) answers
    requests itself (ai-proxy)."""
    registry = load_plugins()
    names = [*route.plugins, *(service.plugins if service else ())]
    names += [name for p in plugin_configs if p.id == route.plugin_config_id
              for name in p.plugins]
    return any(name in registry and registry[name].serves_requests for name in names)


def _has_upstream(route: RouteConfig, service: ServiceConfig | None) -> bool:
    if route.upstream or route.upstream_id:
        return True
    return bool(service and (service.upstream or service.upstream_id))


def _check_route_addresses(route: RouteConfig, path: str, errors: list[str]) -> None:
    for index, cidr in enumerate(route.remote_addrs or []):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            errors.append(f"{path}.remote_addrs[{index}]: {cidr!r} is not an IP or CIDR")


def _items(data: dict[str, Any], kind: str) -> list[tuple[int, dict[str, Any]]]:
    section = data.get(kind)
    if not isinstance(section, list):
        return []
    return [(index, item) for index, item in enumerate(section) if isinstance(item, dict)]


def _raw_errors(data: dict[str, Any]) -> list[str]:
    """Reference and plugin errors found in a config that failed the schema, best effort."""
    errors: list[str] = []
    upstream_ids = {str(item.get("id")) for _, item in _items(data, "upstreams")}
    service_ids = {str(item.get("id")) for _, item in _items(data, "services")}
    plugin_config_ids = {str(item.get("id")) for _, item in _items(data, "plugin_configs")}
    group_ids = {str(item.get("id")) for _, item in _items(data, "consumer_groups")}
    for index, item in _items(data, "consumers"):
        target = item.get("group_id")
        if target is not None and str(target) not in group_ids:
            errors.append(f"consumers[{index}].group_id: no consumer_group with id "
                          f"{str(target)!r}")
    for kind in ("routes", "services", "global_rules", "plugin_configs"):
        for index, item in _items(data, kind):
            path = f"{kind}[{index}]"
            for key, known, what in (("upstream_id", upstream_ids, "upstream"),
                                       ("service_id", service_ids, "service"),
                                       ("plugin_config_id", plugin_config_ids,
                                        "plugin_config with id")):
                target = item.get(key)
                if target is not None and kind in ("routes", "services") and \
                        str(target) not in known:
                    errors.append(f"{path}.{key}: no {what} {str(target)!r}")
            plugins = item.get("plugins")
            if isinstance(plugins, dict):
                for name, conf in plugins.items():
                    errors += validate_plugin(str(name), conf, f"{path}.plugins.{name}")[2]
    return errors
