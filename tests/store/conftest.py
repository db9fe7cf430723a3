"""Fixtures for the config-store tests: a real etcd (shared, or a test's own when it stops,
restarts or compacts it) and a fresh key prefix per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers.etcd_server import ETCD, Etcd


def _require_etcd() -> None:
    if not Path(ETCD).exists():
        pytest.fail("etcd is not installed: run `make test`, which installs it")


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    """One etcd for the session; tests keep apart by `prefix`."""
    _require_etcd()
    server = Etcd(tmp_path_factory.mktemp("etcd"))
    yield server
    server.stop()


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[Etcd]:
    """An etcd for this test alone (it may be stopped, restarted, compacted)."""
    _require_etcd()
    server = Etcd(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"/sg-{uuid.uuid4().hex[:10]}"
