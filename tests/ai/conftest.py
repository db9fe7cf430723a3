"""Fixtures for the AI gateway: the fake provider (tests/servers/fake_llm.py) in a thread of
the test process, and gateways with an ai-proxy route in front of it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ai.gateways import PROVIDER_KEY, ai_config, ai_route
from servers.fake_llm import FakeLLM


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    fake = FakeLLM(api_key=PROVIDER_KEY).start()
    yield fake
    fake.stop()


@pytest.fixture
def openai_gateway(start_gateway: Any, fake_llm: FakeLLM) -> Any:
    """A gateway whose /v1/* answers from the fake provider speaking OpenAI."""
    return start_gateway(ai_config(ai_route("openai", f"{fake_llm.url}/v1")))


@pytest.fixture
def anthropic_gateway(start_gateway: Any, fake_llm: FakeLLM) -> Any:
    """A gateway whose /v1/* answers from the fake provider speaking Anthropic."""
    return start_gateway(ai_config(ai_route("anthropic", f"{fake_llm.url}/v1")))


@pytest.fixture
def fake_llms() -> Iterator[list[FakeLLM]]:
    """Three fake providers (for ai-proxy-multi), each on its own port."""
    fakes = [FakeLLM(api_key=PROVIDER_KEY).start() for _ in range(3)]
    yield fakes
    for fake in fakes:
        fake.stop()
