"""EtcdStore against a real etcd 3.4: writing, listing, following, and surviving compaction,
bad values written by others, and etcd going away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from servers.etcd_server import Etcd
from sluicegate.config.load import validate_config
from sluicegate.store.base import StoreState
from sluicegate.store.etcd import EtcdStore, parse_etcd_url
from sluicegate.store.open import open_store

WAIT = 15.0  # a guard against a hung test, not a latency bound

UPSTREAM = {"nodes": {"127.0.0.1:1980": 1}}


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 90))


async def next_state(feed: AsyncIterator[StoreState]) -> StoreState:
    return await asyncio.wait_for(anext(feed), WAIT)


def base_file(tmp_path: Path, **extra: Any) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({"gateway": {"drain_timeout": 1}, **extra}))
    return path


def store_for(etcd: Etcd, prefix: str, path: Path) -> EtcdStore:
    store = open_store(etcd.url(prefix), path)
    assert isinstance(store, EtcdStore)
    return store


def route(uri: str, **fields: Any) -> dict[str, Any]:
    return {"uri": uri, "upstream": UPSTREAM, **fields}


def uris(state: StoreState) -> dict[str, str]:
    return {key: item.value["uri"] for key, item in state.items.get("routes", {}).items()}


def test_store_url_names_endpoints_and_prefix() -> None:
    assert parse_etcd_url("etcd://10.0.0.1:2379") == (["http://10.0.0.1:2379"], "/sluicegate")
    assert parse_etcd_url("etcd://a:1,b/apisix/") == (["http://a:1", "http://b:2379"],
                                                     "/apisix")
    with pytest.raises(ValueError):
        parse_etcd_url("etcd://")


def test_put_stores_json_under_prefix_kind_id(etcd: Etcd, prefix: str, tmp_path: Path) -> None:
    async def test() -> None:
        store = store_for(etcd, prefix, base_file(tmp_path))
        try:
            item = await store.put("routes", "r1", route("/a"))
            assert etcd.get(f"{prefix}/routes/r1") == {"id": "r1", **route("/a")}
            assert item.created_index == item.modified_index > 0
            again = await store.put("routes", "r1", route("/b"))
            assert again.created_index == item.created_index
            assert again.modified_index > item.modified_index
        finally:
            await store.close()

    run(test)


def test_load_combines_the_file_base_with_etcd_resources(etcd: Etcd, prefix: str,
                                                         tmp_path: Path) -> None:
    etcd.put(f"{prefix}/upstreams/web", {"id": "web", **UPSTREAM})
    etcd.put(f"{prefix}/routes/r1", {"uri": "/a", "upstream_id": "web"})
    path = base_file(tmp_path, routes=[route("/from-file", id="ignored")])

    async def test() -> None:
        store = store_for(etcd, prefix, path)
        try:
            state = await store.load()
        finally:
            await store.close()
        assert state.base == {"gateway": {"drain_timeout": 1}}
        assert uris(state) == {"r1": "/a"}  # the file's routes are not used
        assert state.items["routes"]["r1"].value["id"] == "r1"  # the key gives the id
        validate_config(state.document())

    run(test)


def test_delete_removes_the_key_and_returns_what_was_there(etcd: Etcd, prefix: str,
                                                           tmp_path: Path) -> None:
    etcd.put(f"{prefix}/routes/r1", route("/a", id="r1"))

    async def test() -> None:
        store = store_for(etcd, prefix, base_file(tmp_path))
        try:
            removed = await store.delete("routes", "r1")
            assert removed is not None and removed.value["uri"] == "/a"
            assert await store.delete("routes", "r1") is None
            assert etcd.get(f"{prefix}/routes/r1") is None
        finally:
            await store.close()

    run(test)


def test_watch_yields_puts_and_deletes_by_other_writers(etcd: Etcd, prefix: str,
                                                        tmp_path: Path) -> None:
    async def test() -> None:
        store = store_for(etcd, prefix, base_file(tmp_path))
        try:
            first = await store.load()
            feed = store.watch(first)
            revision = etcd.put(f"{prefix}/routes/r1", route("/a"))
            state = await next_state(feed)
            assert uris(state) == {"r1": "/a"}
            assert state.revision == revision
            assert state.items["routes"]["r1"].modified_index == revision
            etcd.put(f"{prefix}/routes/r2", route("/b"))
            assert uris(await next_state(feed)) == {"r1": "/a", "r2": "/b"}
            etcd.delete(f"{prefix}/routes/r1")
            assert uris(await next_state(feed)) == {"r2": "/b"}
        finally:
            await store.close()

    run(test)


def test_watch_applies_every_put_of_one_transaction(etcd: Etcd, prefix: str,
                                                    tmp_path: Path) -> None:
    # The events of a txn share its revision (an Admin API batch is one txn): all of them
    # count, not only the first.
    import base64
    import json

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    async def test() -> None:
        store = store_for(etcd, prefix, base_file(tmp_path))
        try:
            feed = store.watch(await store.load())
            etcd.call("/v3/kv/txn", {"success": [
                {"request_put": {"key": b64(f"{prefix}/routes/t{n}"),
                                 "value": b64(json.dumps(route(f"/t/{n}")))}}
                for n in range(5)]})
            state = await next_state(feed)
            assert uris(state) == {f"t{n}": f"/t/{n}" for n in range(5)}
        finally:
            await store.close()

    run(test)


def test_load_on_the_same_store_does_not_hide_a_change_from_its_watch(
        etcd: Etcd, prefix: str, tmp_path: Path) -> None:
    # The Admin API loads through the follower's own store: what that load brings in must
    # still reach the follower.
    async def test() -> None:
        store = store_for(etcd, prefix, base_file(tmp_path))
        try:
            feed = store.watch(await store.load())
            etcd.put(f"{prefix}/routes/r1", route("/a"))
            await store.load()
            assert uris(await next_state(feed)) == {"r1": "/a"}
            etcd.put(f"{prefix}/routes/r2", route("/b"))
            waiting = asyncio.ensure_future(next_state(feed))
            await asyncio.sleep(0)
            await store.load()
            assert uris(await waiting) == {"r1": "/a", "r2": "/b"}
        finally:
            await store.close()

    run(test)


def test_keys_outside_the_prefix_are_not_followed(etcd: Etcd, prefix: str,
                                                  tmp_path: Path) -> None:
    async def test() -> None:
        store = store_for(etcd, prefix, base_file(tmp_path))
        try:
            feed = store.watch(await store.load())
            etcd.put(f"{prefix}-other/routes/x", route("/x"))
            etcd.put(f"{prefix}/routes/mine", route("/mine"))
            assert uris(await next_state(feed)) == {"mine": "/mine"}
        finally:
            await store.close()

    run(test)


def test_value_that_is_not_json_is_skipped_naming_the_key(etcd: Etcd, prefix: str,
                                                          tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    async def test() -> None:
        store = store_for(etcd, prefix, base_file(tmp_path))
        try:
            feed = store.watch(await store.load())
            etcd.put(f"{prefix}/routes/bad", "{not json")
            etcd.put(f"{prefix}/routes/good", route("/good"))
            state = await next_state(feed)
            while "good" not in uris(state):
                state = await next_state(feed)
            assert uris(state) == {"good": "/good"}
            validate_config(state.document())
        finally:
            await store.close()

    with caplog.at_level(logging.ERROR, logger="sluicegate.store"):
        run(test)
    assert f"etcd key {prefix}/routes/bad: not JSON" in caplog.text


def test_invalid_resource_is_skipped_and_the_rest_applies(etcd: Etcd, prefix: str,
                                                          tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    etcd.put(f"{prefix}/routes/good", route("/good"))
    etcd.put(f"{prefix}/routes/no-slash", route("no-leading-slash"))
    etcd.put(f"{prefix}/routes/typo", route("/typo", upstreem="x"))

    async def test() -> None:
        store = store_for(etcd, prefix, base_file(tmp_path))
        try:
            state = await store.load()
        finally:
            await store.close()
        assert uris(state) == {"good": "/good"}

    with caplog.at_level(logging.ERROR, logger="sluicegate.store"):
        run(test)
    assert f"etcd key {prefix}/routes/no-slash: invalid" in caplog.text
    assert f"etcd key {prefix}/routes/typo: invalid" in caplog.text
    assert "upstreem" in caplog.text  # the reason is given


def test_route_waiting_for_its_upstream_applies_when_the_upstream_arrives(
        etcd: Etcd, prefix: str, tmp_path: Path) -> None:
    async def test() -> None:
        store = store_for(etcd, prefix, base_file(tmp_path))
        try:
            feed = store.watch(await store.load())
            etcd.put(f"{prefix}/routes/r1", {"uri": "/a", "upstream_id": "web"})
            etcd.put(f"{prefix}/upstreams/web", UPSTREAM)
            state = await next_state(feed)
            while "r1" not in uris(state):
                state = await next_state(feed)
            assert state.items["upstreams"]["web"].value == {"id": "web", **UPSTREAM}
        finally:
            await store.close()

    run(test)


def test_compacted_watch_resyncs_with_a_full_load(own_etcd: Etcd, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    prefix = "/sluicegate"

    async def test() -> None:
        store = store_for(own_etcd, "", base_file(tmp_path))
        try:
            first = await store.load()
            # Changes happen and history is compacted before this follower watches again.
            own_etcd.put(f"{prefix}/routes/r1", route("/a"))
            own_etcd.put(f"{prefix}/routes/r2", route("/b"))
            own_etcd.delete(f"{prefix}/routes/r1")
            own_etcd.compact()
            state = await next_state(store.watch(first))
            assert uris(state) == {"r2": "/b"}
        finally:
            await store.close()

    with caplog.at_level(logging.INFO, logger="sluicegate.store"):
        run(test)
    assert "compacted" in caplog.text
    assert "re-synced with a full load" in caplog.text


def test_etcd_down_marks_stale_and_catches_up_when_back(own_etcd: Etcd, tmp_path: Path) -> None:
    async def test() -> None:
        store = store_for(own_etcd, "/gw", base_file(tmp_path))
        try:
            own_etcd.put("/gw/routes/r1", route("/a"))
            first = await store.load()
            feed = store.watch(first)
            waiting = asyncio.ensure_future(next_state(feed))
            await asyncio.sleep(0)
            confirmed = store.confirmed_at
            await asyncio.to_thread(own_etcd.stop)
            while not store.stale:
                await asyncio.sleep(0.05)
            assert store.confirmed_at >= confirmed
            stale_since = store.confirmed_at
            await asyncio.to_thread(own_etcd.start)
            await asyncio.to_thread(own_etcd.put, "/gw/routes/r2", route("/b"))
            state = await waiting
            while "r2" not in uris(state):
                state = await next_state(feed)
            assert uris(state) == {"r1": "/a", "r2": "/b"}
            assert not store.stale
            assert store.confirmed_at > stale_since
        finally:
            await store.close()

    run(test)


def test_unreachable_first_endpoint_falls_over_to_the_next(etcd: Etcd, prefix: str,
                                                           tmp_path: Path) -> None:
    from harness import free_port

    etcd.put(f"{prefix}/routes/r1", route("/a"))

    async def test() -> None:
        store = open_store(f"etcd://127.0.0.1:{free_port()},{etcd.address}{prefix}",
                           base_file(tmp_path))
        try:
            state = await store.load()
            assert uris(state) == {"r1": "/a"}
            feed = store.watch(state)
            etcd.put(f"{prefix}/routes/r2", route("/b"))
            assert uris(await next_state(feed)) == {"r1": "/a", "r2": "/b"}
        finally:
            await store.close()

    run(test)
