"""EtcdStore: resources in etcd v3, spoken to through its JSON gRPC gateway (as APISIX does).

Keys are `<prefix>/<kind>/<id>` (prefix default `/sluicegate`), values the resource as
JSON. The base (gateway settings, the short-form `plugins:` list, `admin:`) still comes
from the local file given with `-c`; resource lists in that file are ignored.

Following: a full load (one prefix range) gives the revision R; a streaming watch from R+1
delivers each change. A lost watch, a compacted start revision, or an etcd whose revision
went backwards (restored, recreated) ends in a full re-load, said in the log. While etcd
cannot be reached the last good state keeps being served, `stale` is set and the store
retries with capped exponential backoff; when etcd answers again the re-load catches up.

Items are validated one by one: a value that is not a JSON object, or a resource the
validator rejects (in the document with everything else), is skipped with an error naming
the key — once per written revision — and the rest applies. A skipped key is not served,
not even in an older good version: the state mirrors what etcd holds that is valid.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from sluicegate.config.load import ConfigError, read_config_file, validate_config
from sluicegate.store.base import (
    RESOURCE_KINDS,
    ConfigStore,
    StoredItem,
    StoreError,
    StoreState,
    Write,
    with_id,
)

log = logging.getLogger("sluicegate.store")

DEFAULT_PREFIX = "/sluicegate"
DEFAULT_PORT = 2379
# A unary request (range, put, delete, probe) that takes longer than this is a failure:
# etcd answers those in milliseconds.
REQUEST_TIMEOUT = 5.0
# etcd's own watch progress notifications come every 10 minutes; to keep config_age
# meaningful the follower asks etcd for its revision this often while the watch is quiet.
CONFIRM_INTERVAL = 1.0
# etcd's default --max-txn-ops: a bigger batch is written as several transactions.
MAX_TXN_OPS = 128
RETRY_MIN = 0.2
RETRY_MAX = 5.0
_ERROR_PATH = re.compile(r"^([a-z_]+)\[(\d+)\]")


def parse_etcd_url(url: str) -> tuple[list[str], str]:
    """`etcd://host:port[,host:port][/prefix]` → (["http://host:port", …], prefix)."""
    if not url.startswith("etcd://"):
        raise ValueError(f"{url!r}: expected etcd://host:port[,host:port][/prefix]")
    rest = url[len("etcd://"):]
    hosts, slash, prefix = rest.partition("/")
    endpoints = []
    for host in hosts.split(","):
        host = host.strip()
        if not host:
            raise ValueError(f"{url!r}: empty etcd endpoint")
        if not re.search(r":\d+$", host) or host.endswith("]"):
            host = f"{host}:{DEFAULT_PORT}"
        endpoints.append(f"http://{host}")
    prefix = ("/" + prefix.strip("/")) if slash and prefix.strip("/") else DEFAULT_PREFIX
    return endpoints, prefix


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _prefix_end(prefix: bytes) -> bytes:
    """etcd's range_end for "every key starting with prefix"."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


@dataclass(slots=True)
class _RawItem:
    key: str
    kind: str
    id: str
    value: dict[str, Any] | None  # None: malformed, see `problem`
    problem: str
    created: int
    modified: int


class _WatchLost(Exception):
    """The watch stream ended; `compacted` names etcd's compaction revision when that was
    the reason."""

    def __init__(self, reason: str, compacted: int = 0) -> None:
        super().__init__(reason)
        self.compacted = compacted


class EtcdStore(ConfigStore):
    """Resources in etcd v3 (JSON gateway), the base from the local config file."""

    def __init__(self, endpoints: list[str], prefix: str, config_path: str | Path) -> None:
        self.endpoints = endpoints
        self.prefix = prefix.rstrip("/")
        self.config_path = Path(config_path)
        self.confirmed_at = 0.0
        self.stale = False
        self.base: dict[str, Any] | None = None
        self._current = 0  # index into endpoints of the one that answered last
        self._session: aiohttp.ClientSession | None = None
        self._raw: dict[str, _RawItem] = {}
        self._revision = 0  # of _raw: events at or below it are already in it
        self._reported: set[tuple[str, int]] = set()
        self._state: StoreState | None = None
        self._watch_ok = False  # the current watch delivered an event or passed a probe

    def __repr__(self) -> str:
        hosts = ",".join(e.removeprefix("http://") for e in self.endpoints)
        return f"etcd://{hosts}{self.prefix}"

    # --- requests -------------------------------------------------------------------

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One unary call; tries each endpoint once, starting with the last good one."""
        session = await self._client()
        problems = []
        for attempt in range(len(self.endpoints)):
            index = (self._current + attempt) % len(self.endpoints)
            endpoint = self.endpoints[index]
            try:
                async with session.post(endpoint + path, json=body, timeout=aiohttp.
                                        ClientTimeout(total=REQUEST_TIMEOUT)) as response:
                    text = await response.text()
                    if response.status != 200:
                        raise StoreError(f"{endpoint}{path}: HTTP {response.status}: "
                                         f"{text.strip()[:200]}")
                    self._current = index
                    return json.loads(text)
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                problems.append(f"{endpoint}: {exc or type(exc).__name__}")
        raise StoreError("etcd unreachable: " + "; ".join(problems))

    def _key(self, kind: str, item_id: str) -> str:
        if kind not in RESOURCE_KINDS:
            raise ValueError(f"unknown resource kind {kind!r}")
        if not item_id or "/" in item_id:
            raise ValueError(f"invalid id {item_id!r}")
        return f"{self.prefix}/{kind}/{item_id}"

    def _range(self) -> dict[str, str]:
        start = (self.prefix + "/").encode()
        return {"key": base64.b64encode(start).decode(),
                "range_end": base64.b64encode(_prefix_end(start)).decode()}

    # --- the contract -----------------------------------------------------------------

    async def load(self) -> StoreState:
        if self.base is None:  # read once; later only on SIGHUP (reread_base)
            self.base = self._read_base()
        reply = await self._post("/v3/kv/range", self._range())
        # Installed even when the revision went backwards (etcd restored): etcd is the truth.
        self._raw = {}
        for kv in reply.get("kvs", []):
            self._set(kv)
        self._revision = int(reply["header"]["revision"])
        self._state = self._compute()
        self._confirm()
        assert self._state is not None
        return self._state

    def reread_base(self, state: StoreState) -> StoreState:
        previous = self.base
        self.base = self._read_base()
        try:
            self._state = self._compute()
        except ConfigError:
            self.base = previous  # a bad file changes nothing, now or at the next event
            raise
        return self._state

    async def put(self, kind: str, item_id: str, value: dict[str, Any]) -> StoredItem:
        key = self._key(kind, item_id)
        stored = with_id(kind, item_id, value)
        reply = await self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(
            json.dumps(stored, separators=(",", ":"))), "prev_kv": True})
        revision = int(reply["header"]["revision"])
        previous = reply.get("prev_kv")
        created = int(previous["create_revision"]) if previous else revision
        return StoredItem(kind, item_id, stored, created, revision)

    async def delete(self, kind: str, item_id: str) -> StoredItem | None:
        key = self._key(kind, item_id)
        reply = await self._post("/v3/kv/deleterange", {"key": _b64(key), "prev_kv": True})
        previous = reply.get("prev_kvs") or []
        return _deleted(kind, item_id, previous[0]) if previous else None

    async def write(self, writes: list[Write]) -> list[StoredItem | None]:
        """The batch as etcd transactions, each one revision: one round trip (and one watch
        event for every follower) instead of one per change. A txn holds a key at most
        once and at most MAX_TXN_OPS operations, so a batch may take several, in order."""
        results: list[StoredItem | None] = []
        chunk: list[Write] = []
        for change in writes:
            if len(chunk) == MAX_TXN_OPS or any(c.kind == change.kind and c.id == change.id
                                                for c in chunk):
                results += await self._txn(chunk)
                chunk = []
            chunk.append(change)
        if chunk:
            results += await self._txn(chunk)
        return results

    async def _txn(self, writes: list[Write]) -> list[StoredItem | None]:
        operations = []
        for change in writes:
            key = _b64(self._key(change.kind, change.id))
            if change.value is None:
                operations.append({"request_delete_range": {"key": key, "prev_kv": True}})
            else:
                value = json.dumps(with_id(change.kind, change.id, change.value),
                                   separators=(",", ":"))
                operations.append({"request_put": {"key": key, "value": _b64(value),
                                                   "prev_kv": True}})
        reply = await self._post("/v3/kv/txn", {"success": operations})
        revision = int(reply["header"]["revision"])
        responses = reply.get("responses") or []
        if len(responses) != len(writes):
            raise StoreError(f"etcd txn: {len(responses)} answers to {len(writes)} operations")
        results: list[StoredItem | None] = []
        for change, response in zip(writes, responses, strict=True):
            if change.value is None:
                previous = (response.get("response_delete_range") or {}).get("prev_kvs") or []
                results.append(_deleted(change.kind, change.id, previous[0])
                               if previous else None)
                continue
            previous = (response.get("response_put") or {}).get("prev_kv")
            created = int(previous["create_revision"]) if previous else revision
            results.append(StoredItem(change.kind, change.id,
                                      with_id(change.kind, change.id, change.value),
                                      created, revision))
        return results

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def watch(self, after: StoreState) -> AsyncIterator[StoreState]:
        last = after
        resync = after.revision <= 0 or self._state is None
        lost = False  # re-syncing after a loss, to be said in the log
        backoff = RETRY_MIN
        if not resync and self._state is not None and _content(self._state) != _content(last):
            last = self._state  # a load on this store got ahead of `after`
            yield last
        while True:
            try:
                if resync:
                    state = await self.load()
                    if lost:
                        log.info("config store %r: re-synced with a full load at revision %d",
                                 self, state.revision)
                    resync, lost = False, False
                    if _content(state) != _content(last):
                        last = state
                        yield state
                self._watch_ok = False
                async for state in self._follow():
                    if _content(state) != _content(last):
                        last = state
                        yield state
            except _WatchLost as exc:
                if exc.compacted:
                    log.warning("config store %r: the watch from revision %d was compacted "
                                "(etcd kept history from %d): re-syncing with a full load",
                                self, self._revision + 1, exc.compacted)
                else:
                    log.warning("config store %r: watch lost (%s): re-syncing with a full load",
                                self, exc)
                resync = lost = True
                if self._watch_ok:  # it worked for a while: this is a new loss, retry at once
                    backoff = RETRY_MIN
                elif not exc.compacted:  # lost again straight away: do not spin
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RETRY_MAX)
            except (StoreError, ConfigError, aiohttp.ClientError, TimeoutError, OSError,
                    ValueError) as exc:
                if not self.stale:
                    log.error("config store %r unreachable (%s): still serving the config "
                              "of revision %d, retrying", self, exc, self._revision)
                self.stale = True
                resync = lost = True
                self._watch_ok = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)

    # --- following ----------------------------------------------------------------------

    async def _follow(self) -> AsyncIterator[StoreState]:
        """States from one watch stream, until it is lost (raises _WatchLost/StoreError)."""
        session = await self._client()
        endpoint = self.endpoints[self._current]
        request = {"create_request": {**self._range(),
                                      "start_revision": str(self._revision + 1)}}
        timeout = aiohttp.ClientTimeout(total=None, connect=REQUEST_TIMEOUT, sock_read=None)
        try:
            response = await session.post(endpoint + "/v3/watch", json=request,
                                          timeout=timeout)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._current = (self._current + 1) % len(self.endpoints)
            raise StoreError(f"{endpoint}: {exc or type(exc).__name__}") from exc
        lost: list[str] = []
        prober = asyncio.get_running_loop().create_task(self._probe(response, lost))
        try:
            if response.status != 200:
                raise StoreError(f"{endpoint}/v3/watch: HTTP {response.status}")
            buffer = b""
            # Lines, not readline(): one watch response can exceed aiohttp's line limit.
            async for chunk in response.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        state = self._on_message(json.loads(line))
                        if state is not None:
                            yield state
            raise _WatchLost(lost[0] if lost else "etcd closed the stream")
        except aiohttp.ClientError as exc:
            raise _WatchLost(lost[0] if lost else str(exc) or type(exc).__name__) from exc
        finally:
            prober.cancel()
            response.close()

    def _on_message(self, message: dict[str, Any]) -> StoreState | None:
        if "error" in message:
            raise _WatchLost(f"etcd error: {message['error']}")
        result = message.get("result", {})
        if result.get("canceled") or result.get("compact_revision"):
            raise _WatchLost(result.get("cancel_reason") or "canceled",
                             int(result.get("compact_revision") or 0))
        self._confirm()
        changed = False
        # What a full load already holds. Taken before the loop: the events of one txn share
        # its revision, and comparing each with the revision the previous one set would
        # drop all but the first (an Admin API batch is one txn).
        loaded = self._revision
        for event in result.get("events", []):
            kv = event.get("kv", {})
            revision = int(kv.get("mod_revision", 0))
            if revision <= loaded:
                continue  # a full load already holds it
            if event.get("type") == "DELETE":
                self._raw.pop(_unb64(kv["key"]).decode(errors="replace"), None)
            else:
                self._set(kv)
            self._revision = max(self._revision, revision)
            changed = True
            self._watch_ok = True
        if changed:
            self._state = self._compute()
        # Events already in a full load (made meanwhile, e.g. by the Admin API on this store)
        # still return the state: the follower may not have yielded that load yet.
        return self._state if result.get("events") else None

    async def _probe(self, response: aiohttp.ClientResponse, lost: list[str]) -> None:
        """While the watch is quiet, confirm every CONFIRM_INTERVAL that etcd answers and has
        not gone back in time; otherwise end the watch (a half-open connection never ends
        by itself)."""
        body = {**self._range(), "count_only": True}
        while True:
            await asyncio.sleep(CONFIRM_INTERVAL)
            try:
                reply = await self._post("/v3/kv/range", body)
            except StoreError as exc:
                lost.append(str(exc))
                self.stale = True
                response.close()
                return
            if int(reply["header"]["revision"]) < self._revision:
                lost.append(f"etcd's revision {reply['header']['revision']} is below ours "
                            f"({self._revision}): restored or recreated")
                response.close()
                return
            self._watch_ok = True
            self._confirm()

    def _confirm(self) -> None:
        self.confirmed_at = time.monotonic()
        if self.stale:
            log.info("config store %r reachable again at revision %d", self, self._revision)
        self.stale = False

    # --- items --------------------------------------------------------------------------

    def _read_base(self) -> dict[str, Any]:
        data = read_config_file(self.config_path)
        ignored = [kind for kind in RESOURCE_KINDS if data.get(kind)]
        if ignored and self.base is None:
            log.warning("%s: %s ignored: with an etcd store resources come from etcd",
                        self.config_path, ", ".join(ignored))
        return {key: value for key, value in data.items() if key not in RESOURCE_KINDS}

    def _set(self, kv: dict[str, Any]) -> None:
        key = _unb64(kv["key"]).decode(errors="replace")
        created, modified = int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0))
        parts = key[len(self.prefix) + 1:].split("/")
        if len(parts) != 2 or parts[0] not in RESOURCE_KINDS or not parts[1]:
            self._report(key, modified, f"etcd key {key}: not {self.prefix}/<kind>/<id> "
                         f"with a kind of {', '.join(RESOURCE_KINDS)}: ignored")
            return
        kind, item_id = parts
        value: dict[str, Any] | None = None
        problem = ""
        try:
            decoded = json.loads(_unb64(kv.get("value", "")))
            if isinstance(decoded, dict):
                value = with_id(kind, item_id, decoded)
            else:
                problem = f"not a JSON object but {type(decoded).__name__}"
        except ValueError as exc:
            problem = f"not JSON ({exc})"
        self._raw[key] = _RawItem(key, kind, item_id, value, problem, created, modified)

    def _report(self, key: str, modified: int, message: str) -> None:
        """Log a skipped key once per written revision, not at each recomputation."""
        if (key, modified) not in self._reported:
            self._reported.add((key, modified))
            log.error("%s", message)

    def _compute(self) -> StoreState:
        """The state of every valid item; raises ConfigError when the base itself is bad."""
        assert self.base is not None
        candidates: dict[str, dict[str, StoredItem]] = {}
        for key in sorted(self._raw):
            raw = self._raw[key]
            if raw.value is None:
                self._report(key, raw.modified, f"etcd key {key}: {raw.problem}: skipped, "
                             "never applied (the rest applies)")
                continue
            candidates.setdefault(raw.kind, {})[raw.id] = StoredItem(
                raw.kind, raw.id, raw.value, raw.created, raw.modified)
        items = {kind: candidates[kind] for kind in RESOURCE_KINDS if kind in candidates}
        while True:
            state = StoreState(self._revision, self.base, items)
            try:
                validate_config(state.document())
                return state
            except ConfigError as exc:
                errors = exc.errors
            # The validator names items by their place in the document: drop those and
            # try again; errors naming no item fall back to adding items one at a time.
            culprits: dict[tuple[str, str], list[str]] = {}
            for error in errors:
                match = _ERROR_PATH.match(error)
                if match and match.group(1) in items:
                    ids = list(items[match.group(1)])
                    if int(match.group(2)) < len(ids):
                        item_id = ids[int(match.group(2))]
                        culprits.setdefault((match.group(1), item_id), []).append(error)
            if not culprits:
                return self._compute_one_by_one(items)
            items = {kind: dict(found) for kind, found in items.items()}
            for (kind, item_id), reasons in culprits.items():
                item = items[kind].pop(item_id)
                self._skip(kind, item, reasons)

    def _compute_one_by_one(self, items: dict[str, dict[str, StoredItem]]) -> StoreState:
        assert self.base is not None
        validate_config(StoreState(self._revision, self.base).document())  # the base alone
        kept: dict[str, dict[str, StoredItem]] = {}
        for kind in RESOURCE_KINDS:  # upstreams before what refers to them
            for item_id, item in items.get(kind, {}).items():
                trial = {**kept, kind: {**kept.get(kind, {}), item_id: item}}
                try:
                    validate_config(StoreState(self._revision, self.base, trial).document())
                except ConfigError as exc:
                    self._skip(kind, item, exc.errors)
                    continue
                kept = trial
        return StoreState(self._revision, self.base, kept)

    def _skip(self, kind: str, item: StoredItem, reasons: list[str]) -> None:
        key = f"{self.prefix}/{kind}/{item.id}"
        self._report(key, item.modified_index, f"etcd key {key}: invalid, skipped, never "
                     f"applied (the rest applies): {'; '.join(reasons)}")


def _deleted(kind: str, item_id: str, kv: dict[str, Any]) -> StoredItem:
    """What a delete removed, from etcd's prev_kv."""
    try:
        value = json.loads(_unb64(kv.get("value", "")))
    except ValueError:
        value = {}
    return StoredItem(kind, item_id, value if isinstance(value, dict) else {},
                      int(kv["create_revision"]), int(kv["mod_revision"]))


def _content(state: StoreState) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    return state.base, {kind: {item_id: item.value for item_id, item in found.items()}
                        for kind, found in state.items.items() if found}
