"""Fixtures for the rate-limit tests: a real redis-server per test, always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from servers.redis_server import REDIS_SERVER, RedisServerProcess


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServerProcess]]:
    """Factory: start_redis(password=None, users=None) -> a running redis-server on its
    own port and temp dir; all stopped afterwards."""
    if not Path(REDIS_SERVER).exists():
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    started: list[RedisServerProcess] = []

    def start(**options: Any) -> RedisServerProcess:
        server = RedisServerProcess(tmp_path / f"redis-{len(started)}", **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def redis_server(start_redis: Callable[..., RedisServerProcess]) -> RedisServerProcess:
    return start_redis()
