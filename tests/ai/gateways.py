"""Helpers for AI gateway tests: ai-proxy configs in front of the fake provider
(tests/servers/fake_llm.py) and reading /metrics."""

from __future__ import annotations

import urllib.request
from typing import Any

from harness import wait_for_port

PROVIDER_KEY = "sk-provider-4f7c2a9e1b"


def ai_route(provider: str, endpoint: str, **options: Any) -> dict[str, Any]:
    """ai-proxy options for the fake provider (OpenAI-style or Anthropic auth header)."""
    header = {"x-api-key": PROVIDER_KEY} if provider == "anthropic" else \
        {"Authorization": f"Bearer {PROVIDER_KEY}"}
    return {"provider": provider, "auth": {"header": header},
            "override": {"endpoint": endpoint}, **options}


def ai_config(plugin: dict[str, Any], **route: Any) -> dict[str, Any]:
    """One route /v1/* served by ai-proxy, and /metrics on."""
    return {"routes": [{"id": "llm", "uri": "/v1/*", "plugins": {"ai-proxy": plugin},
                        **route}],
            "global_rules": [{"id": "observe", "plugins": {"prometheus": {}}}]}


def scrape(gateway: Any) -> str:
    wait_for_port(gateway.metrics_port, process=gateway.process)
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics",
                                timeout=5) as response:
        return response.read().decode()


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` in a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found.append((dict(sample.labels), sample.value))
    return found
