"""Fixtures: real servers and the gateway, started per test or per session, always stopped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import NGINX, EchoUpstream, Gateway, Nginx


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    if not Path(NGINX).exists():
        pytest.fail("nginx is not installed: run `make test`, which installs it")
    server = Nginx(tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def echo() -> Iterator[EchoUpstream]:
    server = EchoUpstream()
    yield server
    server.stop()


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Any]:
    """Factory: start_gateway(config_dict, workers=1) -> Gateway; all stopped afterwards."""
    started: list[Gateway] = []

    def start(config: dict[str, Any], **options: Any) -> Gateway:
        gateway = Gateway(tmp_path, config, **options)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="session", autouse=True)
def root_namespace_stays_untouched() -> Iterator[None]:
    """Interception must only ever be installed inside test namespaces: fail the run if
    the root namespace ends up with a sluicegate table."""
    yield
    import shutil
    import subprocess

    if shutil.which("nft"):
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True,
                                text=True).stdout
        assert "sluicegate" not in tables, "a test installed interception in the root netns"
