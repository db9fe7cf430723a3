"""A change through the Admin API is validated like a config file: the whole resulting config
runs through the loader's validator, and a bad change is refused whole with field paths."""

from __future__ import annotations

import re

import pytest
import yaml

from harness import ROOT
from sluicegate.config.load import validate_config

UPSTREAM = {"nodes": {"127.0.0.1:1": 1}}


@pytest.fixture
def admin(admin_gateway):
    _, client = admin_gateway()
    return client


def test_invalid_plugin_option_is_400_with_the_path_inside_the_resource(admin):
    reply = admin.put("routes/r1", {"uri": "/x", "upstream": UPSTREAM, "plugins": {
        "limit-count": {"count": -1, "time_window": 60}}})
    assert reply.status == 400
    assert reply.body["errors"] == ["plugins.limit-count.count: must be > 0"]
    assert "plugins.limit-count.count" in reply.body["error_msg"]
    assert admin.get("routes/r1").status == 404


def test_wrong_field_type_is_400_naming_the_field(admin):
    reply = admin.put("routes/r1", {"uri": "/x", "priority": "high", "upstream": UPSTREAM})
    assert reply.status == 400
    assert any(line.startswith("priority: ") for line in reply.body["errors"]), reply.body


def test_unknown_field_is_400(admin):
    reply = admin.put("upstreams/u1", {**UPSTREAM, "colour": "blue"})
    assert reply.status == 400
    assert any(line.startswith("colour: ") for line in reply.body["errors"]), reply.body


def test_every_problem_is_listed_at_once(admin):
    reply = admin.put("routes/r1", {"uri": "no-slash", "methods": ["FETCH"],
                                    "upstream": UPSTREAM})
    assert reply.status == 400
    paths = [line.split(":")[0] for line in reply.body["errors"]]
    assert "uri" in paths and any(path.startswith("methods") for path in paths)
    assert f"(and {len(paths) - 1} more)" in reply.body["error_msg"]


def test_reference_to_a_missing_upstream_is_400(admin):
    reply = admin.put("routes/r1", {"uri": "/x", "upstream_id": "nope"})
    assert reply.status == 400
    assert "upstream_id: no upstream 'nope'" in reply.body["errors"]


def test_route_without_uri_is_400_with_the_reason(admin):
    reply = admin.post("routes", {"upstream": UPSTREAM})
    assert reply.status == 400
    assert "a route needs uri or uris" in reply.body["errors"]
    assert admin.get("routes").body["total"] == 0


def test_patch_that_breaks_a_resource_is_refused_and_the_resource_stays(admin):
    admin.put("routes/r1", {"uri": "/x", "upstream": UPSTREAM})
    reply = admin.patch("routes/r1", {"uri": None})
    assert reply.status == 400
    assert "a route needs uri or uris" in reply.body["errors"]
    assert admin.get("routes/r1").body["value"]["uri"] == "/x"


def test_a_credential_used_by_another_consumer_is_refused_without_echoing_it(admin):
    admin.put("consumers/alice", {"plugins": {"key-auth": {"key": "shared-secret-1"}}})
    reply = admin.put("consumers/bob", {"plugins": {"key-auth": {"key": "shared-secret-1"}}})
    assert reply.status == 400
    assert reply.body["errors"] == ["plugins.key-auth.key: already used by consumers[0]"]
    assert "shared-secret-1" not in str(reply.body)


def test_unknown_plugin_is_400(admin):
    reply = admin.put("global_rules/g1", {"plugins": {"no-such-plugin": {}}})
    assert reply.status == 400
    assert reply.body["errors"][0].startswith("plugins.no-such-plugin: unknown plugin")


def test_body_that_is_not_a_json_object_is_400(admin):
    assert admin.request("PUT", "routes/r1", raw=b"{not json").status == 400
    reply = admin.put("routes/r1", ["a", "list"])
    assert reply.status == 400
    assert "JSON object" in reply.body["error_msg"]


def test_id_that_the_config_cannot_hold_is_400(admin):
    reply = admin.put("upstreams/" + "x" * 65, UPSTREAM)
    assert reply.status == 400
    assert any(line.startswith("id: ") for line in reply.body["errors"]), reply.body


def test_admin_api_doc_config_examples_validate():
    text = (ROOT / "docs" / "admin-api.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        validate_config(yaml.safe_load(block))
