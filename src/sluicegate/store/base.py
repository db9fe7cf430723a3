"""The contract every config store keeps, and the state it hands out.

A store holds the *resources* (routes, services, upstreams…) keyed by kind and id, plus
the *base*: the rest of the document (gateway settings, the short-form `plugins:` list,
`admin:`), which always comes from the local file. `StoreState.document()` is the dict
`validate_config` takes. Writers (the Admin API) validate the whole resulting document
before they call `put`/`delete`/`write`; followers (every worker) apply each state the feed
yields, all or nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

# Resource kinds, in the order they appear in a config document. Paths of the Admin API
# are /apisix/admin/<kind>; etcd keys are <prefix>/<kind>/<id>.
RESOURCE_KINDS = ("upstreams", "services", "routes", "consumers", "consumer_groups",
                  "plugin_configs", "global_rules", "stream_routes", "ssls")


class StoreError(Exception):
    """The store cannot be read or written (unreachable, refused, malformed reply)."""


def id_field(kind: str) -> str:
    """The field a resource's id lives in: consumers are keyed by `username` (APISIX)."""
    return "username" if kind == "consumers" else "id"


def with_id(kind: str, item_id: str, value: dict[str, Any]) -> dict[str, Any]:
    """`value` with its id field set to the key it is stored under (the key wins)."""
    return {**value, id_field(kind): item_id}


@dataclass(frozen=True, slots=True)
class StoredItem:
    kind: str
    id: str
    # The resource as JSON, with its id field ("id"; consumers: "username") set — except a
    # file resource written without one, whose `id` is generated (see store/file.py).
    value: dict[str, Any]
    created_index: int
    modified_index: int


@dataclass(frozen=True, slots=True)
class StoreState:
    revision: int
    base: dict[str, Any]
    items: dict[str, dict[str, StoredItem]] = field(default_factory=dict)  # kind → id → item

    def document(self) -> dict[str, Any]:
        """The config document to validate: base plus every resource list."""
        doc = {key: value for key, value in self.base.items() if key not in RESOURCE_KINDS}
        for kind in RESOURCE_KINDS:
            found = self.items.get(kind)
            if found:
                doc[kind] = [item.value for item in found.values()]
        return doc


@dataclass(frozen=True, slots=True)
class Write:
    """One change of a batch given to `ConfigStore.write`: a put of `value`, or a delete
    when `value` is None."""

    kind: str
    id: str
    value: dict[str, Any] | None


class ConfigStore(ABC):
    """A config source. `load` reads everything; `watch` yields each later state.

    `confirmed_at` (time.monotonic()) is when the store last confirmed that the state it
    handed out is current; `stale` is True while it cannot (etcd unreachable, file gone).
    Workers export both as the config_age_seconds / config_stale gauges."""

    confirmed_at: float = 0.0
    stale: bool = False

    @abstractmethod
    async def load(self) -> StoreState: ...

    @abstractmethod
    def watch(self, after: StoreState) -> AsyncIterator[StoreState]:
        """Yield the full state after each change later than `after.revision`; survive
        lost connections and compaction by re-loading (and say so in the log)."""

    @abstractmethod
    async def put(self, kind: str, item_id: str, value: dict[str, Any]) -> StoredItem: ...

    @abstractmethod
    async def delete(self, kind: str, item_id: str) -> StoredItem | None: ...

    async def write(self, writes: list[Write]) -> list[StoredItem | None]:
        """Apply `writes` in order and answer each one as `put`/`delete` would. Stores that
        can make the batch one change (one file rewrite, one etcd txn) override this: the
        Admin API hands them every change that queued up during the previous write."""
        results: list[StoredItem | None] = []
        for change in writes:
            if change.value is None:
                results.append(await self.delete(change.kind, change.id))
            else:
                results.append(await self.put(change.kind, change.id, change.value))
        return results

    def reread_base(self, state: StoreState) -> StoreState:
        """SIGHUP: `state` with what comes from the local file read again (the file store:
        everything; etcd: the base). Raises ConfigError for an unreadable or broken file."""
        return state

    async def close(self) -> None:
        return None
