"""FileStore: the YAML config file given with `-c` is the store.

The base is every top-level key that is not a resource kind; the resources are the file's
lists (`routes:`, `upstreams:`…). Ids: a resource is listed under its `id` (consumers under
`username`). One written without an id (routes may omit it) is listed under its 1-based
position in its list — the same id the data plane already gives an unnamed route in metrics
and logs — or `auto-<position>` when an explicit id already uses that number; a second item
repeating an id gets such a key too, so the document still holds it and the validator
reports the duplicate. Such generated ids are listing keys only: they are not written into
the resource (the document stays exactly what the file says) and they move when items are
inserted above. The first `put` of an item writes its id into the file.

`watch` polls the file (see POLL_INTERVAL). `put`/`delete`/`write` rewrite the whole file
atomically (temp file + fsync + rename; `write` once for a whole batch of changes): YAML
comments and formatting are NOT preserved. Revisions and
the created/modified indexes are counted in memory by each process, from 1 at its first read.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from sluicegate.config.load import ConfigError, read_config_file
from sluicegate.store.base import (
    RESOURCE_KINDS,
    ConfigStore,
    StoredItem,
    StoreError,
    StoreState,
    Write,
    id_field,
    with_id,
)

log = logging.getLogger("sluicegate.store")

# Polling, not inotify: one stat() per 100 ms per worker costs nothing measurable, and it
# follows every way a file gets replaced — in-place writes, editors' rename-over (new
# inode), and Kubernetes ConfigMap symlink swaps, which inotify on the file's directory does
# not see (the swap renames `..data`, not the file). A changed file is read once its
# signature has held for one more poll, so a file being written in place is not read
# half-written: a change is applied 100-200 ms after the last write.
POLL_INTERVAL = 0.1

Signature = tuple[int, int, int, int, int]  # device, inode, size, mtime ns, ctime ns


def _signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _section(data: dict[str, Any], kind: str) -> list[Any]:
    section = data.get(kind)
    if section is None:
        return []
    if not isinstance(section, list):
        raise ConfigError([f"{kind}: expected a list of {kind}"])
    for index, item in enumerate(section):
        if not isinstance(item, dict):
            raise ConfigError([f"{kind}[{index}]: expected a mapping"])
    return section


def item_keys(kind: str, section: list[dict[str, Any]]) -> list[str]:
    """The listing id of each item of a file section, by the rule in the module doc."""
    field = id_field(kind)
    keys: list[str | None] = [None] * len(section)
    taken: set[str] = set()
    for index, item in enumerate(section):  # explicit ids first: they win their name
        value = item.get(field)
        if value is not None and not isinstance(value, bool) and str(value) not in taken:
            keys[index] = str(value)
            taken.add(str(value))
    for index in range(len(section)):
        if keys[index] is None:
            candidate, suffix = str(index + 1), 0
            while candidate in taken:
                suffix += 1
                candidate = f"auto-{index + 1}" + (f"-{suffix}" if suffix > 1 else "")
            keys[index] = candidate
            taken.add(candidate)
    return [key for key in keys if key is not None]


class FileStore(ConfigStore):
    """The local YAML file as a config store."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.revision = 0
        self.confirmed_at = 0.0
        self.stale = False
        self._state: StoreState | None = None
        self._signature: Signature | None = None
        self._parsed: tuple[Signature | None, dict[str, Any]] | None = None
        self._changed = asyncio.Event()  # set by put/delete: watchers yield without a poll

    def _read(self) -> StoreState:
        signature = _signature(self.path)
        data = self._parse()
        state = self._state_from(data)
        self._signature = signature
        self._confirm()
        return state

    def _confirm(self) -> None:
        self.confirmed_at = time.monotonic()
        if self.stale:
            log.info("config file %s is readable again", self.path)
        self.stale = False

    def _state_from(self, data: dict[str, Any]) -> StoreState:
        base = {key: value for key, value in data.items() if key not in RESOURCE_KINDS}
        found: dict[str, dict[str, dict[str, Any]]] = {}
        for kind in RESOURCE_KINDS:
            section = _section(data, kind)
            if section:
                found[kind] = dict(zip(item_keys(kind, section), section, strict=True))
        previous = self._state
        if previous is not None and previous.base == base and found == {
                kind: {key: item.value for key, item in items.items()}
                for kind, items in previous.items.items() if items}:
            return previous  # unchanged: same revision
        self.revision += 1
        items: dict[str, dict[str, StoredItem]] = {}
        for kind, values in found.items():
            before = previous.items.get(kind, {}) if previous is not None else {}
            items[kind] = {}
            for key, value in values.items():
                old = before.get(key)
                if old is not None and old.value == value:
                    items[kind][key] = old
                else:
                    created = old.created_index if old is not None else self.revision
                    items[kind][key] = StoredItem(kind, key, value, created, self.revision)
        self._state = StoreState(self.revision, base, items)
        return self._state

    async def load(self) -> StoreState:
        return self._read()

    def reread_base(self, state: StoreState) -> StoreState:
        return self._read()

    async def watch(self, after: StoreState) -> AsyncIterator[StoreState]:
        last = after.revision
        pending: Signature | None = None
        while True:
            state = self._state
            if state is not None and state.revision > last:
                last = state.revision
                yield state
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), POLL_INTERVAL)
            self._changed.clear()
            signature = _signature(self.path)
            if signature is None:
                if not self.stale:
                    log.error("config file %s cannot be read: still serving revision %d",
                              self.path, last)
                self.stale = True
                continue
            if signature == self._signature:
                self._confirm()
                continue
            if signature != pending:  # wait one poll: the writer may not be done
                pending = signature
                continue
            pending = None
            try:
                self._read()
            except ConfigError as exc:
                self._signature = signature  # say it once per change of the file
                self._confirm()
                log.error("config file change rejected, still serving revision %d:\n%s",
                          last, "\n".join(f"  {line}" for line in exc.errors))

    async def put(self, kind: str, item_id: str, value: dict[str, Any]) -> StoredItem:
        item = (await self.write([Write(kind, item_id, value)]))[0]
        assert item is not None
        return item

    async def delete(self, kind: str, item_id: str) -> StoredItem | None:
        return (await self.write([Write(kind, item_id, None)]))[0]

    async def write(self, writes: list[Write]) -> list[StoredItem | None]:
        """Every change in order, then ONE rewrite of the file (one dump, one fsync): the
        fsyncs, one per change, were what capped Admin API writes under load."""
        data = self._raw()
        before = self._state_from(data)
        current = {kind: dict(found) for kind, found in before.items.items()}
        touched: list[tuple[Write, dict[str, Any] | None]] = []
        changed = False
        for change in writes:
            section = list(_section(data, change.kind))
            keys = item_keys(change.kind, section)
            if change.value is None:
                if change.id in keys:
                    del section[keys.index(change.id)]
                    changed = True
                touched.append((change, None))
            else:
                stored = with_id(change.kind, change.id, change.value)
                if change.id in keys:
                    section[keys.index(change.id)] = stored
                else:
                    section.append(stored)
                changed = True
                touched.append((change, stored))
            data[change.kind] = section
        state = await self._write(data) if changed else before
        if changed:
            self._changed.set()
        results: list[StoredItem | None] = []
        for change, stored in touched:
            if stored is None:  # a delete answers with what it removed
                results.append(current.get(change.kind, {}).pop(change.id, None))
                continue
            final = state.items[change.kind][change.id]
            # A key put twice in one batch: each put is answered with its own value.
            item = StoredItem(change.kind, change.id, stored, final.created_index,
                              final.modified_index)
            current.setdefault(change.kind, {})[change.id] = item
            results.append(item)
        return results

    def _raw(self) -> dict[str, Any]:
        """The file as it is now (another writer may have changed it). A file that does not
        parse is not overwritten: ConfigError."""
        if not os.access(self.path, os.R_OK):
            raise StoreError(f"{self.path}: cannot read the config file")
        return self._parse()

    async def _write(self, data: dict[str, Any]) -> StoreState:
        """Replace the file atomically: readers see the old file or the new one, whole."""
        text = yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                         sort_keys=False, allow_unicode=True)  # LibYAML when available
        # In a thread: the two fsyncs take 2-9 ms each on this disk (measured), and on the
        # event loop they stalled every request the process serves (Admin API in a worker).
        await asyncio.to_thread(self._replace, text)
        state = self._state_from(data)
        self._signature = _signature(self.path)
        self._parsed = (self._signature, data)
        self._confirm()
        return state

    def _replace(self, text: str) -> None:
        target = self.path.resolve()  # a symlinked file: replace its target, keep the link
        try:
            mode = os.stat(target).st_mode & 0o7777
        except OSError:
            mode = 0o644
        descriptor, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fchmod(handle.fileno(), mode)
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise StoreError(f"{target}: cannot write the config file: {exc.strerror}") from exc
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)

    def _parse(self) -> dict[str, Any]:
        """The file's data, parsed again only when its signature changed: an Admin API
        write would otherwise parse the file twice (load, then put) on top of writing it —
        most of a write's cost (profile). Callers get their own copy to change."""
        signature = _signature(self.path)
        if self._parsed is None or self._parsed[0] != signature or signature is None:
            self._parsed = (signature, read_config_file(self.path))
        data = self._parsed[1]
        try:
            return json.loads(json.dumps(data))  # a deep copy, in C
        except (TypeError, ValueError):  # YAML-only values (dates...): the slow way
            return copy.deepcopy(data)
