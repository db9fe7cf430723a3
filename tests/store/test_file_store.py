"""FileStore: the YAML file as the config store — listing, live following, writing back."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sluicegate.config.load import ConfigError, validate_config
from sluicegate.store.base import StoreState
from sluicegate.store.file import FileStore

# Only a guard against a hung test: the store notices a change within a few polls.
WAIT = 10.0

UPSTREAM = {"nodes": {"127.0.0.1:1980": 1}}


def write(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def replace_by_rename(path: Path, config: dict[str, Any]) -> None:
    """What vim and most editors do: write a new file, rename it over the old one."""
    temp = path.with_name(path.name + ".swp")
    write(temp, config)
    os.replace(temp, path)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


async def next_state(feed: AsyncIterator[StoreState]) -> StoreState:
    return await asyncio.wait_for(anext(feed), WAIT)


def route(route_id: str | None, uri: str) -> dict[str, Any]:
    found: dict[str, Any] = {"uri": uri, "upstream": UPSTREAM}
    if route_id is not None:
        found["id"] = route_id
    return found


def uris(state: StoreState) -> dict[str, str]:
    return {item_id: item.value["uri"] for item_id, item in state.items["routes"].items()}


def test_load_splits_base_settings_from_resources(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    config = {"gateway": {"listen": ["127.0.0.1:9080"]}, "plugins": [{"name": "prometheus"}],
              "upstreams": [{"id": "web", **UPSTREAM}],
              "routes": [{"id": "a", "uri": "/a", "upstream_id": "web"}]}
    write(path, config)

    async def test() -> None:
        state = await FileStore(path).load()
        assert state.base == {"gateway": config["gateway"], "plugins": config["plugins"]}
        assert list(state.items) == ["upstreams", "routes"]
        assert state.items["routes"]["a"].value == config["routes"][0]
        assert state.document() == config
        validate_config(state.document())

    run(test)


def test_route_without_id_is_listed_under_its_position(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    write(path, {"routes": [route("a", "/a"), route(None, "/b"), route(None, "/c")]})

    async def test() -> None:
        state = await FileStore(path).load()
        assert uris(state) == {"a": "/a", "2": "/b", "3": "/c"}
        # The generated id is a listing key only: the file's content is the document.
        assert "id" not in state.items["routes"]["2"].value

    run(test)


def test_generated_id_gives_way_to_an_explicit_one(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    write(path, {"routes": [route(None, "/a"), route("1", "/b")]})

    async def test() -> None:
        assert uris(await FileStore(path).load()) == {"auto-1": "/a", "1": "/b"}

    run(test)


def test_duplicate_ids_stay_in_the_document_for_the_validator_to_report(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    write(path, {"routes": [route("a", "/a"), route("a", "/b")]})

    async def test() -> None:
        state = await FileStore(path).load()
        with pytest.raises(ConfigError) as error:
            validate_config(state.document())
        assert any("routes[1].id" in line and "already used" in line
                   for line in error.value.errors)

    run(test)


def test_consumers_are_listed_by_username(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    write(path, {"consumers": [{"username": "alice", "plugins": {"key-auth": {"key": "k"}}}]})

    async def test() -> None:
        state = await FileStore(path).load()
        assert list(state.items["consumers"]) == ["alice"]

    run(test)


def test_watch_yields_the_file_edited_in_place(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    write(path, {"routes": [route("a", "/a")]})

    async def test() -> None:
        store = FileStore(path)
        first = await store.load()
        feed = store.watch(first)
        write(path, {"routes": [route("a", "/a2"), route("b", "/b")]})
        state = await next_state(feed)
        assert uris(state) == {"a": "/a2", "b": "/b"}
        assert state.revision == first.revision + 1

    run(test)


def test_watch_yields_a_file_replaced_by_rename(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    write(path, {"routes": [route("a", "/a")]})

    async def test() -> None:
        store = FileStore(path)
        feed = store.watch(await store.load())
        replace_by_rename(path, {"routes": [route("a", "/renamed")]})
        assert uris(await next_state(feed)) == {"a": "/renamed"}
        replace_by_rename(path, {"routes": [route("a", "/again")]})
        assert uris(await next_state(feed)) == {"a": "/again"}

    run(test)


def test_watch_follows_a_symlink_swapped_to_another_file(tmp_path: Path) -> None:
    # Kubernetes mounts ConfigMaps this way: the file is a link whose target is swapped.
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    write(one, {"routes": [route("a", "/one")]})
    write(two, {"routes": [route("a", "/two")]})
    link = tmp_path / "gw.yaml"
    link.symlink_to(one)

    async def test() -> None:
        store = FileStore(link)
        feed = store.watch(await store.load())
        temp = tmp_path / "gw.yaml.new"
        temp.symlink_to(two)
        os.replace(temp, link)
        assert uris(await next_state(feed)) == {"a": "/two"}

    run(test)


def test_unchanged_content_is_not_a_new_revision(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    write(path, {"routes": [route("a", "/a")]})

    async def test() -> None:
        store = FileStore(path)
        first = await store.load()
        feed = store.watch(first)
        replace_by_rename(path, {"routes": [route("a", "/a")]})  # same content, new inode
        await asyncio.sleep(0.5)
        write(path, {"routes": [route("a", "/changed")]})
        state = await next_state(feed)
        assert uris(state) == {"a": "/changed"}
        assert state.revision == first.revision + 1

    run(test)


def test_broken_yaml_is_skipped_and_the_next_good_file_applies(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    write(path, {"routes": [route("a", "/a")]})

    async def test() -> None:
        store = FileStore(path)
        first = await store.load()
        feed = store.watch(first)
        path.write_text("routes:\n  - uri: /a\n    upstream: {nodes: [\n")
        await asyncio.sleep(0.5)
        write(path, {"routes": [route("a", "/fixed")]})
        state = await next_state(feed)
        assert uris(state) == {"a": "/fixed"}

    run(test)


def test_created_and_modified_indexes_follow_each_item(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    write(path, {"routes": [route("a", "/a"), route("b", "/b")]})

    async def test() -> None:
        store = FileStore(path)
        first = await store.load()
        feed = store.watch(first)
        write(path, {"routes": [route("a", "/a"), route("b", "/b2"), route("c", "/c")]})
        state = await next_state(feed)
        items = state.items["routes"]
        assert (items["a"].created_index, items["a"].modified_index) == (first.revision,) * 2
        assert (items["b"].created_index, items["b"].modified_index) == (first.revision,
                                                                         state.revision)
        assert (items["c"].created_index, items["c"].modified_index) == (state.revision,) * 2

    run(test)


def test_put_writes_the_item_back_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("# a comment that is not kept\ngateway: {drain_timeout: 3}\n"
                    "routes:\n  - {id: a, uri: /a, upstream: {nodes: {'127.0.0.1:1980': 1}}}\n")

    async def test() -> None:
        store = FileStore(path)
        first = await store.load()
        item = await store.put("routes", "b", route(None, "/b"))
        assert item.value == route("b", "/b")
        assert item.created_index == item.modified_index > first.revision
        written = yaml.safe_load(path.read_text())
        assert written == {"gateway": {"drain_timeout": 3},
                           "routes": [route("a", "/a"), route("b", "/b")]}
        assert "comment" not in path.read_text()
        again = await store.put("routes", "b", route(None, "/b2"))
        assert again.created_index == item.created_index
        assert again.modified_index > item.modified_index
        # Another process reading the file sees the change.
        assert uris(await FileStore(path).load()) == {"a": "/a", "b": "/b2"}

    run(test)


def test_put_of_a_new_kind_adds_its_list(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    write(path, {"routes": [{"id": "a", "uri": "/a", "upstream_id": "web"}]})

    async def test() -> None:
        store = FileStore(path)
        await store.load()
        await store.put("upstreams", "web", UPSTREAM)
        state = await FileStore(path).load()
        validate_config(state.document())
        assert state.items["upstreams"]["web"].value == {"id": "web", **UPSTREAM}

    run(test)


def test_put_keeps_the_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    write(path, {"routes": [route("a", "/a")]})
    path.chmod(0o600)

    async def test() -> None:
        await FileStore(path).put("routes", "b", route(None, "/b"))

    run(test)
    assert path.stat().st_mode & 0o777 == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name != "gw.yaml"]  # no temp files left


def test_delete_removes_the_item_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    write(path, {"routes": [route("a", "/a"), route("b", "/b")]})

    async def test() -> None:
        store = FileStore(path)
        await store.load()
        removed = await store.delete("routes", "a")
        assert removed is not None and removed.value == route("a", "/a")
        assert await store.delete("routes", "a") is None
        assert yaml.safe_load(path.read_text()) == {"routes": [route("b", "/b")]}

    run(test)


def test_put_wakes_the_same_stores_watch(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    write(path, {"routes": [route("a", "/a")]})

    async def test() -> None:
        store = FileStore(path)
        feed = store.watch(await store.load())
        await store.put("routes", "b", route(None, "/b"))
        assert uris(await next_state(feed)) == {"a": "/a", "b": "/b"}

    run(test)


def test_put_by_another_store_is_seen_by_a_watcher(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    write(path, {"routes": [route("a", "/a")]})

    async def test() -> None:
        follower = FileStore(path)
        feed = follower.watch(await follower.load())
        await FileStore(path).delete("routes", "a")
        state = await next_state(feed)
        assert "routes" not in state.items or not state.items["routes"]

    run(test)


def test_a_vanished_file_marks_the_store_stale_until_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    write(path, {"routes": [route("a", "/a")]})

    async def test() -> None:
        store = FileStore(path)
        feed = store.watch(await store.load())
        waiting = asyncio.ensure_future(next_state(feed))
        path.unlink()
        while not store.stale:
            await asyncio.sleep(0.05)
        assert not waiting.done()
        write(path, {"routes": [route("a", "/back")]})
        assert uris(await waiting) == {"a": "/back"}
        assert not store.stale

    run(test)
