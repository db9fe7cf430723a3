"""`sluicegate schema`: the JSON Schema editors use to complete and check config files."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from harness import ROOT
from sluicegate.plugins.base import load_plugins

QUICKSTART = ROOT / "examples" / "quickstart.yaml"
SEED = {"plugins": [
    {"name": "tproxy", "service": "your_service_name",
     "config": {"listen": "0.0.0.0:80", "tproxy": True}},
    {"name": "prometheus", "config": {"metrics": True}},
]}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "sluicegate", "schema"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def definition(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return schema["$defs"][name]


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = definition(schema, node["$ref"].removeprefix("#/$defs/"))
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def accepted_types(schema: dict[str, Any], node: dict[str, Any]) -> set[str]:
    node = resolve(schema, node)
    types: set[str] = set()
    if "type" in node:
        types |= {node["type"]} if isinstance(node["type"], str) else set(node["type"])
    for key in ("anyOf", "oneOf"):
        for option in node.get(key, []):
            types |= accepted_types(schema, option)
    return types


def test_schema_is_a_draft_2020_12_object_schema(schema):
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object"
    assert schema["title"]


def test_schema_has_every_top_level_section(schema):
    assert {"gateway", "plugins", "routes", "services", "upstreams", "consumers",
            "global_rules"} <= set(schema["properties"])
    assert schema["properties"]["routes"]["type"] == "array"
    assert schema["properties"]["upstreams"]["type"] == "array"
    assert schema["properties"]["plugins"]["type"] == "array"


def test_schema_rejects_unknown_top_level_fields(schema):
    assert schema.get("additionalProperties") is False
    for name in ("RouteConfig", "UpstreamConfig", "ServiceConfig", "ConsumerConfig",
                 "GlobalRuleConfig", "PluginEntry", "GatewaySettings", "Timeout"):
        assert definition(schema, name).get("additionalProperties") is False, name


def test_every_schema_reference_resolves(schema):
    for ref in set(refs(schema)):
        assert ref.startswith("#/$defs/"), ref
        assert ref.removeprefix("#/$defs/") in schema["$defs"], f"dangling {ref}"


def test_every_plugin_has_a_definition(schema):
    for name in load_plugins():
        assert f"plugin-{name}" in schema["$defs"], name


def test_key_auth_definition_lists_its_options_with_descriptions(schema):
    key_auth = definition(schema, "plugin-key-auth")
    assert key_auth["type"] == "object"
    assert key_auth.get("additionalProperties") is False
    properties = key_auth["properties"]
    assert {"header", "query", "hide_credentials", "_meta"} <= set(properties)
    assert properties["header"]["default"] == "apikey"
    assert properties["header"]["description"]
    assert key_auth["description"]


@pytest.mark.parametrize("owner", ["RouteConfig", "ServiceConfig", "GlobalRuleConfig"])
def test_plugin_maps_point_at_plugin_definitions(schema, owner):
    plugins = definition(schema, owner)["properties"]["plugins"]
    assert plugins["type"] == "object"
    assert plugins.get("additionalProperties") is False
    assert plugins["properties"]["key-auth"] == {"$ref": "#/$defs/plugin-key-auth"}
    assert set(plugins["properties"]) == set(load_plugins())


def test_short_form_plugin_names_are_enumerated(schema):
    names = definition(schema, "PluginEntry")["properties"]["name"]["enum"]
    assert {"tproxy", "prometheus", "key-auth"} <= set(names)


def test_schema_shows_defaults(schema):
    timeout = definition(schema, "Timeout")["properties"]
    assert timeout["connect"]["default"] == 6.0
    upstream = definition(schema, "UpstreamConfig")["properties"]
    assert upstream["type"]["default"] == "roundrobin"
    assert set(upstream["type"]["enum"]) == {"roundrobin", "chash", "least_conn", "ewma"}
    assert set(upstream["pass_host"]["enum"]) == {"pass", "node", "rewrite"}


def test_schema_accepts_nodes_as_map_and_as_list(schema):
    # The validator takes `nodes: {"host:port": weight}` (the quickstart uses it) as well as
    # a list; an editor using the schema must not flag the map form as an error.
    nodes = definition(schema, "UpstreamConfig")["properties"]["nodes"]
    assert {"array", "object"} <= accepted_types(schema, nodes), nodes


def test_quickstart_uses_only_fields_the_schema_knows(schema):
    config = yaml.safe_load(QUICKSTART.read_text())
    assert set(config) <= set(schema["properties"])
    route_fields = set(definition(schema, "RouteConfig")["properties"])
    upstream_fields = set(definition(schema, "UpstreamConfig")["properties"])
    rule_fields = set(definition(schema, "GlobalRuleConfig")["properties"])
    for route in config.get("routes", []):
        assert set(route) <= route_fields, route
        assert set(route.get("plugins", {})) <= set(load_plugins())
    for upstream in config.get("upstreams", []):
        assert set(upstream) <= upstream_fields, upstream
    for rule in config.get("global_rules", []):
        assert set(rule) <= rule_fields, rule


def test_schema_validates_quickstart_and_seed_configs(schema):
    import jsonschema
    validator = jsonschema.Draft202012Validator(schema)
    for config in (yaml.safe_load(QUICKSTART.read_text()), SEED):
        problems = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(config)]
        assert problems == []


def test_schema_flags_unknown_fields_and_plugins(schema):
    import jsonschema
    validator = jsonschema.Draft202012Validator(schema)
    assert list(validator.iter_errors({"routez": []}))
    bad_plugin = {"routes": [{"uri": "/", "upstream": {"nodes": [{"host": "h"}]},
                              "plugins": {"key-auht": {}}}]}
    assert list(validator.iter_errors(bad_plugin))
