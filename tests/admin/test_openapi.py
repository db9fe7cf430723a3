"""The Admin API describes itself (OpenAPI 3.1 at /apisix/admin/openapi.json), and a
property-based run of schemathesis against the running API finds no server errors and no
response that breaks the description."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from admin.client import ADMIN_KEY
from sluicegate.store.base import RESOURCE_KINDS

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def test_openapi_document_lists_every_resource_kind(admin_gateway):
    _, admin = admin_gateway()
    reply = admin.get("openapi.json")
    assert reply.status == 200
    document = reply.body
    assert document["openapi"].startswith("3.1")
    for kind in RESOURCE_KINDS:
        assert f"/apisix/admin/{kind}" in document["paths"], kind
        item = document["paths"][f"/apisix/admin/{kind}/{{id}}"]
        assert set(item) >= {"get", "put", "patch", "delete"}
    assert document["components"]["securitySchemes"]["apiKey"]["name"] == "X-API-KEY"


def test_openapi_route_body_is_the_config_schema_of_a_route(admin_gateway):
    _, admin = admin_gateway()
    document = admin.get("openapi.json").body
    put = document["paths"]["/apisix/admin/routes/{id}"]["put"]
    schema = put["requestBody"]["content"]["application/json"]["schema"]
    route = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    assert {"uri", "uris", "upstream_id", "plugins"} <= set(route["properties"])
    # Plugin options are described too: an editor or client can check them.
    assert "limit-count" in route["properties"]["plugins"]["properties"]


def test_openapi_document_needs_the_key_too(admin_gateway):
    _, admin = admin_gateway()
    assert admin.get("openapi.json", key=None).status == 401


def test_schemathesis_finds_no_server_error_and_responses_match_the_description(
        admin_gateway, tmp_path):
    _, admin = admin_gateway({"gateway": {"https_listen": []}})
    # Something to read, patch and delete, besides what the run creates itself.
    admin.put("upstreams/u1", {"nodes": {"127.0.0.1:1": 1}})
    admin.put("routes/r1", {"uri": "/r1", "upstream_id": "u1"})
    admin.put("consumers/alice", {"plugins": {"key-auth": {"key": "alice-key"}}})
    # positive_data_acceptance / negative_data_rejection are left out: the description
    # covers field types, and the validator adds what JSON Schema cannot say (references,
    # files that must exist, one-of rules), while pydantic's lax mode accepts 1 for true.
    checks = ",".join(("not_a_server_error", "status_code_conformance",
                       "content_type_conformance", "response_schema_conformance",
                       "response_headers_conformance", "unsupported_method",
                       "allow_header_conformance", "ignored_auth", "missing_required_header",
                       "use_after_free", "ensure_resource_availability"))
    result = subprocess.run(
        [str(SCHEMATHESIS), "run", f"http://127.0.0.1:{admin.port}/apisix/admin/openapi.json",
         "-H", f"X-API-KEY: {ADMIN_KEY}", "--max-examples", "5", "--workers", "1",
         "--phases", "examples,fuzzing,stateful", "--checks", checks,
         "--generation-database", "none", "--request-timeout", "10", "--no-color",
         "--report-dir", str(tmp_path / "report")],
        capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "Loaded specification" in result.stdout
    # And the gateway is still up and consistent after the barrage.
    assert admin.get("routes/r1").status in (200, 404)
    assert admin.get("routes").status == 200
