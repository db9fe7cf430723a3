"""The Admin API server: aiohttp on `admin.listen`, guarded by `auth`, serving `resources`.

It runs in one process per gateway (the worker when there is one, else the supervisor) and
only writes to the store; every worker follows the store and applies what it finds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from sluicegate.admin.auth import (
    KEY_HEADER,
    AddressFilter,
    AdminKey,
    key_matches,
    resolve_admin_key,
)
from sluicegate.admin.openapi import openapi_document
from sluicegate.admin.resources import AdminError, Resources
from sluicegate.config.load import ConfigError
from sluicegate.config.model import AdminSettings, DashboardSettings, parse_listen
from sluicegate.dashboard.server import (
    PAGE_PREFIX,
    Dashboard,
    DashboardServer,
    SnapshotSource,
    add_dashboard_routes,
    serves_page,
)
from sluicegate.store.base import ConfigStore, StoreError, id_field

log = logging.getLogger("sluicegate.admin")

# Request bodies above this are refused with 413: a resource is a few KiB, and an ssl with
# its certificate chain inlined stays well under.
MAX_BODY = 1024 * 1024
PREFIX = "/apisix/admin"


def _error(status: int, message: str, errors: list[str] | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, Any] = {"error_msg": message}
    if errors:
        body["errors"] = errors
    return web.json_response(body, status=status, headers=headers)


def allowed_methods(path: str) -> str:
    """The `Allow` header of a 405: exactly what the OpenAPI description lists there
    (aiohttp's own would name the methods of every route pattern the path matched)."""
    parts = path[len(PREFIX):].strip("/").split("/")
    if len(parts) == 1:
        if parts[0] in ("config", "openapi.json"):
            return "GET"
        return "GET, PUT" if id_field(parts[0]) != "id" else "GET, POST, PUT"
    if len(parts) == 2:
        return "DELETE, GET, PATCH, PUT"
    return "PATCH"


class AdminServer:
    """`start()` listens (and logs a generated key, once), `stop()` closes. The key is
    resolved at construction."""

    def __init__(self, settings: AdminSettings, store: ConfigStore,
                 dashboard: DashboardSettings | None = None,
                 metrics: SnapshotSource | None = None) -> None:
        self.settings = settings
        self.store = store
        self.key: AdminKey = resolve_admin_key(settings)
        self.addresses = AddressFilter(settings.allow_admin)
        self.resources = Resources(store)
        self.runner: web.AppRunner | None = None
        # The dashboard (dashboard/server.py) needs the metrics of the gateway's workers.
        self.dashboard_settings = dashboard
        self.dashboard = Dashboard(store, metrics) if metrics is not None and \
            dashboard is not None and dashboard.enabled else None
        self.dashboard_server: DashboardServer | None = None

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY,
                              middlewares=[self._errors_as_json, self._guard])
        if self.dashboard is not None:  # before /{kind}/{id}, which would match it
            add_dashboard_routes(app, self.dashboard, PAGE_PREFIX)
        for path, handler in ((f"{PREFIX}/openapi.json", self._openapi),
                              (f"{PREFIX}/config", self._config)):
            app.router.add_get(path, handler, allow_head=False)
            # Any other method: 405 here, not a match of /{kind} below.
            app.router.add_route("*", path, self._not_allowed)
        app.router.add_get(f"{PREFIX}/{{kind}}", self._list, allow_head=False)
        app.router.add_put(f"{PREFIX}/{{kind}}", self._put)
        app.router.add_post(f"{PREFIX}/{{kind}}", self._post)
        app.router.add_get(f"{PREFIX}/{{kind}}/{{id}}", self._get, allow_head=False)
        app.router.add_put(f"{PREFIX}/{{kind}}/{{id}}", self._put)
        app.router.add_patch(f"{PREFIX}/{{kind}}/{{id}}", self._patch)
        app.router.add_delete(f"{PREFIX}/{{kind}}/{{id}}", self._delete)
        app.router.add_patch(f"{PREFIX}/{{kind}}/{{id}}/{{sub_path:.+}}", self._patch)
        return app

    async def start(self) -> None:
        """Listen; OSError (address in use...) propagates: a gateway asked for an Admin API
        that cannot have one does not start, like one whose listen port is taken."""
        host, port = parse_listen(self.settings.listen)
        # No access log: aiohttp's would print each request line; the key is in a header
        # and never logged, but quieter is safer and the data plane has its own log.
        self.runner = web.AppRunner(self.application(), access_log=None,
                                    handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            self.runner = None
            # Say which listener: `run` prints strerror.
            raise OSError(exc.errno, f"Admin API {self.settings.listen}: "
                                     f"{exc.strerror or exc}") from exc
        # The bound port: `listen` may say 0 (any free port).
        port = next((address[1] for address in self.runner.addresses
                     if isinstance(address, tuple)), port)
        where = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        if self.key.source == "generated":
            # Printed once, on purpose: there is no default key, and this is how the
            # operator learns the one made up for this run.
            log.warning("Admin API on %s: no admin.key or SLUICEGATE_ADMIN_KEY set; "
                        "generated key for this run: %s", where, self.key.value)
        else:
            log.info("Admin API on %s (key from %s)", where, self.key.source)
        if self.dashboard is not None and self.dashboard_settings is not None:
            self.dashboard_server = DashboardServer(self.dashboard_settings, self.dashboard,
                                                    self.key, self.addresses)
            if not await self.dashboard_server.start():
                self.dashboard_server = None

    async def stop(self) -> None:
        if self.dashboard_server is not None:
            await self.dashboard_server.stop()
            self.dashboard_server = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # -- middlewares --------------------------------------------------------------------

    @web.middleware
    async def _errors_as_json(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every error, aiohttp's own (404, 405, 413) included, as APISIX's JSON shape."""
        try:
            return await handler(request)
        except AdminError as exc:
            headers = {"Allow": allowed_methods(request.path)} if exc.status == 405 else None
            return _error(exc.status, exc.message, exc.errors, headers)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"request body too large (at most {MAX_BODY} bytes)")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 405:
                return _error(405, f"{request.method} is not allowed here",
                              headers={"Allow": allowed_methods(request.path)})
            return _error(exc.status, exc.reason)
        except StoreError as exc:
            log.error("Admin API: config store failed: %s", exc)
            return _error(503, f"config store unavailable: {exc}")
        except ConfigError as exc:
            # The store's own content does not load (a config file broken by hand): nothing
            # can be validated against it, and it is not overwritten.
            log.error("Admin API: the stored config cannot be read: %s", exc)
            return _error(503, "the stored config cannot be read", exc.errors)
        except Exception:
            log.exception("Admin API: %s %s failed", request.method, request.path)
            return _error(500, "internal error (see the gateway log)")

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # Address first (as APISIX's allow_admin): a caller from elsewhere learns nothing
        # about the key.
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if not self.addresses.allows(peer[0] if peer else None):
            return _error(403, "access from this address is not allowed (admin.allow_admin)")
        if not key_matches(request.headers.get(KEY_HEADER), self.key.value) and \
                not serves_page(request):  # the dashboard's files: the page asks the key
            return _error(401, f"missing or wrong {KEY_HEADER}")
        return await handler(request)

    # -- handlers -----------------------------------------------------------------------

    @staticmethod
    async def _body(request: web.Request) -> Any:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY,
                                                actual_size=request.content_length)
        raw = await request.read()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AdminError(400, f"the body is not valid JSON: {exc}") from None

    async def _not_allowed(self, request: web.Request) -> web.Response:
        raise AdminError(405, f"{request.method} is not allowed here")

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def _config(self, request: web.Request) -> web.Response:
        return web.json_response({"value": await self.resources.document()})

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response(await self.resources.list(request.match_info["kind"]))

    async def _get(self, request: web.Request) -> web.Response:
        info = request.match_info
        return web.json_response(await self.resources.get(info["kind"], info["id"]))

    async def _put(self, request: web.Request) -> web.Response:
        info = request.match_info
        self.resources.check_kind(info["kind"])
        status, body = await self.resources.put(info["kind"], info.get("id"),
                                                await self._body(request))
        return web.json_response(body, status=status)

    async def _post(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        self.resources.check_kind(kind)
        status, body = await self.resources.post(kind, await self._body(request))
        return web.json_response(body, status=status)

    async def _patch(self, request: web.Request) -> web.Response:
        info = request.match_info
        self.resources.check_kind(info["kind"])
        body = await self.resources.patch(info["kind"], info["id"], await self._body(request),
                                          info.get("sub_path"))
        return web.json_response(body)

    async def _delete(self, request: web.Request) -> web.Response:
        info = request.match_info
        return web.json_response(await self.resources.delete(info["kind"], info["id"]))


async def start_admin_server(settings: AdminSettings, store: ConfigStore | None,
                             config_path: str | Path | None,
                             dashboard: DashboardSettings | None = None,
                             metrics: SnapshotSource | None = None) -> AdminServer | None:
    """The Admin API for a gateway process, or None when `admin.enabled` is false. Without
    a store given, the config file is the store."""
    if not settings.enabled:
        return None
    if store is None:
        if config_path is None:
            return None
        from sluicegate.store.file import FileStore

        store = FileStore(config_path)
    server = AdminServer(settings, store, dashboard, metrics)
    await server.start()
    return server
