"""Reading and changing resources (routes, upstreams, consumers…) in a `ConfigStore`.

Every change is applied to the current whole document (`StoreState.document()`) and the
result runs through `validate_config`, the file loader's validator: what the Admin API
accepts, a config file with the same content would load, and the reverse. Only then is the
store written. Values are stored as sent (plus their id), so a GET returns what was PUT,
as in APISIX.
"""

from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import dataclass, field
from typing import Any

from sluicegate.config.load import ConfigError, validate_config
from sluicegate.config.tls import PEM_MARKER
from sluicegate.store.base import RESOURCE_KINDS, ConfigStore, StoredItem, StoreState, id_field

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


class Resources:
    """The resource operations of the Admin API over one store. Writes are serialised: each
    one validates against the state it then changes."""

    def __init__(self, store: ConfigStore) -> None:
        self.store = store
        self.write_lock = asyncio.Lock()
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
        async with self.write_lock:
            state = await self.store.load()
            created = item_id not in state.items.get(kind, {})
            item = await self._write(state, kind, item_id, {**value, key_field: item_id})
        return (201 if created else 200), item_body(item)

    async def post(self, kind: str, body: Any) -> tuple[int, dict[str, Any]]:
        """Create with an id the server picks (APISIX: POST)."""
        self.check_kind(kind)
        value = self._object(body)
        key_field = id_field(kind)
        if key_field != "id":
            raise AdminError(405, f"{kind} are keyed by {key_field}: use PUT")
        if value.get("id") is not None:
            raise AdminError(400, "POST picks the id: leave id out, or PUT to /<id>")
        async with self.write_lock:
            state = await self.store.load()
            item_id = self._new_id(state, kind)
            item = await self._write(state, kind, item_id, {**value, "id": item_id})
        return 201, item_body(item)

    async def patch(self, kind: str, item_id: str, body: Any,
                    sub_path: str | None = None) -> dict[str, Any]:
        """Merge patch (RFC 7396) of the whole resource, or replace what is at `sub_path`."""
        self.check_kind(kind)
        if sub_path is None:
            self._object(body)
        key_field = id_field(kind)
        async with self.write_lock:
            state = await self.store.load()
            current = state.items.get(kind, {}).get(item_id)
            if current is None:
                raise AdminError(404, f"{singular(kind)} {item_id!r} not found")
            if sub_path is None:
                value = merge_patch(current.value, body)
            else:
                value = set_sub_path(current.value, sub_path, body)
            if str(value.get(key_field, item_id)) != item_id:
                raise AdminError(400, f"{key_field} cannot be changed by PATCH")
            item = await self._write(state, kind, item_id, {**value, key_field: item_id})
        return item_body(item)

    async def delete(self, kind: str, item_id: str) -> dict[str, Any]:
        self.check_kind(kind)
        async with self.write_lock:
            state = await self.store.load()
            if item_id not in state.items.get(kind, {}):
                raise AdminError(404, f"{singular(kind)} {item_id!r} not found")
            for referrer_kind, ref_field in REFERENCES.get(kind, []):
                for referrer in state.items.get(referrer_kind, {}).values():
                    if str(referrer.value.get(ref_field)) == item_id:
                        raise AdminError(400, f"can not delete this {singular(kind)}, "
                                              f"{singular(referrer_kind)} [{referrer.id}] is "
                                              "still using it now")
            document = state.document()
            document[kind] = [item.value for item in state.items[kind].values()
                              if item.id != item_id]
            # Whatever else could refer to it (a short-form plugin entry naming a service)
            # is found by the validator.
            self._validate(document, kind, None)
            await self.store.delete(kind, item_id)
        return {"deleted": "1", "key": etcd_key(kind, item_id)}

    async def _write(self, state: StoreState, kind: str, item_id: str,
                     value: dict[str, Any]) -> StoredItem:
        document = state.document()
        current = state.items.get(kind, {})
        values = [item.value for item in current.values()]
        ids = list(current)
        if item_id in current:
            index = ids.index(item_id)
            values[index] = value
        else:
            index = len(values)
            values.append(value)
        document[kind] = values
        self._validate(document, kind, index)
        return await self.store.put(kind, item_id, value)

    @staticmethod
    def _validate(document: dict[str, Any], kind: str, index: int | None) -> None:
        try:
            validate_config(document)
        except ConfigError as exc:
            errors = [relative_path(line, kind, index) for line in exc.errors]
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise AdminError(400, f"invalid configuration: {errors[0]}{more}", errors) from None

    @staticmethod
    def _object(body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise AdminError(400, "the body must be a JSON object")
        return body

    def _new_id(self, state: StoreState, kind: str) -> str:
        """APISIX-style: 20 digits, increasing. From the clock, so ids stay unique across a
        restart of the gateway; bumped when two POSTs land in one microsecond."""
        candidate = max(time.time_ns() // 1000, self._last_generated + 1)
        while f"{candidate:020d}" in state.items.get(kind, {}):
            candidate += 1
        self._last_generated = candidate
        return f"{candidate:020d}"


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
