"""consumer_groups and consumer plugins as a user sees them: a running gateway with key-auth
in front of the echo upstream (which answers with the request it received, as JSON)."""

from __future__ import annotations

import base64
import http.client
import json
from typing import Any

import pytest

from sluicegate.config.load import ConfigError, validate_config
from sluicegate.config.schema import config_json_schema
from sluicegate.plugins.basic_auth import hash_password

JACK, ROSE, TOM = "jack-key-0123456789", "rose-key-0123456789", "tom-key-0123456789"


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def upstream_saw(self) -> dict[str, str]:
        """Request headers the echo upstream received, by lower-case name."""
        return {name.lower(): value for name, value in json.loads(self.body)["headers"]}


def call(gateway: Any, path: str, key: str | None = None) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request("GET", path, headers={"apikey": key} if key else {})
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def tier(name: str) -> dict[str, Any]:
    """A response-rewrite plugin that labels the response."""
    return {"response-rewrite": {"headers": {"set": {"X-Tier": name}}}}


def config(upstream: Any, route_plugins: dict[str, Any] | None = None,
           **extra: Any) -> dict[str, Any]:
    """jack and rose in group gold (rose with her own X-Tier), tom in no group."""
    return {
        "consumer_groups": [{
            "id": "gold", "desc": "paying customers", "labels": {"plan": "gold"},
            "plugins": {**tier("gold"),
                        "proxy-rewrite": {"headers": {"set": {"X-Group": "gold"}}}},
        }],
        "consumers": [
            {"username": "jack", "group_id": "gold", "plugins": {"key-auth": {"key": JACK}}},
            {"username": "rose", "group_id": "gold",
             "plugins": {"key-auth": {"key": ROSE}, **tier("rose")}},
            {"username": "tom", "plugins": {"key-auth": {"key": TOM}}},
        ],
        "routes": [{"id": "r1", "uri": "/*", "upstream": {"nodes": {upstream.address: 1}},
                    "plugins": {"key-auth": {}, **(route_plugins or {})}}],
        **extra,
    }


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate_config(data)
    return caught.value.errors


# -- through the gateway ---------------------------------------------------------------------


def test_group_plugins_apply_to_the_groups_consumers(echo, start_gateway):
    gateway = start_gateway(config(echo))
    reply = call(gateway, "/orders", JACK)
    assert reply.status == 200
    assert reply.headers["X-Tier"] == "gold"
    assert reply.upstream_saw()["x-group"] == "gold"


def test_group_plugins_do_not_apply_to_other_consumers(echo, start_gateway):
    gateway = start_gateway(config(echo))
    reply = call(gateway, "/orders", TOM)
    assert reply.status == 200
    assert reply.headers["X-Tier"] is None
    assert "x-group" not in reply.upstream_saw()


def test_consumer_plugin_wins_over_its_groups_plugin_of_the_same_name(echo, start_gateway):
    gateway = start_gateway(config(echo))
    reply = call(gateway, "/orders", ROSE)
    assert reply.status == 200
    assert reply.headers["X-Tier"] == "rose"
    assert reply.upstream_saw()["x-group"] == "gold"  # the group's other plugins still apply


def test_consumer_and_group_plugins_win_over_the_routes_plugin(echo, start_gateway):
    gateway = start_gateway(config(echo, tier("route")))
    assert call(gateway, "/a", TOM).headers["X-Tier"] == "route"
    assert call(gateway, "/a", JACK).headers["X-Tier"] == "gold"
    assert call(gateway, "/a", ROSE).headers["X-Tier"] == "rose"


def test_group_limit_count_limits_its_consumers_and_not_others(echo, start_gateway):
    data = config(echo)
    data["consumer_groups"][0]["plugins"]["limit-count"] = {
        "count": 2, "time_window": 60, "key_type": "var", "key": "consumer_name",
        "rejected_code": 429}
    gateway = start_gateway(data)
    assert [call(gateway, "/a", JACK).status for _ in range(3)] == [200, 200, 429]
    # Keyed by consumer name: rose, in the same group, has her own two.
    assert [call(gateway, "/a", ROSE).status for _ in range(3)] == [200, 200, 429]
    assert [call(gateway, "/a", TOM).status for _ in range(4)] == [200] * 4


def test_consumer_plugins_apply_on_a_route_whose_auth_comes_from_a_global_rule(
        echo, start_gateway):
    data = config(echo)
    data["routes"][0]["plugins"] = {}
    data["global_rules"] = [{"id": "auth", "plugins": {"key-auth": {}}}]
    gateway = start_gateway(data)
    assert call(gateway, "/a").status == 401
    assert call(gateway, "/a", JACK).headers["X-Tier"] == "gold"
    assert call(gateway, "/a", TOM).headers["X-Tier"] is None


def test_consumer_can_disable_a_route_plugin_for_itself(echo, start_gateway):
    data = config(echo, {"limit-count": {"count": 1, "time_window": 60,
                                         "rejected_code": 429}})
    data["consumers"][2]["plugins"]["limit-count"] = {"count": 1, "time_window": 60,
                                                      "_meta": {"disable": True}}
    gateway = start_gateway(data)
    assert [call(gateway, "/a", TOM).status for _ in range(3)] == [200] * 3
    assert [call(gateway, "/a", JACK).status for _ in range(2)] == [200, 429]


def test_group_plugins_apply_after_a_hashed_password_is_verified(echo, start_gateway):
    data = config(echo)
    data["consumers"][0]["plugins"]["basic-auth"] = {
        "username": "jack", "password": hash_password("jack-pass", iterations=2000)}
    data["routes"][0]["plugins"] = {"basic-auth": {}}
    gateway = start_gateway(data)
    token = base64.b64encode(b"jack:jack-pass").decode()
    for _ in range(2):  # verified in a thread first, from the cache then
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        connection.request("GET", "/a", headers={"Authorization": f"Basic {token}"})
        response = connection.getresponse()
        response.read()
        connection.close()
        assert response.status == 200
        assert response.headers["X-Tier"] == "gold"


def test_group_plugins_do_not_apply_on_a_route_without_auth(
        echo, start_gateway):
    data = config(echo)
    data["routes"].append({"id": "open", "uri": "/open",
                           "upstream": {"nodes": {echo.address: 1}}})
    gateway = start_gateway(data)
    # A route without an auth plugin names no consumer, so no consumer plugins run.
    reply = call(gateway, "/open", JACK)
    assert reply.status == 200
    assert reply.headers["X-Tier"] is None


# -- validation ------------------------------------------------------------------------------


def test_unknown_group_id_is_rejected_with_its_path(echo):
    data = config(echo)
    data["consumers"][2]["group_id"] = "x"
    assert "consumers[2].group_id: no consumer_group with id 'x'" in errors_of(data)


def test_unknown_group_id_is_reported_with_schema_errors_elsewhere(echo):
    data = config(echo)
    data["consumers"][2]["group_id"] = "x"
    data["routes"][0]["priority"] = "high"
    errors = errors_of(data)
    assert "consumers[2].group_id: no consumer_group with id 'x'" in errors
    assert any(error.startswith("routes[0].priority:") for error in errors)


def test_consumer_group_needs_a_unique_id(echo):
    data = config(echo)
    data["consumer_groups"] += [{"id": "gold"}, {"plugins": {}}]
    errors = errors_of(data)
    assert "consumer_groups[1].id: 'gold' already used by consumer_groups[0]" in errors
    assert "consumer_groups[2].id: required" in errors


def test_consumer_group_plugin_options_are_checked_with_paths(echo):
    data = config(echo)
    data["consumer_groups"][0]["plugins"]["limit-count"] = {"count": 0, "time_window": 60}
    assert any(error.startswith("consumer_groups[0].plugins.limit-count.count:")
               for error in errors_of(data))


def test_consumer_group_cannot_hold_a_credential(echo):
    data = config(echo)
    data["consumer_groups"][0]["plugins"]["key-auth"] = {"key": "shared"}
    assert errors_of(data) == [
        "consumer_groups[0].plugins.key-auth: credentials belong to consumers, not groups"]


def test_consumer_plugin_options_are_checked_with_paths(echo):
    data = config(echo)
    data["consumers"][1]["plugins"]["limit-count"] = {"count": 5}
    assert "consumers[1].plugins.limit-count.time_window: Field required" in errors_of(data)


def test_consumer_group_labels_must_be_strings_without_spaces(echo):
    data = config(echo)
    data["consumer_groups"][0]["labels"] = {"plan": "gold plus"}
    assert any(error.startswith("consumer_groups[0].labels.plan:")
               for error in errors_of(data))


def test_json_schema_describes_consumer_groups_and_group_id():
    schema = config_json_schema()
    assert "consumer_groups" in schema["properties"]
    group = schema["$defs"]["ConsumerGroupConfig"]["properties"]
    assert set(group) == {"id", "desc", "labels", "plugins"}
    assert "limit-count" in group["plugins"]["properties"]
    assert "group_id" in schema["$defs"]["ConsumerConfig"]["properties"]
