"""Many Admin API changes at once, as a deploy script or a controller sends them: each one is
answered for itself (its own 201/200, or its own 400 with the field path), every accepted
one is stored with the indexes it was answered with, and none is lost — with the config file
and with etcd as the store."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from admin.client import AdminClient, Reply, admin_port, with_admin
from harness import Gateway
from servers.etcd_server import ETCD, Etcd

UPSTREAM = {"nodes": {"127.0.0.1:1": 1}}
CONCURRENCY = 50  # client threads: the gateway sees up to this many changes in flight


def at_once(requests: list[Callable[[], Reply]]) -> list[Reply]:
    """Send every request from CONCURRENCY threads at once; the replies in request order."""
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(lambda send: send(), requests))


def put(admin: AdminClient, path: str, body: dict[str, Any]) -> Callable[[], Reply]:
    return lambda: admin.put(path, body)


@dataclass
class Setup:
    gateway: Gateway
    admin: AdminClient
    store: str  # "file" or "etcd"

    def stored_routes(self) -> dict[str, dict[str, Any]]:
        """Every route as the store holds it: the config file itself, or the Admin API's
        list (read back from etcd)."""
        if self.store == "file":
            document = yaml.safe_load(self.gateway.config_path.read_text())
            return {route["id"]: route for route in document.get("routes") or []}
        listed = self.admin.get("routes")
        assert listed.status == 200
        return {entry["value"]["id"]: entry["value"] for entry in listed.body["list"]}


@pytest.fixture(params=["file", "etcd"])
def gateway(request: pytest.FixtureRequest, tmp_path: Path,
            start_gateway: Callable[..., Gateway]) -> Iterator[Setup]:
    """A gateway with the upstream `web`, its resources in its config file or in etcd."""
    config = with_admin({"upstreams": [{"id": "web", **UPSTREAM}]})
    if request.param == "file":
        started = start_gateway(config)
        yield Setup(started, AdminClient(admin_port(started)), "file")
        return
    if not Path(ETCD).exists():
        pytest.fail("etcd is not installed: run `make test`, which installs it")
    (tmp_path / "etcd").mkdir()
    etcd = Etcd(tmp_path / "etcd")
    try:
        store = etcd.url(f"/sg-{uuid.uuid4().hex[:10]}")
        started = start_gateway(config, extra_args=["--store", store])
        admin = AdminClient(admin_port(started))
        assert admin.put("upstreams/web", UPSTREAM).status == 201  # the file's is ignored
        yield Setup(started, admin, "etcd")
    finally:
        etcd.stop()


def test_200_concurrent_puts_all_succeed_and_read_back_with_their_indexes(gateway: Setup) -> None:
    admin = gateway.admin
    bodies = {f"r{n}": {"uri": f"/r/{n}", "upstream_id": "web", "desc": f"route {n}"}
              for n in range(200)}
    replies = at_once([put(admin, f"routes/{rid}", body) for rid, body in bodies.items()])

    assert [reply.status for reply in replies] == [201] * 200, \
        [reply.body for reply in replies if reply.status != 201][:3]
    for (rid, body), reply in zip(bodies.items(), replies, strict=True):
        assert reply.body["key"] == f"/apisix/routes/{rid}"
        assert reply.body["value"] == {**body, "id": rid}
        assert reply.body["createdIndex"] == reply.body["modifiedIndex"]
        read = admin.get(f"routes/{rid}")
        assert read.status == 200
        assert read.body == reply.body  # value and both indexes, as answered
    stored = gateway.stored_routes()
    assert {rid: stored.get(rid) for rid in bodies} == \
        {rid: {**body, "id": rid} for rid, body in bodies.items()}


def test_invalid_change_among_concurrent_valid_ones_gets_its_own_400(gateway: Setup) -> None:
    admin = gateway.admin
    bad_plugin = {"uri": "/bad", "upstream_id": "web",
                  "plugins": {"limit-count": {"count": -1, "time_window": 60}}}
    bad_reference = {"uri": "/dangling", "upstream_id": "no-such-upstream"}
    requests = [put(admin, f"routes/ok{n}", {"uri": f"/ok/{n}", "upstream_id": "web"})
                for n in range(60)]
    requests.insert(10, put(admin, "routes/bad", bad_plugin))
    requests.insert(40, put(admin, "routes/dangling", bad_reference))
    replies = at_once(requests)

    bad, dangling = replies[10], replies[40]
    assert bad.status == 400
    assert len(bad.body["errors"]) == 1
    assert bad.body["errors"][0].startswith("plugins.limit-count.count: ")
    assert dangling.status == 400
    assert dangling.body["errors"] == ["upstream_id: no upstream 'no-such-upstream'"]
    others = [reply for index, reply in enumerate(replies) if index not in (10, 40)]
    assert [reply.status for reply in others] == [201] * 60
    stored = gateway.stored_routes()
    assert {f"ok{n}" for n in range(60)} <= set(stored)
    assert "bad" not in stored and "dangling" not in stored
    assert admin.get("routes/bad").status == 404


def test_concurrent_patches_of_one_route_all_apply(gateway: Setup) -> None:
    """Each change is made to the route as the changes before it left it: none is lost."""
    admin = gateway.admin
    assert admin.put("routes/shared", {"uri": "/shared", "upstream_id": "web"}).status == 201
    replies = at_once([(lambda n=n: admin.patch("routes/shared", {"labels": {f"l{n}": "x"}}))
                       for n in range(40)])

    assert [reply.status for reply in replies] == [200] * 40
    final = admin.get("routes/shared")
    assert final.body["value"]["labels"] == {f"l{n}": "x" for n in range(40)}
    assert final.body["modifiedIndex"] == max(reply.body["modifiedIndex"] for reply in replies)


def test_concurrent_puts_of_one_route_end_with_one_of_them(gateway: Setup) -> None:
    admin = gateway.admin
    replies = at_once([put(admin, "routes/same", {"uri": f"/same/{n}", "upstream_id": "web"})
                       for n in range(30)])

    statuses = sorted(reply.status for reply in replies)
    assert statuses == [200] * 29 + [201]  # exactly one created it
    assert {reply.body["value"]["uri"] for reply in replies} == {f"/same/{n}" for n in range(30)}
    final = admin.get("routes/same").body
    assert final["value"]["uri"] in {f"/same/{n}" for n in range(30)}
    assert final["modifiedIndex"] == max(reply.body["modifiedIndex"] for reply in replies)
    assert len({reply.body["createdIndex"] for reply in replies}) == 1


def test_delete_racing_a_route_that_needs_it_never_leaves_a_dangling_reference(
        gateway: Setup) -> None:
    admin = gateway.admin
    for n in range(10):
        upstream = f"up{n}"
        assert admin.put(f"upstreams/{upstream}", UPSTREAM).status == 201
        delete, route = at_once([
            lambda u=upstream: admin.delete(f"upstreams/{u}"),
            put(admin, f"routes/uses-{upstream}", {"uri": f"/{upstream}",
                                                   "upstream_id": upstream})])
        # In either order one of them is refused: the route needs the upstream, and an
        # upstream in use cannot be deleted.
        assert sorted([delete.status, route.status]) in ([200, 400], [201, 400]), \
            (delete.body, route.body)
        stored = gateway.stored_routes()
        if delete.status == 200:
            assert f"uses-{upstream}" not in stored
        else:
            assert stored[f"uses-{upstream}"]["upstream_id"] == upstream
            assert admin.get(f"upstreams/{upstream}").status == 200


def test_a_burst_of_changes_ends_with_the_data_plane_serving_the_newest_config(
        gateway: Setup) -> None:
    """Workers skip intermediate states under a stream of changes (applies are bounded to
    a share of the loop) but always end on the newest one: every route of the burst is
    served, and the last change to a route wins."""
    import time
    import urllib.error
    import urllib.request

    def status(uri: str) -> int:
        try:
            with urllib.request.urlopen(f"{gateway.gateway.url}{uri}", timeout=5) as reply:
                return reply.status
        except urllib.error.HTTPError as exc:
            return exc.code

    admin = gateway.admin
    replies = at_once([put(admin, f"routes/b{n}", {"uri": f"/b/{n}", "upstream_id": "web"})
                       for n in range(100)]
                      + [put(admin, "routes/b0", {"uri": "/b/moved", "upstream_id": "web"})])
    assert all(reply.status in (200, 201) for reply in replies)
    deadline = time.monotonic() + 10
    # Routed to the unreachable upstream: 502; not routed: 404.
    while status("/b/99") != 502 or status("/b/moved") != 502:
        assert time.monotonic() < deadline, "the newest config was not applied in 10 s"
        time.sleep(0.05)
    assert [status(f"/b/{n}") for n in range(1, 100)] == [502] * 99
    assert status("/b/0") == 404  # the last PUT of b0 moved it
