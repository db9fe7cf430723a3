"""The dashboard's HTTP side: the page (static files of this package) and its JSON.

It lives with the Admin API, in the process that runs it, and shares its key and
`allow_admin`: the JSON (`/apisix/admin/dashboard/summary`, `.../stats`) needs X-API-KEY
like every Admin API call. The page's files need no key (a browser cannot send a header
when it navigates; they hold nothing secret): the page asks for the key and sends it.

The Admin API's listener serves the page at /dashboard/; `dashboard.listen` (default
127.0.0.1:9000) serves it at / on a listener of its own. Read-only: nothing here writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from sluicegate import __version__
from sluicegate.admin.auth import KEY_HEADER, AddressFilter, AdminKey, key_matches
from sluicegate.config.load import ConfigError, validate_config
from sluicegate.config.model import DashboardSettings, parse_listen
from sluicegate.dashboard.stats import RING_POINTS, TrafficHistory
from sluicegate.dashboard.summary import describe_config, exported_families
from sluicegate.store.base import ConfigStore, StoreError

log = logging.getLogger("sluicegate.dashboard")

STATIC = Path(__file__).resolve().parent / "static"
API = "/apisix/admin/dashboard"
PAGE_PREFIX = "/dashboard"  # where the Admin API's listener serves the page
DEFAULT_POINTS = 120  # two minutes of chart at one point a second
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
                 ".json": "application/json", ".svg": "image/svg+xml"}
# Everything the page loads comes from here: a page that tried to load from elsewhere (a
# CDN) would fail in the tests instead of leaking the operator's browsing to the internet.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

SnapshotSource = Callable[[], Awaitable[dict[str, Any]]]


def _page_files() -> dict[str, Path]:
    """Relative URL path -> file, for every file under static/ (nothing else is served:
    no path from a request ever reaches the file system)."""
    files = {path.relative_to(STATIC).as_posix(): path
             for path in STATIC.rglob("*") if path.is_file()}
    files[""] = STATIC / "index.html"
    return files


class Dashboard:
    """The JSON handlers and the traffic history every page shares."""

    def __init__(self, store: ConfigStore, metrics: SnapshotSource) -> None:
        self.store = store
        self.metrics = metrics
        self.history = TrafficHistory()
        self.lock = asyncio.Lock()  # one sample at a time, however many pages poll
        self.files = _page_files()
        self.cache: dict[str, bytes] = {}
        # The served revision last seen, and when it was seen to change (time.time(); None:
        # not since the gateway started).
        self.revision: int | None = None
        self.revision_changed_at: float | None = None
        self.config_cache: tuple[int, Any] | None = None  # (revision, validated config)

    async def sample(self) -> dict[str, Any]:
        """The latest snapshot, taken now when the last is older than the interval."""
        async with self.lock:
            now = time.monotonic()
            if self.history.due(now):
                snapshot = await self.metrics()
                self.history.add(snapshot, time.monotonic(), time.time())
            return self.history.latest_snapshot

    # -- handlers -------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        name = request.match_info.get("file", "")
        path = self.files.get(name)
        if path is None:
            raise web.HTTPNotFound()
        body = self.cache.get(name)
        if body is None:
            body = self.cache[name] = path.read_bytes()
        content_type = CONTENT_TYPES.get(path.suffix, "text/plain")
        return web.Response(body=body, headers={**PAGE_HEADERS,
                                                "Content-Type": f"{content_type}; "
                                                                "charset=utf-8"})

    async def stats(self, request: web.Request) -> web.Response:
        try:
            points = int(request.query.get("points", DEFAULT_POINTS))
        except ValueError:
            points = DEFAULT_POINTS
        points = min(max(points, 0), RING_POINTS)
        snapshot = await self.sample()
        body = self.history.view(points, time.monotonic())
        body["upstreams"] = [{"upstream": upstream, "node": node, "healthy": value >= 1}
                             for (upstream, node), value in
                             sorted(snapshot.get("upstream_health", {}).items())]
        body["gauges"] = dict(sorted(snapshot.get("gauges", {}).items()))
        body["time"] = time.time()
        return _json(body)

    async def summary(self, request: web.Request) -> web.Response:
        snapshot = await self.sample()
        gauges = snapshot.get("gauges", {})
        body: dict[str, Any] = {"version": __version__, "time": time.time(),
                                "workers": gauges.get("workers"), "config_error": None}
        revision: int | None = None
        try:
            state = await self.store.load()
            revision = state.revision
            if self.config_cache is None or self.config_cache[0] != revision:
                self.config_cache = (revision, validate_config(state.document()).config)
            body.update(describe_config(self.config_cache[1],
                                        snapshot.get("upstream_health", {})))
        except (StoreError, ConfigError) as exc:
            # The page still shows traffic and counters; the config part says why not.
            errors = getattr(exc, "errors", None)
            body["config_error"] = "; ".join(errors) if errors else str(exc)
        body["config"] = self._config_state(revision, gauges)
        body["counters"] = exported_families(snapshot)
        return _json(body)

    def _config_state(self, revision: int | None, gauges: dict[str, Any]) -> dict[str, Any]:
        # Workers following a store report the revision they serve (the oldest over them);
        # else the Admin API's own reading of the file.
        served = gauges.get("config_revision")
        current = int(served) if served is not None else revision
        if current is not None and current != self.revision:
            if self.revision is not None:
                self.revision_changed_at = time.time()
            self.revision = current
        modified_at = None
        path = getattr(self.store, "path", None)
        if path is not None:
            with contextlib.suppress(OSError):
                modified_at = os.stat(path).st_mtime
        return {"revision": current, "store_revision": revision,
                "version": gauges.get("config_version"),
                "changed_at": self.revision_changed_at, "file_modified_at": modified_at,
                "confirmed_age_seconds": gauges.get("config_age_seconds"),
                "stale": bool(gauges.get("config_stale", 0))}


def _json(body: Any) -> web.Response:
    return web.json_response(body, headers={"Cache-Control": "no-store"})


def _page_handler(dashboard: Dashboard) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def page(request: web.Request) -> web.Response:
        return await dashboard.page(request)

    page.dashboard_page = True  # type: ignore[attr-defined]  # see serves_page
    return page


def serves_page(request: web.Request) -> bool:
    """Whether the request is for one of the page's files, which need no key."""
    try:
        handler = request.match_info.handler
    except Exception:  # no match (404/405): treated like any other call
        return False
    return getattr(handler, "dashboard_page", False) is True


def add_dashboard_routes(app: web.Application, dashboard: Dashboard, prefix: str) -> None:
    """The JSON under /apisix/admin/dashboard and the page under `prefix` ("" for /).
    Add before any catch-all route: aiohttp matches in the order routes were added."""
    app.router.add_get(f"{API}/summary", dashboard.summary, allow_head=False)
    app.router.add_get(f"{API}/stats", dashboard.stats, allow_head=False)
    page = _page_handler(dashboard)
    if prefix:
        async def to_page(request: web.Request) -> web.Response:
            raise web.HTTPFound(f"{prefix}/")

        to_page.dashboard_page = True  # type: ignore[attr-defined]
        app.router.add_get(prefix, to_page, allow_head=False)
    app.router.add_get(f"{prefix}/{{file:.*}}", page)


class DashboardServer:
    """The dashboard on a listener of its own (`dashboard.listen`): the Admin API's key and
    address filter, the page at /."""

    def __init__(self, settings: DashboardSettings, dashboard: Dashboard, key: AdminKey,
                 addresses: AddressFilter) -> None:
        self.settings = settings
        self.dashboard = dashboard
        self.key = key
        self.addresses = addresses
        self.runner: web.AppRunner | None = None
        self.url = ""

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        add_dashboard_routes(app, self.dashboard, "")
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if not self.addresses.allows(peer[0] if peer else None):
            return web.json_response({"error_msg": "access from this address is not allowed "
                                                   "(admin.allow_admin)"}, status=403)
        if not serves_page(request) and not key_matches(request.headers.get(KEY_HEADER),
                                                         self.key.value):
            return web.json_response({"error_msg": f"missing or wrong {KEY_HEADER}"},
                                     status=401)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return web.json_response({"error_msg": exc.reason}, status=exc.status)
        except Exception:
            log.exception("dashboard: %s %s failed", request.method, request.path)
            return web.json_response({"error_msg": "internal error (see the gateway log)"},
                                     status=500)

    async def start(self) -> bool:
        """Listen; False (logged) when the address cannot be had. A dashboard is not worth
        refusing to route traffic for, and 9000 is a popular port (php-fpm)."""
        host, port = parse_listen(self.settings.listen)
        self.runner = web.AppRunner(self.application(), access_log=None, handle_signals=False)
        await self.runner.setup()
        try:
            await web.TCPSite(self.runner, host, port, reuse_address=True).start()
        except OSError as exc:
            await self.runner.cleanup()
            self.runner = None
            log.error("dashboard: cannot listen on %s (%s); it is still served by the "
                      "Admin API at %s/", self.settings.listen, exc.strerror or exc,
                      PAGE_PREFIX)
            return False
        port = next((address[1] for address in self.runner.addresses
                     if isinstance(address, tuple)), port)
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        log.info("dashboard on %s (the Admin API key)", self.url)
        return True

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
