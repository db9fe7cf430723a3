"""The one validation path (`validate_config`) and the YAML loader in front of it: both config
forms, and every error as `path.to.field: reason`, all reported at once."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml

from sluicegate.config.load import (
    ConfigError,
    ValidatedConfig,
    load_config_file,
    read_config_file,
    validate_config,
)

SEED_YAML = """\
plugins:
  - name: tproxy
    service: your_service_name
    config: {listen: "0.0.0.0:80", tproxy: true}
  - name: prometheus
    config: {metrics: true}
"""
SEED = yaml.safe_load(SEED_YAML)

NODES = {"127.0.0.1:8080": 1}

FULL: dict[str, Any] = {
    "gateway": {"listen": ["127.0.0.1:9080"]},
    "upstreams": [
        {"id": "web", "type": "roundrobin", "nodes": {"127.0.0.1:8080": 1, "127.0.0.1:8081": 2},
         "timeout": {"connect": 1, "send": 2, "read": 3}, "retries": 1, "pass_host": "node",
         "scheme": "http"},
        {"id": "by-user", "type": "chash", "hash_on": "header", "key": "x-user",
         "nodes": [{"host": "10.0.0.1", "port": 80, "weight": 1},
                   {"host": "10.0.0.2", "port": 8080, "weight": 3}]},
    ],
    "services": [
        {"id": "shop", "name": "shop", "upstream_id": "web", "plugins": {"request-id": {}}},
    ],
    "routes": [
        {"id": "login", "uri": "/login", "methods": ["POST"], "service_id": "shop",
         "plugins": {"key-auth": {}}},
        {"id": "api", "uris": ["/api/*", "/v2/*"], "hosts": ["*.example.com", "api.example.org"],
         "upstream_id": "by-user", "priority": 10,
         "vars": [["arg_x", "==", "1"], ["http_h", "~~", "re"]]},
        {"id": "static", "uri": "/static/*", "host": "cdn.example.com", "status": 0,
         "upstream": {"nodes": {"127.0.0.1:9000": 1}, "pass_host": "rewrite",
                      "upstream_host": "static.internal"}},
    ],
    "consumers": [{"username": "alice", "plugins": {"key-auth": {"key": "alice-key"}}}],
    "global_rules": [{"id": "metrics", "plugins": {"prometheus": {}}}],
}

# `path.to.field: reason`: names and [index] segments, then ": " and a reason.
ERROR_LINE = re.compile(r"^[A-Za-z_][\w\-]*(?:\[\d+\]|\.[A-Za-z_][\w\-]*)*: \S.*$", re.DOTALL)


def errors_of(config: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    errors = caught.value.errors
    assert errors, "ConfigError without errors"
    for line in errors:
        assert ERROR_LINE.match(line), f"not `path.to.field: reason`: {line!r}"
    return errors


def one_route(**route: Any) -> dict[str, Any]:
    return {"routes": [{"id": "r", "uri": "/", "upstream": {"nodes": dict(NODES)}, **route}]}


def error_at(errors: list[str], path: str) -> str:
    """The error whose path is exactly `path`."""
    matching = [line for line in errors if line.startswith(f"{path}: ")]
    assert matching, f"no error at {path}; got {errors}"
    return matching[0]


# -- the seed short form -------------------------------------------------------------------


def test_seed_short_form_validates():
    validated = validate_config(copy.deepcopy(SEED))
    assert isinstance(validated, ValidatedConfig)
    entries = validated.config.plugins
    assert [entry.name for entry in entries] == ["tproxy", "prometheus"]
    assert entries[0].service == "your_service_name"
    assert entries[0].config == {"listen": "0.0.0.0:80", "tproxy": True}


def test_seed_short_form_warns_about_the_undefined_service():
    validated = validate_config(copy.deepcopy(SEED))
    assert len(validated.warnings) == 1
    warning = validated.warnings[0]
    assert warning.startswith("plugins[0].service: ")
    assert "your_service_name" in warning


def test_short_form_service_naming_a_defined_service_has_no_warning():
    config = copy.deepcopy(SEED)
    config["services"] = [{"id": "s1", "name": "your_service_name",
                           "upstream": {"nodes": dict(NODES)}}]
    assert validate_config(config).warnings == []


def test_short_form_entry_needs_a_defined_service_unless_the_plugin_allows_none():
    errors = errors_of({"plugins": [{"name": "prometheus", "service": "nowhere"}]})
    assert "nowhere" in error_at(errors, "plugins[0].service")


def test_short_form_bad_plugin_config_names_the_option():
    errors = errors_of({"plugins": [{"name": "tproxy", "config": {"listen": "no-port",
                                                                    "tproxy": "maybe"}}]})
    assert "no-port" in error_at(errors, "plugins[0].config.listen")
    error_at(errors, "plugins[0].config.tproxy")


def test_short_form_unknown_plugin_names_the_name_field():
    errors = errors_of({"plugins": [{"name": "tproxi", "config": {}}]})
    line = error_at(errors, "plugins[0].name")
    assert "tproxi" in line
    assert "tproxy" in line  # the known plugins are listed


def test_empty_config_is_valid_and_gets_the_default_listener():
    validated = validate_config({})
    assert validated.config.gateway.listen == ["0.0.0.0:9080"]
    assert validated.config.routes == []


# -- the full form -------------------------------------------------------------------------


def test_full_form_validates_without_warnings():
    validated = validate_config(copy.deepcopy(FULL))
    assert validated.warnings == []
    config = validated.config
    assert [r.id for r in config.routes] == ["login", "api", "static"]
    assert [s.id for s in config.services] == ["shop"]
    assert [u.id for u in config.upstreams] == ["web", "by-user"]
    assert [c.username for c in config.consumers] == ["alice"]
    assert [g.id for g in config.global_rules] == ["metrics"]


def test_full_form_keeps_apisix_field_values():
    config = validate_config(copy.deepcopy(FULL)).config
    login, api, static = config.routes
    assert login.methods == ["POST"] and login.service_id == "shop"
    assert api.uris == ["/api/*", "/v2/*"]
    assert api.hosts == ["*.example.com", "api.example.org"]
    assert api.priority == 10 and api.upstream_id == "by-user"
    assert static.status == 0 and static.host == "cdn.example.com"
    assert static.upstream.pass_host == "rewrite"
    assert static.upstream.upstream_host == "static.internal"
    web = config.upstreams[0]
    assert (web.timeout.connect, web.timeout.send, web.timeout.read) == (1, 2, 3)
    assert web.retries == 1 and web.pass_host == "node"
    by_user = config.upstreams[1]
    assert (by_user.type, by_user.hash_on, by_user.key) == ("chash", "header", "x-user")


def test_schema_fills_defaults():
    upstream = validate_config(one_route()).config.routes[0].upstream
    assert upstream.type == "roundrobin"
    assert (upstream.timeout.connect, upstream.timeout.send, upstream.timeout.read) == \
        (6.0, 60.0, 60.0)
    assert upstream.pass_host == "pass"
    assert upstream.scheme == "http"
    assert upstream.retries is None  # compiled later to "number of nodes - 1"


def test_numeric_ids_from_yaml_are_accepted_as_strings():
    config = validate_config({"upstreams": [{"id": 1, "nodes": dict(NODES)}],
                              "routes": [{"id": 7, "uri": "/", "upstream_id": 1}]}).config
    assert config.upstreams[0].id == "1"
    assert config.routes[0].id == "7" and config.routes[0].upstream_id == "1"


def test_route_with_service_that_has_an_upstream_needs_no_upstream_of_its_own():
    validate_config({"upstreams": [{"id": "u", "nodes": dict(NODES)}],
                     "services": [{"id": "s", "upstream_id": "u"}],
                     "routes": [{"uri": "/", "service_id": "s"}]})


def test_route_matching_fields_accept_apisix_shapes():
    validate_config(one_route(uri="/exact", host="*.example.com", methods=["GET", "HEAD"],
                              vars=[["arg_x", "==", "1"], ["http_h", "~~", "^re.*$"],
                                    ["arg_y", "!", "==", "2"]],
                              remote_addrs=["10.0.0.0/8", "192.168.1.1"]))


# -- nodes ---------------------------------------------------------------------------------


def test_nodes_as_map_become_host_port_weight():
    nodes = validate_config(one_route(upstream={"nodes": {
        "127.0.0.1:8080": 3, "example.com": 1, "[::1]:9000": 2}})).config.routes[0].upstream.nodes
    assert [(n.host, n.port, n.weight) for n in nodes] == [
        ("127.0.0.1", 8080, 3), ("example.com", 80, 1), ("::1", 9000, 2)]


def test_nodes_as_list_equal_nodes_as_map():
    as_map = validate_config(one_route(upstream={"nodes": {"127.0.0.1:8080": 3}}))
    as_list = validate_config(one_route(upstream={"nodes": [
        {"host": "127.0.0.1", "port": 8080, "weight": 3}]}))
    assert as_map.config.routes[0].upstream.nodes == as_list.config.routes[0].upstream.nodes


def test_node_list_error_names_the_node_index_and_field():
    errors = errors_of(one_route(upstream={"nodes": [
        {"host": "a", "port": 80}, {"host": "b", "port": 70000}]}))
    error_at(errors, "routes[0].upstream.nodes[1].port")


@pytest.mark.parametrize("address", ["127.0.0.1:http", "127.0.0.1:99999", "127.0.0.1:0",
                                     "[::1]:x"])
def test_node_map_address_with_bad_port_is_rejected_naming_the_address(address):
    errors = errors_of(one_route(upstream={"nodes": {address: 1}}))
    line = error_at(errors, "routes[0].upstream.nodes")
    assert repr(address) in line or address in line


def test_every_bad_node_address_in_a_map_is_reported():
    errors = errors_of(one_route(upstream={"nodes": {"a:http": 1, "b:99999": 1}}))
    text = "\n".join(errors)
    assert "a:http" in text
    assert "b:99999" in text


@pytest.mark.parametrize("field", ["listen", "metrics_listen"])
def test_gateway_address_without_port_is_rejected(field):
    value = ["localhost"] if field == "listen" else "localhost"
    errors = errors_of({"gateway": {field: value}})
    line = next(line for line in errors if line.startswith(f"gateway.{field}"))
    assert "localhost" in line and "host:port" in line


def test_every_bad_listen_address_is_reported():
    errors = errors_of({"gateway": {"listen": ["nope", "127.0.0.1:99999"]}})
    text = "\n".join(errors)
    assert "nope" in text
    assert "99999" in text


def test_upstream_without_nodes_is_rejected():
    errors = errors_of(one_route(upstream={"nodes": []}))
    error_at(errors, "routes[0].upstream.nodes")


def test_upstream_whose_nodes_all_weigh_zero_is_rejected():
    errors = errors_of(one_route(upstream={"nodes": {"a:1": 0, "b:2": 0}}))
    assert any(line.startswith("routes[0].upstream") and "weight" in line for line in errors)


# -- error form and reporting --------------------------------------------------------------


def test_error_paths_carry_list_indexes():
    config = {"routes": [
        {"id": "ok", "uri": "/a", "upstream": {"nodes": dict(NODES)}},
        {"id": "bad", "uri": "/b", "upstream": {"nodes": [{"host": "h", "port": 0}]}},
    ]}
    errors = errors_of(config)
    assert error_at(errors, "routes[1].upstream.nodes[0].port")
    assert not any(line.startswith("routes[0]") for line in errors)


def test_multiple_errors_are_all_reported_at_once():
    config = {
        "routes": [
            {"uri": "no-slash", "upstream": {"nodes": dict(NODES)}},
            {"uri": "/b", "upstream": {"nodes": [{"host": "h", "port": 0}]}},
        ],
        "upstreams": [{"id": "u", "nodes": dict(NODES), "timeout": {"connect": -1}}],
        "consumers": [{"username": "bad name!"}],
    }
    errors = errors_of(config)
    for path in ("routes[0].uri", "routes[1].upstream.nodes[0].port",
                 "upstreams[0].timeout.connect", "consumers[0].username"):
        error_at(errors, path)
    assert len(errors) == 4, errors


def test_multiple_semantic_errors_are_all_reported_at_once():
    config = {
        "routes": [
            {"id": "a", "uri": "/a", "upstream_id": "missing"},
            {"id": "a", "uri": "/b", "upstream": {"nodes": dict(NODES)},
             "plugins": {"no-such-plugin": {}}},
        ],
        "services": [{"id": "s", "upstream_id": "also-missing"}],
    }
    errors = errors_of(config)
    error_at(errors, "routes[0].upstream_id")
    error_at(errors, "routes[1].id")
    error_at(errors, "routes[1].plugins.no-such-plugin")
    error_at(errors, "services[0].upstream_id")


def test_schema_and_reference_errors_are_reported_together():
    # One pass tells the user everything: a typo in one route does not hide a dangling
    # reference in another.
    config = {"routes": [
        {"id": "a", "uri": "no-slash", "upstream": {"nodes": dict(NODES)}},
        {"id": "b", "uri": "/b", "upstream_id": "missing"},
    ]}
    errors = errors_of(config)
    error_at(errors, "routes[0].uri")
    error_at(errors, "routes[1].upstream_id")


def test_config_error_message_lists_every_error_line():
    with pytest.raises(ConfigError) as caught:
        validate_config({"routes": [{"uri": "x"}, {"uri": "y"}]})
    assert str(caught.value).splitlines() == caught.value.errors


# -- unknown fields ------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "path"), [
    ({"routez": []}, "routez"),
    (one_route(upstrem={"nodes": dict(NODES)}), "routes[0].upstrem"),
    (one_route(upstream={"nodes": dict(NODES), "retry": 2}), "routes[0].upstream.retry"),
    (one_route(upstream={"nodes": dict(NODES), "timeout": {"conect": 1}}),
     "routes[0].upstream.timeout.conect"),
    ({"gateway": {"listen": ["127.0.0.1:1"], "worker": 2}}, "gateway.worker"),
    ({"plugins": [{"name": "prometheus", "conf": {}}]}, "plugins[0].conf"),
    ({"consumers": [{"username": "a", "key": "k"}]}, "consumers[0].key"),
])
def test_unknown_fields_are_rejected_by_path(config, path):
    errors = errors_of(config)
    error_at(errors, path)


# -- plugins -------------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "path"), [
    (one_route(plugins={"key-auht": {}}), "routes[0].plugins.key-auht"),
    ({"services": [{"id": "s", "plugins": {"nope": {}}}]}, "services[0].plugins.nope"),
    ({"global_rules": [{"id": "g", "plugins": {"nope": {}}}]}, "global_rules[0].plugins.nope"),
])
def test_unknown_plugin_name_names_the_field(config, path):
    line = error_at(errors_of(config), path)
    assert "unknown plugin" in line
    assert "key-auth" in line  # known plugins are listed


def test_bad_plugin_option_names_the_plugin_option_path():
    errors = errors_of(one_route(plugins={"key-auth": {"header": 5, "hide_credential": True}}))
    error_at(errors, "routes[0].plugins.key-auth.header")
    error_at(errors, "routes[0].plugins.key-auth.hide_credential")


def test_bad_plugin_option_in_global_rule_names_its_path():
    errors = errors_of({"global_rules": [{"id": "g", "plugins": {"prometheus": {"bogus": 1}}}]})
    error_at(errors, "global_rules[0].plugins.prometheus.bogus")


def test_bad_plugin_meta_names_the_meta_field():
    errors = errors_of(one_route(plugins={"key-auth": {"_meta": {"priority": "high"}}}))
    error_at(errors, "routes[0].plugins.key-auth._meta.priority")


def test_consumer_credential_is_checked_by_the_plugin_consumer_schema():
    errors = errors_of({"consumers": [{"username": "alice", "plugins": {"key-auth": {}}}]})
    error_at(errors, "consumers[0].plugins.key-auth.key")


# -- references and ids --------------------------------------------------------------------


def test_reference_to_missing_upstream_id_is_rejected():
    errors = errors_of({"routes": [{"uri": "/", "upstream_id": "nope"}]})
    assert "nope" in error_at(errors, "routes[0].upstream_id")


def test_reference_to_missing_service_id_is_rejected():
    errors = errors_of({"routes": [{"uri": "/", "service_id": "nope"}]})
    assert "nope" in error_at(errors, "routes[0].service_id")


def test_service_reference_to_missing_upstream_is_rejected():
    errors = errors_of({"services": [{"id": "s", "upstream_id": "nope"}]})
    assert "nope" in error_at(errors, "services[0].upstream_id")


@pytest.mark.parametrize("kind", ["routes", "services", "upstreams", "global_rules"])
def test_duplicate_ids_are_rejected(kind):
    item = {
        "routes": {"uri": "/", "upstream": {"nodes": dict(NODES)}},
        "services": {"upstream": {"nodes": dict(NODES)}},
        "upstreams": {"nodes": dict(NODES)},
        "global_rules": {"plugins": {}},
    }[kind]
    errors = errors_of({kind: [{"id": "same", **item}, {"id": "other", **item},
                               {"id": "same", **item}]})
    line = error_at(errors, f"{kind}[2].id")
    assert "same" in line and f"{kind}[0]" in line


def test_duplicate_consumer_usernames_are_rejected():
    errors = errors_of({"consumers": [{"username": "alice"}, {"username": "alice"}]})
    error_at(errors, "consumers[1].username")


def test_route_without_upstream_is_rejected():
    errors = errors_of({"routes": [{"uri": "/"}]})
    assert "upstream" in error_at(errors, "routes[0]")


def test_route_whose_service_has_no_upstream_is_rejected():
    errors = errors_of({"services": [{"id": "s"}], "routes": [{"uri": "/", "service_id": "s"}]})
    assert "upstream" in error_at(errors, "routes[0]")


# -- route fields --------------------------------------------------------------------------


@pytest.mark.parametrize(("route", "path"), [
    ({"uri": "api/v1"}, "routes[0].uri"),
    ({"uri": None, "uris": ["/ok", "nope"]}, "routes[0].uris"),
])
def test_uri_without_leading_slash_is_rejected(route, path):
    line = error_at(errors_of(one_route(**route)), path)
    assert "/" in line


def test_route_without_uri_is_rejected():
    errors = errors_of({"routes": [{"upstream": {"nodes": dict(NODES)}}]})
    assert any(line.startswith("routes[0]") and "uri" in line for line in errors)


def test_bad_vars_operator_names_the_expression():
    line = error_at(errors_of(one_route(vars=[["arg_a", "==", "1"], ["arg_x", "=~=", "1"]])),
                    "routes[0].vars[1]")
    assert "=~=" in line


def test_bad_vars_regex_names_the_expression():
    line = error_at(errors_of(one_route(vars=[["http_h", "~~", "(unclosed"]])),
                    "routes[0].vars[0]")
    assert "regex" in line


def test_unknown_method_names_the_list_index():
    error_at(errors_of(one_route(methods=["GET", "FETCH"])), "routes[0].methods[1]")


def test_bad_remote_addr_names_the_list_index():
    line = error_at(errors_of(one_route(remote_addrs=["10.0.0.0/8", "ten.0.0.1"])),
                    "routes[0].remote_addrs[1]")
    assert "ten.0.0.1" in line


def test_pass_host_rewrite_without_upstream_host_is_rejected():
    errors = errors_of(one_route(upstream={"nodes": dict(NODES), "pass_host": "rewrite"}))
    assert any(line.startswith("routes[0].upstream") and "upstream_host" in line
               for line in errors), errors


def test_pass_host_must_be_pass_node_or_rewrite():
    error_at(errors_of(one_route(upstream={"nodes": dict(NODES), "pass_host": "keep"})),
             "routes[0].upstream.pass_host")


def test_chash_without_key_is_rejected():
    errors = errors_of({"upstreams": [{"id": "u", "type": "chash", "nodes": dict(NODES)}]})
    assert any(line.startswith("upstreams[0]") and "key" in line for line in errors), errors


def test_chash_on_consumer_needs_no_key():
    validate_config({"upstreams": [{"id": "u", "type": "chash", "hash_on": "consumer",
                                    "nodes": dict(NODES)}]})


def test_unknown_balancer_type_is_rejected():
    error_at(errors_of(one_route(upstream={"nodes": dict(NODES), "type": "random"})),
             "routes[0].upstream.type")


def test_only_http_and_https_schemes_are_accepted():
    validate_config(one_route(upstream={"nodes": dict(NODES), "scheme": "https"}))
    error_at(errors_of(one_route(upstream={"nodes": dict(NODES), "scheme": "grpc"})),
             "routes[0].upstream.scheme")


# -- the YAML file -------------------------------------------------------------------------


def test_seed_yaml_file_loads_and_validates(tmp_path):
    path = tmp_path / "seed.yaml"
    path.write_text(SEED_YAML)
    validated = load_config_file(path)
    assert [entry.name for entry in validated.config.plugins] == ["tproxy", "prometheus"]
    assert validated.warnings


def test_invalid_yaml_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("routes:\n  - uri: /a\n    upstream: {nodes: {\"h:1\": 1}\n  - uri: /b\n")
    with pytest.raises(ConfigError) as caught:
        read_config_file(path)
    [line] = caught.value.errors
    assert str(path) in line
    assert re.search(r"\bline 4\b", line), line
    assert "YAML" in line


def test_top_level_list_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as caught:
        read_config_file(path)
    assert "mapping" in caught.value.errors[0]


def test_empty_file_is_an_empty_config(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    assert read_config_file(path) == {}


def test_missing_file_is_reported_not_raised(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    assert str(path) in caught.value.errors[0]
