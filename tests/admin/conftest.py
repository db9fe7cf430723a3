"""Admin API fixtures: a real gateway process with its Admin API on a free port."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from admin.client import AdminClient, admin_port, with_admin
from harness import Gateway


@pytest.fixture(autouse=True)
def no_admin_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """SLUICEGATE_ADMIN_KEY overrides the file's key: the tests set the key they mean."""
    monkeypatch.delenv("SLUICEGATE_ADMIN_KEY", raising=False)
    monkeypatch.delenv("SLUICEGATE_ADMIN_URL", raising=False)


@pytest.fixture
def admin_gateway(start_gateway: Callable[..., Gateway]
                  ) -> Callable[..., tuple[Gateway, AdminClient]]:
    """Factory: admin_gateway(config, workers=1, **admin_settings) -> (gateway, client), with
    the Admin API listening."""

    def start(config: dict[str, Any] | None = None, workers: int = 1,
              **admin: Any) -> tuple[Gateway, AdminClient]:
        gateway = start_gateway(with_admin(config or {}, **admin), workers=workers)
        return gateway, AdminClient(admin_port(gateway))

    return start
