"""JSON Schema of the config file, for editors (`sluicegate schema`).

Plugin maps (`plugins:` of routes, services, global rules) list every known plugin with its
own schema, so an editor completes and checks plugin options too.
"""

from __future__ import annotations

import sys
from typing import Any

from sluicegate.config.model import GatewayConfig
from sluicegate.plugins.base import PluginMeta, load_plugins


def config_json_schema() -> dict[str, Any]:
    schema = GatewayConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "sluicegate config"
    registry = load_plugins()
    definitions = schema.setdefault("$defs", {})
    plugin_properties: dict[str, Any] = {}
    for name, cls in sorted(registry.items()):
        plugin_schema = cls.schema.model_json_schema(ref_template="#/$defs/{model}")
        for key, value in plugin_schema.pop("$defs", {}).items():
            definitions.setdefault(key, value)
        plugin_schema.setdefault("properties", {})["_meta"] = {"$ref": "#/$defs/PluginMeta"}
        module_doc = sys.modules[cls.__module__].__doc__ or ""
        plugin_schema["description"] = " ".join(
            (cls.__doc__ or module_doc).strip().split("\n\n")[0].split())
        definitions[f"plugin-{name}"] = plugin_schema
        plugin_properties[name] = {"$ref": f"#/$defs/plugin-{name}"}
    definitions["PluginMeta"] = PluginMeta.model_json_schema()
    plugin_map = {"type": "object", "properties": plugin_properties,
                  "additionalProperties": False}
    for model in ("RouteConfig", "ServiceConfig", "GlobalRuleConfig", "ConsumerGroupConfig",
                  "PluginConfigResource"):
        definitions[model]["properties"]["plugins"] = plugin_map
    # What validators accept beyond the field types: nodes as a {"host:port": weight} map,
    # and ids written as YAML integers.
    nodes = definitions["UpstreamConfig"]["properties"]["nodes"]
    definitions["UpstreamConfig"]["properties"]["nodes"] = {
        "anyOf": [nodes, {"type": "object", "minProperties": 1,
                          "additionalProperties": {"type": "integer", "minimum": 0}}],
        "description": 'a list of {host, port, weight}, or {"host:port": weight}'}
    for definition in definitions.values():
        for name, field in definition.get("properties", {}).items():
            if name in ("id", "upstream_id", "service_id", "plugin_config_id",
                        "group_id") and "anyOf" in field:
                field["anyOf"].append({"type": "integer", "minimum": 0})
    entry = definitions["PluginEntry"]
    entry["properties"]["name"]["enum"] = sorted(registry)
    # The `kernel:` block is a mapping in GatewayConfig, validated by config/kernel.py's
    # model: give editors that model.
    from sluicegate.config.kernel import KernelSettings

    kernel = KernelSettings.model_json_schema(ref_template="#/$defs/kernel-{model}")
    for key, value in kernel.pop("$defs", {}).items():
        definitions[f"kernel-{key}"] = value
    kernel["properties"]["flow_metrics"]["anyOf"].append({"type": "boolean"})
    schema["properties"]["kernel"] = {"anyOf": [kernel, {"type": "null"}],
                                      "description": schema["properties"]["kernel"].get(
                                          "description", "")}
    return schema
