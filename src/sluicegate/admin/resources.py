"""Reading and changing resources (routes, upstreams, consumers…) in a `ConfigStore`.

Every change is applied to the current whole document (`StoreState.document()`) and the
result runs through `validate_config`, the file loader's validator: what the Admin API
accepts, a config file with the same content would load, and the reverse. Only then is the
store written, changes that arrive together in one write (see `Resources`). Values are
stored as sent (plus their id), so a GET returns what was PUT, as in APISIX.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sluicegate.config.load import ConfigError, validate_config
from sluicegate.config.tls import PEM_MARKER
from sluicegate.store.base import (
    RESOURCE_KINDS,
    ConfigStore,
    StoredItem,
    StoreError,
    StoreState,
    Write,
    id_field,
)

# Who refers to whom: a referenced resource cannot be deleted (APISIX refuses it too).
# kind → [(referring kind, referring field)]
REFERENCES: dict[str, list[tuple[str, str]]] = {
    "upstreams": [("routes", "upstream_id"), ("services", "upstream_id"),
                  ("stream_routes", "upstream_id")],
    "services": [("routes", "service_id"), ("stream_routes", "service_id")],
    "plugin_configs": [("routes", "plugin_config_id")],
    "consumer_groups": [("consumers", "group_id")],
}
REDACTED = "<redacted>"
# How long one commit runs queued changes' plans before it lets the event loop run the
# requests this process serves.
CHECK_SLICE = 0.005
# How long the committer waits for more changes before it commits: at 100 changes/s
# (bench/reload.py) batches of one or two became two or three, and every commit validates
# the whole config and (etcd) reads it all first, on the loop that serves traffic.
COMMIT_WINDOW = 0.01


@dataclass
class AdminError(Exception):
    """A request the Admin API refuses; `status` and an APISIX-style `error_msg`."""

    status: int
    message: str
    errors: list[str] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error_msg": self.message}
        if self.errors:
            body["errors"] = self.errors
        return body


def singular(kind: str) -> str:
    return kind[:-1] if kind.endswith("s") else kind


def etcd_key(kind: str, item_id: str) -> str:
    """APISIX's key for a resource, kept for clients that read it."""
    return f"/apisix/{kind}/{item_id}"


def redact(kind: str, value: dict[str, Any]) -> dict[str, Any]:
    """A resource as it may be shown: an ssl's private key never leaves the gateway (its
    file path, which is no secret, does)."""
    if kind == "ssls" and isinstance(value.get("key"), str) and PEM_MARKER in value["key"]:
        return {**value, "key": REDACTED}
    return value


def redact_document(document: dict[str, Any]) -> dict[str, Any]:
    """The whole config as it may be shown: ssl keys and the admin key removed."""
    shown = dict(document)
    if isinstance(shown.get("admin"), dict) and "key" in shown["admin"]:
        shown["admin"] = {**shown["admin"], "key": REDACTED}
    if isinstance(shown.get("ssls"), list):
        shown["ssls"] = [redact("ssls", item) if isinstance(item, dict) else item
                         for item in shown["ssls"]]
    return shown


def item_body(item: StoredItem) -> dict[str, Any]:
    return {"key": etcd_key(item.kind, item.id), "value": redact(item.kind, item.value),
            "createdIndex": item.created_index, "modifiedIndex": item.modified_index}


def merge_patch(target: Any, patch: Any) -> Any:
    """JSON merge patch (RFC 7396): objects merge recursively, null deletes a member,
    anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


def set_sub_path(value: dict[str, Any], sub_path: str, new: Any) -> dict[str, Any]:
    """APISIX's PATCH /<kind>/<id>/<sub/path>: the body replaces what is at that path
    (`plugins`, `upstream/nodes`...); null removes it."""
    names = [name for name in sub_path.split("/") if name]
    if not names:
        raise AdminError(400, "empty sub path")
    result = copy.deepcopy(value)
    node: Any = result
    for name in names[:-1]:
        child = node.get(name)
        if child is None:
            child = node[name] = {}
        if not isinstance(child, dict):
            raise AdminError(400, f"{'/'.join(names)}: {name!r} is not an object")
        node = child
    if new is None:
        node.pop(names[-1], None)
    else:
        node[names[-1]] = new
    return result


class Draft:
    """The resources as the batch being committed has changed them so far: each queued
    change is checked against it, exactly as if it had waited for the previous write."""

    __slots__ = ("base", "items")

    def __init__(self, state: StoreState) -> None:
        self.base = state.base
        # kind → id → value, in the store's order (a replaced item keeps its place)
        self.items: dict[str, dict[str, dict[str, Any]]] = {
            kind: {item_id: item.value for item_id, item in found.items()}
            for kind, found in state.items.items()}

    def get(self, kind: str, item_id: str) -> dict[str, Any] | None:
        return self.items.get(kind, {}).get(item_id)

    def ids(self, kind: str) -> list[str]:
        return list(self.items.get(kind, {}))

    def document(self, change: Write | None = None) -> tuple[dict[str, Any], int | None]:
        """The config document with `change` applied, and the index of the changed item in
        its list (None for a delete): what `validate_config` takes."""
        doc = {key: value for key, value in self.base.items() if key not in RESOURCE_KINDS}
        index = None
        for kind in RESOURCE_KINDS:
            found = self.items.get(kind, {})
            if change is not None and change.kind == kind:
                if change.value is None:
                    doc[kind] = [value for item_id, value in found.items()
                                 if item_id != change.id]
                    continue
                found = {**found, change.id: change.value}
                index = list(found).index(change.id)
            if found:
                doc[kind] = list(found.values())
        return doc, index

    def apply(self, change: Write) -> None:
        found = self.items.setdefault(change.kind, {})
        if change.value is None:
            found.pop(change.id, None)
        else:
            found[change.id] = change.value


# A queued change: given the draft, the write to make (AdminError: refused) and how to
# answer the request once the store holds it.
Answer = Callable[[StoredItem | None], Any]
Plan = Callable[[Draft], tuple[Write, Answer]]


class _Queued:
    __slots__ = ("done", "plan")

    def __init__(self, plan: Plan, done: asyncio.Future[Any]) -> None:
        self.plan = plan
        self.done = done


class Resources:
    """The resource operations of the Admin API over one store.

    Writes are serialised by group commit: a change queues; one committer task waits
    COMMIT_WINDOW for more, applies every queued change in arrival order to a draft of the
    store's state and validates the result once; when that fails, it checks them one by
    one, each against what the accepted ones before it leave (its own 400 with the field
    path when it is invalid, without sinking the others). Then it writes all the accepted
    ones to the store at once — one file rewrite and fsync, one etcd txn — and answers
    each request with its own item. With writes one at a time, under load every write
    waited one whole event-loop turn for the lock and did its own fsync. A delete ends a
    batch, so the changes after it see the file store's positional ids as they are after
    it."""

    def __init__(self, store: ConfigStore) -> None:
        self.store = store
        self._queue: deque[_Queued] = deque()
        self._committer: asyncio.Task[None] | None = None
        self._last_generated = 0

    @staticmethod
    def check_kind(kind: str) -> None:
        if kind not in RESOURCE_KINDS:
            raise AdminError(404, f"unknown resource kind {kind!r}; one of: "
                                  f"{', '.join(RESOURCE_KINDS)}")

    async def list(self, kind: str) -> dict[str, Any]:
        self.check_kind(kind)
        state = await self.store.load()
        found = state.items.get(kind, {})
        return {"list": [item_body(item) for item in found.values()], "total": len(found)}

    async def get(self, kind: str, item_id: str) -> dict[str, Any]:
        self.check_kind(kind)
        state = await self.store.load()
        item = state.items.get(kind, {}).get(item_id)
        if item is None:
            raise AdminError(404, f"{singular(kind)} {item_id!r} not found")
        return item_body(item)

    async def document(self) -> dict[str, Any]:
        """The running config document: the file's settings plus every resource."""
        return redact_document((await self.store.load()).document())

    async def put(self, kind: str, item_id: str | None, body: Any) -> tuple[int, dict[str, Any]]:
        """Create or replace; the id comes from the path, else from the body."""
        self.check_kind(kind)
        value = self._object(body)
        key_field = id_field(kind)
        given = value.get(key_field)
        if item_id is None:
            if given is None or given == "":
                raise AdminError(400, f"missing {key_field}: PUT /apisix/admin/{kind}/<id>, "
                                      f"or give {key_field} in the body")
            item_id = str(given)
        elif given is not None and str(given) != item_id:
            raise AdminError(400, f"wrong {singular(kind)} {key_field}: the body says "
                                  f"{str(given)!r}, the path {item_id!r}")
        key = item_id

        def plan(draft: Draft) -> tuple[Write, Answer]:
            created = draft.get(kind, key) is None
            change = Write(kind, key, {**value, key_field: key})
            return change, lambda item: ((201 if created else 200), _body_of(item))

        result: tuple[int, dict[str, Any]] = await self._submit(plan)
        return result

    async def post(self, kind: str, body: Any) -> tuple[int, dict[str, Any]]:
        """Create with an id the server picks (APISIX: POST)."""
        self.check_kind(kind)
        value = self._object(body)
        key_field = id_field(kind)
        if key_field != "id":
            raise AdminError(405, f"{kind} are keyed by {key_field}: use PUT")
        if value.get("id") is not None:
            raise AdminError(400, "POST picks the id: leave id out, or PUT to /<id>")

        def plan(draft: Draft) -> tuple[Write, Answer]:
            item_id = self._new_id(draft, kind)
            change = Write(kind, item_id, {**value, "id": item_id})
            return change, lambda item: (201, _body_of(item))

        result: tuple[int, dict[str, Any]] = await self._submit(plan)
        return result

    async def patch(self, kind: str, item_id: str, body: Any,
                    sub_path: str | None = None) -> dict[str, Any]:
        """Merge patch (RFC 7396) of the whole resource, or replace what is at `sub_path`."""
        self.check_kind(kind)
        if sub_path is None:
            self._object(body)
        key_field = id_field(kind)

        def plan(draft: Draft) -> tuple[Write, Answer]:
            current = draft.get(kind, item_id)
            if current is None:
                raise AdminError(404, f"{singular(kind)} {item_id!r} not found")
            if sub_path is None:
                value = merge_patch(current, body)
            else:
                value = set_sub_path(current, sub_path, body)
            if str(value.get(key_field, item_id)) != item_id:
                raise AdminError(400, f"{key_field} cannot be changed by PATCH")
            change = Write(kind, item_id, {**value, key_field: item_id})
            return change, _body_of

        result: dict[str, Any] = await self._submit(plan)
        return result

    async def delete(self, kind: str, item_id: str) -> dict[str, Any]:
        self.check_kind(kind)

        def plan(draft: Draft) -> tuple[Write, Answer]:
            if draft.get(kind, item_id) is None:
                raise AdminError(404, f"{singular(kind)} {item_id!r} not found")
            for referrer_kind, ref_field in REFERENCES.get(kind, []):
                for referrer_id, referrer in draft.items.get(referrer_kind, {}).items():
                    if str(referrer.get(ref_field)) == item_id:
                        raise AdminError(400, f"can not delete this {singular(kind)}, "
                                              f"{singular(referrer_kind)} [{referrer_id}] is "
                                              "still using it now")
            # Whatever else could refer to it (a short-form plugin entry naming a service)
            # is found by the validator.
            change = Write(kind, item_id, None)
            return change, lambda item: {"deleted": "1", "key": etcd_key(kind, item_id)}

        result: dict[str, Any] = await self._submit(plan)
        return result

    # -- group commit ---------------------------------------------------------------------

    async def _submit(self, plan: Plan) -> Any:
        """Queue a change and wait for the commit that holds it (or refuses it)."""
        loop = asyncio.get_running_loop()
        queued = _Queued(plan, loop.create_future())
        self._queue.append(queued)
        if self._committer is None:
            # Its own task: a request cancelled while waiting must not cancel a commit
            # that holds other requests' changes.
            self._committer = loop.create_task(self._commit_queued())
        return await queued.done

    async def _commit_queued(self) -> None:
        try:
            while self._queue:
                # Changes arriving within the window share the commit: one store read,
                # one validation and one write for all of them (see `_commit`).
                await asyncio.sleep(COMMIT_WINDOW)
                await self._commit()
        finally:
            self._committer = None

    async def _commit(self) -> None:
        """Check the queued changes against the store's current state and write the
        accepted ones as one batch."""
        try:
            state = await self.store.load()
        except Exception as exc:  # the store cannot be read: no queued change can be checked
            while self._queue:
                queued = self._queue.popleft()
                if not queued.done.done():
                    queued.done.set_exception(exc)
            return
        draft = Draft(state)
        accepted: list[tuple[_Queued, Write, Answer]] = []
        started = time.perf_counter()
        while self._queue:
            if time.perf_counter() - started > CHECK_SLICE:
                # Checking a long queue holds the event loop: let the requests this process
                # serves run (changes queued meanwhile join this batch).
                await asyncio.sleep(0)
                started = time.perf_counter()
                continue
            queued = self._queue.popleft()
            if queued.done.done():  # its client is gone: as if it never came
                continue
            try:
                change, answer = queued.plan(draft)
            except Exception as exc:  # AdminError: refused; anything else: its own 500
                queued.done.set_exception(exc)
                continue
            draft.apply(change)
            accepted.append((queued, change, answer))
            if change.value is None:
                break  # see the class doc
        if not accepted:
            return
        try:
            validate_config(draft.document()[0])
        except ConfigError:  # one of them at least is invalid: find which, one by one
            accepted = self._recheck(state, accepted)
            if not accepted:
                return
        try:
            items = await self.store.write([change for _, change, _ in accepted])
            if len(items) != len(accepted):
                raise StoreError(f"the store answered {len(items)} of {len(accepted)} "
                                 "changes")
        except Exception as exc:  # the store failed: every change of the batch did
            for queued, _, _ in accepted:
                if not queued.done.done():
                    queued.done.set_exception(exc)
            return
        for (queued, _, answer), item in zip(accepted, items, strict=True):
            if queued.done.done():
                continue
            try:
                queued.done.set_result(answer(item))
            except Exception as exc:  # never leave a request waiting
                queued.done.set_exception(exc)

    def _recheck(self, state: StoreState, batch: list[tuple[_Queued, Write, Answer]]
                 ) -> list[tuple[_Queued, Write, Answer]]:
        """The batch's changes checked one at a time, in order, each against what the
        accepted ones before it leave: an invalid change gets its own 400 (paths relative to
        it) and the others still land. Plans are pure, so running them again is safe."""
        draft = Draft(state)
        accepted: list[tuple[_Queued, Write, Answer]] = []
        for queued, _, _ in batch:
            try:
                change, answer = queued.plan(draft)
                self._checked(draft, change)
            except Exception as exc:
                queued.done.set_exception(exc)
                continue
            draft.apply(change)
            accepted.append((queued, change, answer))
        return accepted

    def _checked(self, draft: Draft, change: Write) -> Write:
        """`change` if the document it leaves is valid; else AdminError 400 with the paths
        of the changed item relative to it."""
        document, index = draft.document(change)
        try:
            validate_config(document)
        except ConfigError as exc:
            errors = [relative_path(line, change.kind, index) for line in exc.errors]
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise AdminError(400, f"invalid configuration: {errors[0]}{more}", errors) from None
        return change

    @staticmethod
    def _object(body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise AdminError(400, "the body must be a JSON object")
        return body

    def _new_id(self, draft: Draft, kind: str) -> str:
        """APISIX-style: 20 digits, increasing. From the clock, so ids stay unique across a
        restart of the gateway; bumped when two POSTs land in one microsecond."""
        candidate = max(time.time_ns() // 1000, self._last_generated + 1)
        while draft.get(kind, f"{candidate:020d}") is not None:
            candidate += 1
        self._last_generated = candidate
        return f"{candidate:020d}"


def _body_of(item: StoredItem | None) -> dict[str, Any]:
    assert item is not None  # a put always stores an item
    return item_body(item)


def relative_path(line: str, kind: str, index: int | None) -> str:
    """`routes[3].plugins.limit-count.count: ...` → `plugins.limit-count.count: ...` when
    routes[3] is the resource being written; errors elsewhere keep their full path."""
    if index is None:
        return line
    prefix = f"{kind}[{index}]"
    if line.startswith(prefix + "."):
        return line[len(prefix) + 1:]
    if line.startswith(prefix + ": "):
        return line[len(prefix) + 2:]
    return line
