"""Dashboard fixtures: Debian's Chromium, headless, driven by Playwright (no browser
download: Playwright is pointed at /usr/bin/chromium), and a place for screenshots."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dashboard.browser import PageWatch
from harness import ROOT

CHROMIUM = os.environ.get("SLUICEGATE_TEST_CHROMIUM") or shutil.which("chromium") or \
    "/usr/bin/chromium"
# Screenshots are kept here for people (and CI logs) to look at; .gitignore covers it.
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"


@pytest.fixture(autouse=True)
def no_admin_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """SLUICEGATE_ADMIN_KEY overrides the file's key: the tests set the key they mean."""
    monkeypatch.delenv("SLUICEGATE_ADMIN_KEY", raising=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium per test module: Playwright's sync API keeps an event loop
    running in the main thread while it is open, which would break every later test that
    calls asyncio.run() if it stayed open for the session. Skips (saying why) only when
    Chromium itself cannot run here; a missing Playwright is a broken test environment."""
    from playwright.sync_api import Error, sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM}: `make deps` installs Debian's "
                    "chromium package")
    with sync_playwright() as playwright:
        try:
            # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start.
            launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                  args=["--no-sandbox",
                                                        "--disable-dev-shm-usage"])
        except Error as exc:
            pytest.skip(f"Chromium at {CHROMIUM} cannot start here: {exc}")
        yield launched
        launched.close()


@pytest.fixture
def watched_page(browser: Any) -> Iterator[PageWatch]:
    context = browser.new_context(viewport={"width": 1400, "height": 1600})
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield PageWatch(page)
    context.close()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
