"""The plugin contract (sluicegate.plugins.base): registry, chain order, `_meta`, and the
errors validate_plugin reports."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from sluicegate.plugins import base
from sluicegate.plugins.base import (
    PluginChain,
    PluginConfig,
    PluginEnv,
    PluginMeta,
    Response,
    build_chain,
    load_plugins,
    register,
    validate_plugin,
)


@pytest.fixture
def registry(monkeypatch) -> dict[str, type[base.Plugin]]:
    """A private copy of the registry: plugins registered in a test vanish after it."""
    copy = dict(load_plugins())
    monkeypatch.setattr(base, "REGISTRY", copy)
    return copy


class EmptyConfig(PluginConfig):
    pass


class Trace:
    """A request context stand-in that records which hook ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []


def make_plugin(name: str, priority: int, phases: tuple[str, ...] = ("access",),
                answer: int | None = None) -> type[base.Plugin]:
    """A plugin class whose hooks record `name.phase`; `answer` makes access respond."""
    namespace: dict[str, Any] = {"name": name, "priority": priority, "schema": EmptyConfig}
    for phase in phases:
        def hook(self, ctx, *rest, _phase=phase):
            ctx.calls.append(f"{self.name}.{_phase}")
            if _phase == "access" and answer is not None:
                return Response(answer, name.encode())
            return rest[0] if _phase == "body_filter" else None
        namespace[phase] = hook
    return type(name.title().replace("-", ""), (base.Plugin,), namespace)


def entry(name: str, **meta: Any) -> tuple[str, Any, PluginMeta]:
    return (name, EmptyConfig(), PluginMeta(**meta))


def names(chain: PluginChain) -> list[str]:
    return [plugin.name for plugin in chain.plugins]


def run_request_phases(chain: PluginChain, ctx: Trace) -> Response | None:
    """What the data plane does: hooks in order until one answers."""
    for hook in chain.request_hooks:
        result = hook(ctx)
        if isinstance(result, Response):
            return result
    return None


# -- registry -----------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["name", "priority", "schema"])
def test_registry_refuses_a_plugin_missing_name_priority_or_schema(registry, missing):
    namespace = {"name": "incomplete", "priority": 1, "schema": EmptyConfig}
    del namespace[missing]
    cls = type("Incomplete", (base.Plugin,), namespace)
    with pytest.raises(TypeError, match=missing):
        register(cls)
    assert "incomplete" not in registry


def test_registry_refuses_a_schema_that_is_not_a_pydantic_model(registry):
    cls = type("Loose", (base.Plugin,), {"name": "loose", "priority": 1, "schema": dict})
    with pytest.raises(TypeError, match="pydantic"):
        register(cls)
    assert "loose" not in registry


def test_registry_refuses_two_plugins_with_one_name(registry):
    register(make_plugin("twin", 1))
    with pytest.raises(TypeError, match="twin"):
        register(make_plugin("twin", 2))


def test_registered_plugin_is_validated_and_built_like_a_builtin(registry):
    register(make_plugin("custom", 7))
    model, meta, errors = validate_plugin("custom", {"_meta": {"priority": 3}}, "p")
    assert errors == []
    assert meta.priority == 3
    chain = build_chain([("custom", model, meta)], PluginEnv())
    assert names(chain) == ["custom"]


def test_every_builtin_plugin_is_named_after_its_file():
    folder = Path(base.__file__).parent
    files = {p.stem.replace("_", "-") for p in folder.glob("*.py")} - {"--init--", "base"}
    registry = load_plugins()
    assert files <= set(registry), files - set(registry)
    for name, cls in registry.items():
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), name
        assert isinstance(cls.priority, int)
        assert issubclass(cls.schema, PluginConfig)


# -- chain order --------------------------------------------------------------------------


def test_chain_orders_plugins_by_descending_priority(registry):
    for name, priority in (("low", 1), ("high", 100), ("mid", 50)):
        register(make_plugin(name, priority))
    chain = build_chain([entry("low"), entry("high"), entry("mid")], PluginEnv())
    assert names(chain) == ["high", "mid", "low"]
    ctx = Trace()
    assert run_request_phases(chain, ctx) is None
    assert ctx.calls == ["high.access", "mid.access", "low.access"]


def test_request_hooks_run_phase_by_phase_then_by_priority(registry):
    register(make_plugin("auth", 100, ("access",)))
    register(make_plugin("rewriter", 1, ("rewrite", "before_proxy")))
    register(make_plugin("both", 50, ("rewrite", "access")))
    chain = build_chain([entry("auth"), entry("rewriter"), entry("both")], PluginEnv())
    ctx = Trace()
    run_request_phases(chain, ctx)
    assert ctx.calls == ["both.rewrite", "rewriter.rewrite", "auth.access", "both.access",
                         "rewriter.before_proxy"]


def test_first_answering_hook_ends_the_request_phases(registry):
    register(make_plugin("gate", 100, answer=403))
    register(make_plugin("after", 10))
    chain = build_chain([entry("after"), entry("gate")], PluginEnv())
    ctx = Trace()
    response = run_request_phases(chain, ctx)
    assert response is not None and response.status == 403
    assert ctx.calls == ["gate.access"]


def test_chain_lists_only_the_phases_its_plugins_define(registry):
    register(make_plugin("quiet", 5, ("access",)))
    register(make_plugin("logger", 1, ("log",)))
    chain = build_chain([entry("quiet"), entry("logger")], PluginEnv())
    assert len(chain.request_hooks) == 1
    assert len(chain.log) == 1
    assert chain.header_filter == [] and chain.body_filter == []
    assert chain.needs_headers is False
    register(make_plugin("shaper", 3, ("header_filter", "body_filter")))
    shaped = build_chain([entry("shaper")], PluginEnv())
    assert shaped.needs_headers is True
    assert len(shaped.header_filter) == len(shaped.body_filter) == 1


def test_meta_disable_removes_the_plugin_from_the_chain(registry):
    register(make_plugin("kept", 1))
    register(make_plugin("dropped", 2))
    chain = build_chain([entry("kept"), entry("dropped", disable=True)], PluginEnv())
    assert names(chain) == ["kept"]


def test_meta_priority_reorders_the_chain(registry):
    register(make_plugin("first", 100, answer=401))
    register(make_plugin("second", 10, answer=403))
    default = build_chain([entry("first"), entry("second")], PluginEnv())
    raised = build_chain([entry("first"), entry("second", priority=1000)], PluginEnv())
    assert names(default) == ["first", "second"]
    assert names(raised) == ["second", "first"]
    assert run_request_phases(default, Trace()).status == 401
    assert run_request_phases(raised, Trace()).status == 403


def test_later_entry_of_the_same_plugin_replaces_earlier_ones(registry):
    # Entries come global, then service, then route: the route's config wins.
    model_a, meta_a, _ = validate_plugin("proxy-rewrite", {"uri": "/service"}, "s")
    model_b, meta_b, _ = validate_plugin("proxy-rewrite", {"uri": "/route"}, "r")
    chain = build_chain([("proxy-rewrite", model_a, meta_a), ("proxy-rewrite", model_b, meta_b)],
                        PluginEnv())
    assert names(chain) == ["proxy-rewrite"]
    assert chain.plugins[0].conf.uri == "/route"


def test_route_meta_disable_overrides_an_inherited_plugin(registry):
    register(make_plugin("inherited", 5))
    chain = build_chain([entry("inherited"), entry("inherited", disable=True)], PluginEnv())
    assert names(chain) == []


def test_builtin_plugin_priorities_are_apisix_priorities():
    # APISIX users reorder plugins with `_meta.priority` against these numbers.
    registry = load_plugins()
    expected = {"request-id": 12015, "basic-auth": 2520, "key-auth": 2500,
                "proxy-rewrite": 1008, "response-rewrite": 899, "prometheus": 500,
                "file-logger": 399}
    assert {name: registry[name].priority for name in expected} == expected


# -- validate_plugin ----------------------------------------------------------------------


def test_validate_plugin_reports_an_unknown_plugin_with_the_known_ones():
    model, _, errors = validate_plugin("key-auht", {}, "routes[0].plugins.key-auht")
    assert model is None
    assert len(errors) == 1
    assert errors[0].startswith("routes[0].plugins.key-auht: unknown plugin 'key-auht'")
    assert "key-auth" in errors[0]


def test_validate_plugin_refuses_a_config_that_is_not_a_mapping():
    _, _, errors = validate_plugin("key-auth", ["apikey"], "routes[0].plugins.key-auth")
    assert errors == ["routes[0].plugins.key-auth: plugin config must be a mapping"]


def test_validate_plugin_names_the_bad_field():
    _, _, errors = validate_plugin("key-auth", {"header": "bad header"},
                                   "routes[1].plugins.key-auth")
    assert len(errors) == 1
    assert errors[0].startswith("routes[1].plugins.key-auth.header: ")


def test_validate_plugin_refuses_unknown_options():
    _, _, errors = validate_plugin("request-id", {"header": "X-Id"}, "p")
    assert len(errors) == 1
    assert errors[0].startswith("p.header: ")


def test_validate_plugin_reports_a_bad_meta_with_its_path():
    _, _, errors = validate_plugin("key-auth", {"_meta": {"disabled": True}}, "p")
    assert any(error.startswith("p._meta.disabled: ") for error in errors), errors
    _, _, errors = validate_plugin("key-auth", {"_meta": {"priority": "high"}}, "p")
    assert any(error.startswith("p._meta.priority: ") for error in errors), errors


def test_validate_plugin_takes_meta_out_of_the_plugin_config():
    model, meta, errors = validate_plugin(
        "key-auth", {"header": "X-Key", "_meta": {"disable": True, "priority": 9}}, "p")
    assert errors == []
    assert meta == PluginMeta(disable=True, priority=9)
    assert model.header == "X-Key"


def test_validate_plugin_fills_defaults_from_the_schema():
    for conf in ({}, None):
        model, meta, errors = validate_plugin("key-auth", conf, "p")
        assert errors == []
        assert model.header == "apikey" and model.query == "apikey"
        assert meta == PluginMeta()


def test_validate_plugin_runs_semantic_checks_after_the_schema():
    _, _, errors = validate_plugin("proxy-rewrite", {"regex_uri": ["^/a/(.*)", "/b/$2"]},
                                   "routes[0].plugins.proxy-rewrite")
    assert len(errors) == 1
    assert errors[0].startswith("routes[0].plugins.proxy-rewrite.regex_uri[1]: ")


def test_validate_plugin_for_a_consumer_uses_the_consumer_schema():
    model, _, errors = validate_plugin("key-auth", {"key": "k-1"}, "c", for_consumer=True)
    assert errors == [] and model.key == "k-1"
    _, _, errors = validate_plugin("key-auth", {}, "consumers[0].plugins.key-auth",
                                   for_consumer=True)
    assert errors and errors[0].startswith("consumers[0].plugins.key-auth.key: ")


def test_validate_plugin_for_a_consumer_refuses_a_plugin_without_consumer_config():
    model, _, errors = validate_plugin("proxy-rewrite", {}, "c", for_consumer=True)
    assert model is None
    assert errors == ["c: plugin 'proxy-rewrite' has no consumer config"]
