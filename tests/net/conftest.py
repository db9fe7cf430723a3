"""Fixtures for tests that need hosts: a client — gateway — server network built from
network namespaces inside the test and deleted after it, also when the test fails.

Tests outside tests/net import the fixture: `from net.conftest import rig_fixture`."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from net.rig import Rig, missing_support, sweep_stale


@functools.cache
def _missing_support() -> str | None:
    sweep_stale()  # once per session: what a killed earlier test run left
    return missing_support()


@pytest.fixture(name="rig")
def rig_fixture(tmp_path: Path) -> Iterator[Rig]:
    """A fresh client/gateway/server rig (see net/rig.py). Skips with the exact reason when
    this host cannot build one; fails when a namespace or veth outlives the test."""
    reason = _missing_support()
    if reason is not None:
        pytest.skip(reason)
    rig = Rig(tmp_path)
    try:
        yield rig
    finally:
        rig.close()
    left = rig.leftovers()
    assert not left, f"left behind after the test: {left}"
