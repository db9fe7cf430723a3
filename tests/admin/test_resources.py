"""Admin API resources as APISIX clients use them: paths, JSON shapes, create/replace/patch/
delete, reference protection, and the change reaching the config file and the gateway."""

from __future__ import annotations

import datetime
import os
import time
import urllib.request
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from admin.client import AdminClient, admin_port, with_admin

UPSTREAM = {"nodes": {"127.0.0.1:1": 1}}


def _self_signed(name: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


# One valid body per kind (ids given by the path), with what a replacement changes.
BODIES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "upstreams": (UPSTREAM, {"nodes": {"127.0.0.1:2": 1}, "type": "least_conn"}),
    "services": ({"upstream": UPSTREAM}, {"upstream": UPSTREAM, "desc": "replaced"}),
    "routes": ({"uri": "/a", "upstream": UPSTREAM}, {"uris": ["/b", "/c/*"],
                                                      "upstream": UPSTREAM}),
    "consumers": ({"plugins": {"key-auth": {"key": "k-1"}}},
                  {"plugins": {"key-auth": {"key": "k-2"}}, "desc": "replaced"}),
    "consumer_groups": ({"plugins": {}}, {"plugins": {}, "desc": "replaced"}),
    "plugin_configs": ({"plugins": {"request-id": {}}}, {"plugins": {}, "desc": "replaced"}),
    "global_rules": ({"plugins": {"request-id": {}}}, {"plugins": {}}),
    "stream_routes": ({"server_port": 15432, "upstream": UPSTREAM},
                      {"server_port": 15433, "upstream": UPSTREAM}),
}


def _id_field(kind: str) -> str:
    return "username" if kind == "consumers" else "id"


@pytest.fixture
def admin(admin_gateway):
    _, client = admin_gateway({"gateway": {"https_listen": []}})
    return client


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_each_kind_supports_create_read_list_replace_delete(admin, kind):
    first, second = BODIES[kind]
    created = admin.put(f"{kind}/item1", first)
    assert created.status == 201, created.body
    assert created.body["key"] == f"/apisix/{kind}/item1"
    assert created.body["value"] == {**first, _id_field(kind): "item1"}

    got = admin.get(f"{kind}/item1")
    assert got.status == 200
    assert set(got.body) == {"key", "value", "createdIndex", "modifiedIndex"}
    assert got.body["value"] == {**first, _id_field(kind): "item1"}

    replaced = admin.put(f"{kind}/item1", second)
    assert replaced.status == 200, replaced.body
    assert replaced.body["value"] == {**second, _id_field(kind): "item1"}
    assert replaced.body["createdIndex"] == got.body["createdIndex"]
    assert replaced.body["modifiedIndex"] > got.body["modifiedIndex"]

    listed = admin.get(kind)
    assert listed.status == 200
    assert listed.body["total"] == 1
    assert [entry["value"] for entry in listed.body["list"]] == [replaced.body["value"]]

    deleted = admin.delete(f"{kind}/item1")
    assert deleted.status == 200
    assert deleted.body == {"deleted": "1", "key": f"/apisix/{kind}/item1"}
    assert admin.get(f"{kind}/item1").status == 404
    assert admin.get(kind).body == {"list": [], "total": 0}


def test_list_gives_key_value_and_indexes_for_every_item(admin):
    for name in ("u1", "u2", "u3"):
        admin.put(f"upstreams/{name}", UPSTREAM)
    listed = admin.get("upstreams").body
    assert listed["total"] == 3
    assert [entry["key"] for entry in listed["list"]] == [
        "/apisix/upstreams/u1", "/apisix/upstreams/u2", "/apisix/upstreams/u3"]
    for entry in listed["list"]:
        assert set(entry) == {"key", "value", "createdIndex", "modifiedIndex"}
        assert isinstance(entry["createdIndex"], int)


def test_post_creates_with_a_generated_id(admin):
    first = admin.post("routes", {"uri": "/p1", "upstream": UPSTREAM})
    second = admin.post("routes", {"uri": "/p2", "upstream": UPSTREAM})
    assert first.status == second.status == 201
    ids = [first.body["value"]["id"], second.body["value"]["id"]]
    assert ids[0] != ids[1]
    assert all(item_id.isdigit() and len(item_id) == 20 for item_id in ids)  # APISIX style
    assert first.body["key"] == f"/apisix/routes/{ids[0]}"
    assert admin.get(f"routes/{ids[1]}").body["value"]["uri"] == "/p2"


def test_put_to_the_collection_takes_the_id_from_the_body(admin):
    reply = admin.put("upstreams", {"id": "from-body", **UPSTREAM})
    assert reply.status == 201
    assert admin.get("upstreams/from-body").status == 200
    consumer = admin.put("consumers", {"username": "alice"})
    assert consumer.status == 201
    assert consumer.body["key"] == "/apisix/consumers/alice"


def test_put_with_a_body_id_unlike_the_path_is_refused(admin):
    reply = admin.put("upstreams/one", {"id": "two", **UPSTREAM})
    assert reply.status == 400
    assert "two" in reply.body["error_msg"]
    assert admin.get("upstreams/one").status == 404


def test_consumers_are_keyed_by_username(admin):
    reply = admin.put("consumers/jack", {"plugins": {"key-auth": {"key": "jack-key"}}})
    assert reply.status == 201
    assert reply.body["value"]["username"] == "jack"
    assert "id" not in reply.body["value"]
    assert admin.post("consumers", {"username": "jill"}).status == 405


def test_patch_null_removes_a_field_and_keeps_the_rest(admin):
    admin.put("routes/r1", {"uri": "/x", "desc": "old", "name": "route one",
                            "upstream": UPSTREAM})
    reply = admin.patch("routes/r1", {"desc": None, "priority": 5})
    assert reply.status == 200, reply.body
    value = admin.get("routes/r1").body["value"]
    assert "desc" not in value
    assert value["priority"] == 5
    assert value["name"] == "route one" and value["uri"] == "/x"


def test_patch_merges_nested_objects(admin):
    admin.put("routes/r1", {"uri": "/x", "upstream": UPSTREAM,
                            "plugins": {"request-id": {}, "proxy-rewrite": {"uri": "/y"}}})
    admin.patch("routes/r1", {"plugins": {"request-id": None,
                                          "proxy-rewrite": {"headers": {"x-a": "1"}}}})
    plugins = admin.get("routes/r1").body["value"]["plugins"]
    assert plugins == {"proxy-rewrite": {"uri": "/y", "headers": {"x-a": "1"}}}


def test_patch_of_a_sub_path_replaces_what_is_there(admin):
    admin.put("routes/r1", {"uri": "/x", "upstream": UPSTREAM,
                            "plugins": {"request-id": {}}})
    reply = admin.patch("routes/r1/plugins", {"proxy-rewrite": {"uri": "/z"}})
    assert reply.status == 200, reply.body
    assert admin.get("routes/r1").body["value"]["plugins"] == {"proxy-rewrite": {"uri": "/z"}}
    admin.patch("routes/r1/upstream/nodes", {"127.0.0.1:7": 1})
    assert admin.get("routes/r1").body["value"]["upstream"]["nodes"] == {"127.0.0.1:7": 1}


def test_patch_of_a_missing_resource_is_404(admin):
    assert admin.patch("routes/absent", {"desc": "x"}).status == 404


@pytest.mark.parametrize(("target", "referrer", "body"), [
    ("upstreams/up", "routes/r1", {"uri": "/x", "upstream_id": "up"}),
    ("upstreams/up", "services/s1", {"upstream_id": "up"}),
    ("upstreams/up", "stream_routes/sr1", {"server_port": 15432, "upstream_id": "up"}),
    ("services/svc", "routes/r1", {"uri": "/x", "service_id": "svc"}),
    ("plugin_configs/pc", "routes/r1", {"uri": "/x", "upstream": UPSTREAM,
                                        "plugin_config_id": "pc"}),
    ("consumer_groups/grp", "consumers/alice", {"group_id": "grp"}),
])
def test_delete_of_a_referenced_resource_is_refused_naming_the_referrer(
        admin, target, referrer, body):
    targets = {"upstreams/up": UPSTREAM, "services/svc": {"upstream": UPSTREAM},
               "plugin_configs/pc": {"plugins": {}}, "consumer_groups/grp": {"plugins": {}}}
    assert admin.put(target, targets[target]).status == 201
    assert admin.put(referrer, body).status == 201
    reply = admin.delete(target)
    assert reply.status == 400
    kind, name = referrer.split("/")
    assert f"{kind[:-1]} [{name}]" in reply.body["error_msg"]
    assert admin.get(target).status == 200
    # Once the referrer is gone, the delete goes through.
    assert admin.delete(referrer).status == 200
    assert admin.delete(target).status == 200


def test_unknown_resource_kind_is_404_json(admin):
    for method, path in (("GET", "widgets"), ("GET", "widgets/1"), ("PUT", "widgets/1"),
                         ("DELETE", "widgets/1")):
        reply = admin.request(method, path, {} if method == "PUT" else None)
        assert reply.status == 404, (method, path)
        assert "widgets" in reply.body["error_msg"]


def test_missing_resource_is_404_json(admin):
    for method in ("GET", "DELETE"):
        reply = admin.request(method, "routes/absent")
        assert reply.status == 404
        assert "absent" in reply.body["error_msg"]


def test_ssl_private_key_is_never_returned(admin):
    cert, key = _self_signed("admin.test")
    created = admin.put("ssls/s1", {"cert": cert, "key": key, "snis": ["admin.test"]})
    assert created.status == 201, created.body
    for shown in (created.body["value"], admin.get("ssls/s1").body["value"],
                  admin.get("ssls").body["list"][0]["value"],
                  admin.get("config").body["value"]["ssls"][0]):
        assert "PRIVATE KEY" not in str(shown)
        assert shown["cert"] == cert
    # Changing another field keeps the stored key (the redaction is only in what is shown).
    assert admin.patch("ssls/s1", {"desc": "renamed"}).status == 200


def test_config_endpoint_shows_settings_and_resources_without_the_admin_key(admin):
    admin.put("upstreams/u1", UPSTREAM)
    document = admin.get("config").body["value"]
    assert document["upstreams"] == [{**UPSTREAM, "id": "u1"}]
    assert "https_listen" in document["gateway"]
    assert document["admin"]["key"] != admin.key


def test_changes_are_written_to_the_config_file(admin_gateway):
    gateway, admin = admin_gateway()
    admin.put("upstreams/u1", UPSTREAM)
    admin.put("routes/r1", {"uri": "/x", "upstream_id": "u1"})
    written = yaml.safe_load(gateway.config_path.read_text())
    assert written["routes"] == [{"uri": "/x", "upstream_id": "u1", "id": "r1"}]
    assert written["admin"]["listen"] == gateway.config["admin"]["listen"]
    admin.delete("routes/r1")
    assert not yaml.safe_load(gateway.config_path.read_text()).get("routes")


def _fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _eventually(check: Any, timeout: float = 10.0) -> Any:
    """Workers follow the store in the background: poll until they have."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_route_put_through_the_admin_api_is_served(admin_gateway, nginx, workers):
    gateway, admin = admin_gateway(workers=workers)
    assert _fetch(f"{gateway.url}/")[0] == 404
    admin.put("upstreams/web", {"nodes": {nginx.address: 1}})
    assert admin.put("routes/r1", {"uri": "/", "upstream_id": "web"}).status == 201
    assert _eventually(lambda: _fetch(f"{gateway.url}/")[0] == 200), gateway.log()
    assert _fetch(f"{gateway.url}/")[1] == nginx.BODY.encode()
    admin.delete("routes/r1")
    assert _eventually(lambda: _fetch(f"{gateway.url}/")[0] == 404), gateway.log()


@pytest.fixture
def etcd(tmp_path_factory: pytest.TempPathFactory):
    from servers.etcd_server import ETCD, Etcd

    if not os.path.exists(ETCD):
        pytest.fail("etcd is not installed: run `make test`, which installs it")
    server = Etcd(tmp_path_factory.mktemp("etcd"))
    yield server
    server.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_with_an_etcd_store_changes_go_to_etcd_and_are_served(start_gateway, etcd, nginx,
                                                             workers):
    gateway = start_gateway(with_admin({}), workers=workers,
                            extra_args=["--store", etcd.url("/admin-test")])
    admin = AdminClient(admin_port(gateway))
    assert admin.put("upstreams/web", {"nodes": {nginx.address: 1}}).status == 201
    assert admin.put("routes/r1", {"uri": "/", "upstream_id": "web"}).status == 201
    assert etcd.get("/admin-test/routes/r1") == {"uri": "/", "upstream_id": "web", "id": "r1"}
    assert _eventually(lambda: _fetch(f"{gateway.url}/")[0] == 200), gateway.log()
    # Reference protection holds with etcd as well.
    assert admin.delete("upstreams/web").status == 400
    # A resource written straight into etcd by another tool shows in the Admin API.
    etcd.put("/admin-test/upstreams/other", {"id": "other", "nodes": {"127.0.0.1:1": 1}})
    assert _eventually(lambda: admin.get("upstreams/other").status == 200)
    # The base (gateway settings) stays in the file: etcd only holds resources.
    assert "routes" not in (yaml.safe_load(gateway.config_path.read_text()) or {})
