"""`ConfigStore.write`: a batch of changes as one store write (one file rewrite, one etcd
transaction), each change answered as its own put/delete would be."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from servers.etcd_server import Etcd
from sluicegate.store.base import Write
from sluicegate.store.etcd import MAX_TXN_OPS, EtcdStore
from sluicegate.store.file import FileStore
from sluicegate.store.open import open_store

UPSTREAM = {"nodes": {"127.0.0.1:1980": 1}}


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 90))


def route(uri: str) -> dict[str, Any]:
    return {"uri": uri, "upstream": UPSTREAM}


def config_file(tmp_path: Path, **resources: Any) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({"gateway": {"drain_timeout": 1}, **resources},
                                   sort_keys=False))
    return path


def test_file_store_writes_a_batch_as_one_revision(tmp_path: Path) -> None:
    path = config_file(tmp_path, routes=[{"id": "old", **route("/old")},
                                         {"id": "gone", **route("/gone")}])

    async def test() -> None:
        store = FileStore(path)
        before = (await store.load()).revision
        items = await store.write([Write("routes", "new", route("/new")),
                                   Write("routes", "old", route("/old-2")),
                                   Write("routes", "new", route("/new-2")),
                                   Write("routes", "gone", None)])
        new, old, new_again, gone = items
        assert new is not None and old is not None and new_again is not None
        # One rewrite: every change carries the same new revision.
        assert {new.modified_index, old.modified_index, new_again.modified_index} == \
            {before + 1}
        assert store.revision == before + 1
        # Each put is answered with its own value; the created index of "old" stays.
        assert new.value["uri"] == "/new" and new_again.value["uri"] == "/new-2"
        assert old.created_index < old.modified_index
        assert gone is not None and gone.value["uri"] == "/gone"  # what the delete removed
        on_disk = yaml.safe_load(path.read_text())["routes"]
        assert [(r["id"], r["uri"]) for r in on_disk] == [("old", "/old-2"), ("new", "/new-2")]

    run(test)


def test_file_store_batch_of_only_absent_deletes_leaves_the_file_alone(tmp_path: Path) -> None:
    path = config_file(tmp_path, routes=[{"id": "r1", **route("/a")}])
    text = path.read_text()

    async def test() -> None:
        store = FileStore(path)
        revision = (await store.load()).revision
        assert await store.write([Write("routes", "nope", None)]) == [None]
        assert store.revision == revision

    run(test)
    assert path.read_text() == text  # not even rewritten in another format


def etcd_store(etcd: Etcd, prefix: str, tmp_path: Path) -> EtcdStore:
    store = open_store(etcd.url(prefix), config_file(tmp_path))
    assert isinstance(store, EtcdStore)
    return store


def test_etcd_store_writes_a_batch_as_one_transaction(etcd: Etcd, prefix: str,
                                                      tmp_path: Path) -> None:
    etcd.put(f"{prefix}/routes/old", {"id": "old", **route("/old")})
    etcd.put(f"{prefix}/routes/gone", {"id": "gone", **route("/gone")})

    async def test() -> None:
        store = etcd_store(etcd, prefix, tmp_path)
        try:
            before = etcd.revision()
            new, old, gone = await store.write([Write("routes", "new", route("/new")),
                                                Write("routes", "old", route("/old-2")),
                                                Write("routes", "gone", None)])
        finally:
            await store.close()
        assert etcd.revision() == before + 1  # one transaction, one revision
        assert new is not None and new.created_index == new.modified_index == before + 1
        assert old is not None and old.modified_index == before + 1
        assert old.created_index < before
        assert gone is not None and gone.value["uri"] == "/gone"
        assert etcd.get(f"{prefix}/routes/new") == {"id": "new", **route("/new")}
        assert etcd.get(f"{prefix}/routes/old")["uri"] == "/old-2"
        assert etcd.get(f"{prefix}/routes/gone") is None

    run(test)


def test_etcd_store_splits_a_batch_etcd_would_refuse_as_one_txn(etcd: Etcd, prefix: str,
                                                                tmp_path: Path) -> None:
    """etcd refuses a txn naming a key twice or holding more than 128 operations: the
    batch still lands whole, in order."""
    writes = [Write("routes", f"r{n}", route(f"/r{n}")) for n in range(MAX_TXN_OPS + 5)]
    writes.append(Write("routes", "r0", route("/r0-again")))

    async def test() -> None:
        store = etcd_store(etcd, prefix, tmp_path)
        try:
            before = etcd.revision()
            items = await store.write(writes)
        finally:
            await store.close()
        assert len(items) == len(writes)
        assert etcd.revision() == before + 2  # 128 puts, then the other 6
        assert all(item is not None for item in items)
        assert items[0] is not None and items[-1] is not None
        assert items[0].value["uri"] == "/r0" and items[-1].value["uri"] == "/r0-again"
        assert items[-1].created_index == items[0].created_index < items[-1].modified_index
        assert etcd.get(f"{prefix}/routes/r0")["uri"] == "/r0-again"
        assert etcd.get(f"{prefix}/routes/r{MAX_TXN_OPS + 4}") is not None

    run(test)
