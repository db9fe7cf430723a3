"""The plugin contract, the registry, and per-route plugin chains.

A plugin is one file in this package declaring `name` (= file name in kebab-case),
`priority` (higher runs first), `schema` (pydantic model of its route config; defaults live
there) and only the phase hooks it needs:

- `rewrite(ctx)`, `access(ctx)`, `before_proxy(ctx)`: return None to go on, a `Response` to
  answer the request now, or an awaitable resolving to either (for plugins that need I/O);
- `header_filter(ctx)`: edit `ctx.response_status` / `ctx.response_headers`;
- `body_filter(ctx, chunk, eof) -> bytes`: transform the response body as it streams;
- `log(ctx)`: after the response is sent.

Plugins are logic over the request context: only `http/`, `stream/`, `store/` and `admin/`
do I/O. Instances are built once per config snapshot; hooks run on the hot path.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from sluicegate.observe.metrics import MetricsStore

PHASES = ("rewrite", "access", "before_proxy", "header_filter", "body_filter", "log")
# Phases whose hooks may end the request with a response.
REQUEST_PHASES = ("rewrite", "access", "before_proxy")


class PluginConfig(BaseModel):
    """Base of every plugin schema: unknown options are errors; attribute docstrings are
    the option's documentation (and reach the JSON Schema)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class PluginMeta(BaseModel):
    """APISIX `_meta`: per-route overrides of a plugin's place in the chain."""

    model_config = ConfigDict(extra="forbid")
    disable: bool = False
    priority: int | None = None


class Response:
    """A response produced by the gateway itself (a plugin or an error)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes = b"",
                 headers: list[tuple[str, str]] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or []


def json_response(status: int, message: str, **extra: Any) -> Response:
    import json

    payload = {"error_msg": message, **extra}
    return Response(status, json.dumps(payload).encode(),
                    [("Content-Type", "application/json")])


class LocalHandler:
    """A request-phase hook's answer when its plugin serves the request itself from the
    whole request body, in place of an upstream (ai-proxy). The exchange reads the body (413
    past `max_body` bytes), then runs `serve(body, writer)` as a task. The writer (the
    exchange) answers with `respond(Response)`, or streams: `send_head(status, headers)`,
    `send_body(data)` (written to the client at once), `end_body()`. The client going away
    cancels the task."""

    __slots__ = ("max_body", "serve")

    def __init__(self, serve: Callable[[bytes, Any], Awaitable[None]], max_body: int) -> None:
        self.serve = serve
        self.max_body = max_body


HookResult = Response | None | Awaitable[Response | None]


@dataclass
class Consumer:
    """A consumer as plugins see it: its credentials, validated by each auth plugin's
    `consumer_schema`, keyed by plugin name."""

    username: str
    plugin_confs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PluginEnv:
    """What a plugin may need beyond its own config, built once per snapshot."""

    consumers: dict[str, Consumer] = field(default_factory=dict)
    metrics: MetricsStore | None = None


class Plugin:
    """Base class; subclasses set `name`, `priority`, `schema` and define hooks."""

    name: ClassVar[str]
    priority: ClassVar[int]
    schema: ClassVar[type[PluginConfig]]
    # Schema of this plugin's section in a consumer (auth plugins: the credential).
    consumer_schema: ClassVar[type[PluginConfig] | None] = None
    # Consumer credential field that must be unique across consumers (auth plugins).
    consumer_unique_field: ClassVar[str | None] = None
    # An entry point (how traffic enters, e.g. tproxy), not a phase plugin: never in a chain.
    entry_point: ClassVar[bool] = False
    # Answers requests itself (returns a LocalHandler): a route with it needs no upstream.
    serves_requests: ClassVar[bool] = False
    # Short form: may `service` name a service that is not defined? (validate then warns)
    service_optional: ClassVar[bool] = False
    # False while a plugin's machinery is not built: config validates, `run` refuses.
    available: ClassVar[bool] = True
    unavailable_reason: ClassVar[str] = ""

    def __init__(self, conf: Any, env: PluginEnv) -> None:
        self.conf = conf
        self.env = env

    @classmethod
    def check(cls, conf: Any) -> list[str]:
        """Semantic checks beyond the schema; returns reasons (empty when fine)."""
        return []

    @classmethod
    def check_siblings(cls, conf: Any, plugins: dict[str, Any]) -> list[str]:
        """Checks of this plugin's raw `conf` against the plugins configured next to it
        (the same `plugins` object of a route, service or plugin_config), e.g. names that
        must match another plugin's. Reasons are relative to this plugin's path."""
        return []


REGISTRY: dict[str, type[Plugin]] = {}


def register(cls: type[Plugin]) -> type[Plugin]:
    """Class decorator adding a plugin to the registry; refuses incomplete plugins."""
    for attribute in ("name", "priority", "schema"):
        if not hasattr(cls, attribute):
            raise TypeError(f"plugin {cls.__qualname__} lacks {attribute!r}")
    if not (isinstance(cls.schema, type) and issubclass(cls.schema, BaseModel)):
        raise TypeError(f"plugin {cls.name}: schema must be a pydantic model")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise TypeError(f"plugin name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


_loaded = False


def load_plugins() -> dict[str, type[Plugin]]:
    """Import every plugin module of this package once."""
    global _loaded
    if not _loaded:
        import sluicegate.plugins as package

        for module in pkgutil.iter_modules(package.__path__):
            if module.name != "base":
                importlib.import_module(f"sluicegate.plugins.{module.name}")
        _loaded = True
    return REGISTRY


def format_location(prefix: str, loc: tuple[Any, ...]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


# A reason that starts with its own field path ("vars[0]: bad regex"), from a validator
# that knows more precisely where the problem is than the field it validates.
_LEADING_PATH = re.compile(r"([A-Za-z_][\w\-]*)((?:\[\d+\])*(?:\.[\w\-]+(?:\[\d+\])*)*): (.*)",
                           re.DOTALL)


def join_path(path: str, reason: str) -> str:
    """`path: reason`, with a field path leading the reason folded into the path."""
    match = _LEADING_PATH.fullmatch(reason)
    if match is None:
        return f"{path}: {reason}"
    head, rest, message = match.groups()
    if path == head or path.endswith(f".{head}"):
        return f"{path}{rest}: {message}"
    return f"{path}.{head}{rest}: {message}" if path else f"{head}{rest}: {message}"


def validation_errors(prefix: str, exc: ValidationError) -> list[str]:
    errors = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        errors.append(join_path(format_location(prefix, error["loc"]), message))
    return errors


def validate_plugin(name: str, conf: Any, path: str, *, for_consumer: bool = False
                    ) -> tuple[Any, PluginMeta, list[str]]:
    """Validate one plugin's config; returns (conf model, meta, errors with field paths)."""
    registry = load_plugins()
    cls = registry.get(name)
    if cls is None:
        known = ", ".join(sorted(registry))
        return None, PluginMeta(), [f"{path}: unknown plugin {name!r} (known: {known})"]
    if conf is None:
        conf = {}
    if not isinstance(conf, dict):
        return None, PluginMeta(), [f"{path}: plugin config must be a mapping"]
    conf = dict(conf)
    errors: list[str] = []
    meta = PluginMeta()
    if "_meta" in conf:
        try:
            meta = PluginMeta.model_validate(conf.pop("_meta"))
        except ValidationError as exc:
            errors += validation_errors(f"{path}._meta", exc)
    schema = cls.consumer_schema if for_consumer else cls.schema
    if schema is None:
        return None, meta, [f"{path}: plugin {name!r} has no consumer config"]
    try:
        model = schema.model_validate(conf)
    except ValidationError as exc:
        return None, meta, errors + validation_errors(path, exc)
    errors += [join_path(path, reason) for reason in (cls.check(model) if not for_consumer else [])]
    return model, meta, errors


Hook = Callable[..., Any]


class PluginChain:
    """The plugins of one route, sorted, with a hook list per phase (built once)."""

    __slots__ = ("body_filter", "header_filter", "log", "needs_headers", "plugins",
                 "request_hooks")

    def __init__(self, plugins: list[Plugin]) -> None:
        self.plugins = plugins
        # rewrite, access, before_proxy, in phase order then priority order.
        self.request_hooks: list[Hook] = [
            getattr(plugin, phase) for phase in REQUEST_PHASES for plugin in plugins
            if hasattr(plugin, phase)
        ]
        self.header_filter: list[Hook] = [p.header_filter for p in plugins
                                          if hasattr(p, "header_filter")]
        self.body_filter: list[Hook] = [p.body_filter for p in plugins
                                        if hasattr(p, "body_filter")]
        self.log: list[Hook] = [p.log for p in plugins if hasattr(p, "log")]
        self.needs_headers = bool(self.header_filter or self.body_filter)


def build_chain(entries: list[tuple[str, Any, PluginMeta]], env: PluginEnv) -> PluginChain:
    """Instantiate and order plugins. Later entries override earlier ones of the same name
    (route over service over global), `_meta.disable` removes, `_meta.priority` reorders."""
    chosen: dict[str, tuple[Any, PluginMeta]] = {}
    for name, conf, meta in entries:
        chosen[name] = (conf, meta)
    instances: list[tuple[int, Plugin]] = []
    for name, (conf, meta) in chosen.items():
        if meta.disable:
            continue
        cls = REGISTRY[name]
        priority = cls.priority if meta.priority is None else meta.priority
        instances.append((priority, cls(conf, env)))
    instances.sort(key=lambda item: -item[0])
    return PluginChain([plugin for _, plugin in instances])


EMPTY_CHAIN = PluginChain([])

