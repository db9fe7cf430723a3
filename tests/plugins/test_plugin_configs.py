"""plugin_configs (reusable plugin sets that routes pull in with `plugin_config_id`) and
`labels`, as a user sees them: a running gateway in front of the echo upstream."""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest

from sluicegate.config.load import ConfigError, validate_config
from sluicegate.config.schema import config_json_schema


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def upstream_saw(self) -> dict[str, str]:
        """Request headers the echo upstream received, by lower-case name."""
        return {name.lower(): value for name, value in json.loads(self.body)["headers"]}


def call(gateway: Any, path: str, headers: dict[str, str] | None = None) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def stamp(value: str) -> dict[str, Any]:
    """A response-rewrite plugin that stamps the response."""
    return {"response-rewrite": {"headers": {"set": {"X-Stamp": value}}}}


def route(upstream: Any, id: str, uri: str, **extra: Any) -> dict[str, Any]:
    return {"id": id, "uri": uri, "upstream": {"nodes": {upstream.address: 1}}, **extra}


def config(upstream: Any) -> dict[str, Any]:
    return {
        "plugin_configs": [{
            "id": "common", "desc": "stamp and tag", "labels": {"team": "web"},
            "plugins": {**stamp("common"),
                        "proxy-rewrite": {"headers": {"set": {"X-Common": "yes"}}}},
        }],
        "routes": [
            route(upstream, "uses", "/uses", plugin_config_id="common"),
            route(upstream, "plain", "/plain"),
            route(upstream, "own", "/own", plugin_config_id="common", plugins=stamp("own")),
        ],
    }


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate_config(data)
    return caught.value.errors


# -- through the gateway ---------------------------------------------------------------------


def test_plugin_config_plugins_apply_to_routes_referencing_it(echo, start_gateway):
    gateway = start_gateway(config(echo))
    reply = call(gateway, "/uses")
    assert reply.status == 200
    assert reply.headers["X-Stamp"] == "common"
    assert reply.upstream_saw()["x-common"] == "yes"


def test_plugin_config_plugins_do_not_apply_to_other_routes(echo, start_gateway):
    gateway = start_gateway(config(echo))
    reply = call(gateway, "/plain")
    assert reply.status == 200
    assert reply.headers["X-Stamp"] is None
    assert "x-common" not in reply.upstream_saw()


def test_routes_own_plugin_wins_over_the_plugin_configs(echo, start_gateway):
    gateway = start_gateway(config(echo))
    reply = call(gateway, "/own")
    assert reply.headers["X-Stamp"] == "own"
    assert reply.upstream_saw()["x-common"] == "yes"  # the set's other plugins still apply


def test_plugin_config_wins_over_the_routes_service(echo, start_gateway):
    data = config(echo)
    data["services"] = [{"id": "s1", "plugins": {**stamp("service"),
                                                 "proxy-rewrite": {"headers": {
                                                     "set": {"X-Service": "yes"}}}}}]
    data["routes"] = [route(echo, "r", "/r", plugin_config_id="common", service_id="s1")]
    gateway = start_gateway(data)
    reply = call(gateway, "/r")
    assert reply.headers["X-Stamp"] == "common"
    # Same plugin name (proxy-rewrite): the plugin_config's replaces the service's.
    assert reply.upstream_saw()["x-common"] == "yes"
    assert "x-service" not in reply.upstream_saw()


def test_plugin_config_can_require_authentication(echo, start_gateway):
    data = config(echo)
    data["plugin_configs"].append({"id": "locked", "plugins": {"key-auth": {}}})
    data["routes"][1]["plugin_config_id"] = "locked"
    data["consumers"] = [{"username": "jack", "plugins": {"key-auth": {"key": "jack-k"}}}]
    gateway = start_gateway(data)
    assert call(gateway, "/plain").status == 401
    assert call(gateway, "/plain", {"apikey": "jack-k"}).status == 200
    assert call(gateway, "/uses").status == 200


# -- validation ------------------------------------------------------------------------------


def test_unknown_plugin_config_id_is_rejected_with_its_path(echo):
    data = config(echo)
    data["routes"][1]["plugin_config_id"] = "nope"
    assert errors_of(data) == ["routes[1].plugin_config_id: no plugin_config with id 'nope'"]


def test_unknown_plugin_config_id_is_reported_with_schema_errors_elsewhere(echo):
    data = config(echo)
    data["routes"][1]["plugin_config_id"] = "nope"
    data["routes"][0]["status"] = 7
    errors = errors_of(data)
    assert "routes[1].plugin_config_id: no plugin_config with id 'nope'" in errors
    assert any(error.startswith("routes[0].status:") for error in errors)


def test_plugin_config_needs_a_unique_id(echo):
    data = config(echo)
    data["plugin_configs"] += [{"id": "common", "plugins": {}}, {"plugins": {}}]
    errors = errors_of(data)
    assert "plugin_configs[1].id: 'common' already used by plugin_configs[0]" in errors
    assert "plugin_configs[2].id: required" in errors


def test_plugin_config_plugin_options_are_checked_with_paths(echo):
    data = config(echo)
    data["plugin_configs"][0]["plugins"]["limit-count"] = {"count": 3}
    assert "plugin_configs[0].plugins.limit-count.time_window: Field required" in \
        errors_of(data)


def test_plugin_config_unknown_plugin_is_rejected_with_its_path(echo):
    data = config(echo)
    data["plugin_configs"][0]["plugins"]["no-such-plugin"] = {}
    assert any(error.startswith("plugin_configs[0].plugins.no-such-plugin: unknown plugin")
               for error in errors_of(data))


def test_plugin_config_id_may_be_written_as_a_number(echo):
    data = config(echo)
    data["plugin_configs"][0]["id"] = 7
    for item in data["routes"]:
        if "plugin_config_id" in item:
            item["plugin_config_id"] = 7
    validate_config(data)


# -- labels ----------------------------------------------------------------------------------


def test_labels_are_accepted_on_routes_services_upstreams_and_consumers(echo):
    labels = {"env": "prod", "team": "web"}
    validated = validate_config({
        "upstreams": [{"id": "u", "nodes": {echo.address: 1}, "labels": labels}],
        "services": [{"id": "s", "upstream_id": "u", "labels": labels}],
        "routes": [{"id": "r", "uri": "/", "service_id": "s", "labels": labels}],
        "consumers": [{"username": "jack", "labels": labels}],
    }).config
    assert validated.routes[0].labels == labels
    assert validated.services[0].labels == labels
    assert validated.upstreams[0].labels == labels
    assert validated.consumers[0].labels == labels


@pytest.mark.parametrize("labels", [{"env": ""}, {"env": "two words"}, {"env": 3}])
def test_bad_label_values_are_rejected_with_their_path(echo, labels):
    data = config(echo)
    data["routes"][0]["labels"] = labels
    assert any(error.startswith("routes[0].labels.env:") for error in errors_of(data))


def test_json_schema_describes_plugin_configs_and_labels():
    schema = config_json_schema()
    assert "plugin_configs" in schema["properties"]
    definitions = schema["$defs"]
    assert "proxy-rewrite" in definitions["PluginConfigResource"]["properties"]["plugins"][
        "properties"]
    for model in ("RouteConfig", "ServiceConfig", "UpstreamConfig", "ConsumerConfig"):
        assert "labels" in definitions[model]["properties"], model
    plugin_config_id = definitions["RouteConfig"]["properties"]["plugin_config_id"]
    assert {"type": "integer", "minimum": 0} in plugin_config_id["anyOf"]
