"""`sluicegate admin ...` and `sluicegate config dump`: the command line as a thin client of a
running gateway's Admin API, run as users run it (a subprocess, its output, its exit code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import yaml

from admin.client import ADMIN_KEY
from harness import ROOT, free_port

OK, INVALID_CONFIG, USAGE, RUNTIME_ERROR = 0, 1, 2, 4


def sluicegate(*args: str, key: str | None = ADMIN_KEY, stdin: str | None = None
               ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SLUICEGATE_ADMIN_KEY", "SLUICEGATE_ADMIN_URL")}
    if key is not None:
        env["SLUICEGATE_ADMIN_KEY"] = key
    return subprocess.run([sys.executable, "-m", "sluicegate", *args], cwd=ROOT, env=env,
                          input=stdin, capture_output=True, text=True, timeout=30)


def url(admin: Any) -> str:
    return f"http://127.0.0.1:{admin.port}"


def test_admin_put_get_delete_round_trip(admin_gateway, tmp_path):
    _, admin = admin_gateway()
    body = tmp_path / "upstream.yaml"
    body.write_text("type: roundrobin\nnodes:\n  127.0.0.1:8080: 1\n")
    put = sluicegate("admin", "put", "upstreams", "web", "-f", str(body), "--url", url(admin))
    assert put.returncode == OK, put.stderr
    assert json.loads(put.stdout)["value"] == {"type": "roundrobin",
                                               "nodes": {"127.0.0.1:8080": 1}, "id": "web"}

    got = sluicegate("admin", "get", "upstreams", "web", "--url", url(admin))
    assert got.returncode == OK, got.stderr
    assert json.loads(got.stdout)["key"] == "/apisix/upstreams/web"

    listed = sluicegate("admin", "get", "upstreams", "--url", url(admin))
    assert json.loads(listed.stdout)["total"] == 1

    deleted = sluicegate("admin", "delete", "upstreams", "web", "--url", url(admin))
    assert deleted.returncode == OK, deleted.stderr
    assert admin.get("upstreams/web").status == 404


def test_admin_patch_and_post_from_stdin(admin_gateway):
    _, admin = admin_gateway()
    posted = sluicegate("admin", "post", "upstreams", "-f", "-", "--url", url(admin),
                        stdin='{"nodes": {"127.0.0.1:1": 1}, "desc": "first"}')
    assert posted.returncode == OK, posted.stderr
    new_id = json.loads(posted.stdout)["value"]["id"]
    patched = sluicegate("admin", "patch", "upstreams", new_id, "-f", "-", "--url", url(admin),
                         stdin="desc: null\n")
    assert patched.returncode == OK, patched.stderr
    assert "desc" not in admin.get(f"upstreams/{new_id}").body["value"]


def test_admin_key_can_be_given_as_an_option(admin_gateway):
    _, admin = admin_gateway()
    result = sluicegate("admin", "get", "routes", "--url", url(admin), "--key", ADMIN_KEY,
                        key=None)
    assert result.returncode == OK, result.stderr


def test_admin_invalid_change_exits_1_with_field_paths(admin_gateway, tmp_path):
    _, admin = admin_gateway()
    body = tmp_path / "route.json"
    body.write_text(json.dumps({"uri": "/x", "upstream_id": "missing"}))
    result = sluicegate("admin", "put", "routes", "r1", "-f", str(body), "--url", url(admin))
    assert result.returncode == INVALID_CONFIG
    assert "upstream_id: no upstream 'missing'" in result.stderr
    assert "Traceback" not in result.stderr


def test_admin_delete_of_a_used_upstream_exits_1_naming_the_user(admin_gateway):
    _, admin = admin_gateway()
    admin.put("upstreams/u1", {"nodes": {"127.0.0.1:1": 1}})
    admin.put("routes/r1", {"uri": "/x", "upstream_id": "u1"})
    result = sluicegate("admin", "delete", "upstreams", "u1", "--url", url(admin))
    assert result.returncode == INVALID_CONFIG
    assert "route [r1]" in result.stderr


def test_admin_wrong_key_exits_4(admin_gateway):
    _, admin = admin_gateway()
    result = sluicegate("admin", "get", "routes", "--url", url(admin), key="wrong")
    assert result.returncode == RUNTIME_ERROR
    assert "401" in result.stderr
    assert "wrong" not in result.stderr.replace("missing or wrong", "")


def test_admin_without_a_key_is_a_usage_error():
    result = sluicegate("admin", "get", "routes", key=None)
    assert result.returncode == USAGE
    assert "SLUICEGATE_ADMIN_KEY" in result.stderr


def test_admin_put_without_a_file_is_a_usage_error():
    result = sluicegate("admin", "put", "routes", "r1")
    assert result.returncode == USAGE
    assert "-f" in result.stderr


def test_admin_with_no_gateway_listening_exits_4():
    result = sluicegate("admin", "get", "routes", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == RUNTIME_ERROR
    assert "cannot reach the Admin API" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_dump_prints_the_running_config_as_yaml(admin_gateway):
    gateway, admin = admin_gateway({"upstreams": [{"id": "u1", "nodes": {"127.0.0.1:1": 1}}]})
    admin.put("routes/r1", {"uri": "/x", "upstream_id": "u1"})
    result = sluicegate("config", "dump", "--url", url(admin))
    assert result.returncode == OK, result.stderr
    dumped = yaml.safe_load(result.stdout)
    assert dumped["upstreams"] == [{"id": "u1", "nodes": {"127.0.0.1:1": 1}}]
    assert dumped["routes"] == [{"uri": "/x", "upstream_id": "u1", "id": "r1"}]
    assert dumped["gateway"]["listen"] == gateway.config["gateway"]["listen"]
    assert ADMIN_KEY not in result.stdout


def test_config_dump_output_is_a_config_the_gateway_loads(admin_gateway, tmp_path):
    _, admin = admin_gateway({"upstreams": [{"id": "u1", "nodes": {"127.0.0.1:1": 1}}],
                              "routes": [{"id": "r1", "uri": "/", "upstream_id": "u1"}]})
    result = sluicegate("config", "dump", "--url", url(admin))
    dumped = tmp_path / "dumped.yaml"
    document = yaml.safe_load(result.stdout)
    document["admin"].pop("key")  # redacted in the dump: not a key to run with
    dumped.write_text(yaml.safe_dump(document))
    check = sluicegate("validate", str(dumped))
    assert check.returncode == OK, check.stderr
