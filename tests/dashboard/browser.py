"""A browser page under watch, for the dashboard tests."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit


class PageWatch:
    """A browser page that records what would make a dashboard wrong without failing a
    visible check: script errors, console errors and requests leaving the gateway."""

    def __init__(self, page: Any, allowed_host: str = "127.0.0.1") -> None:
        self.page = page
        self.errors: list[str] = []
        self.outside: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        page.on("console", self._console)

        def route(route: Any) -> None:
            url = route.request.url
            if urlsplit(url).hostname != allowed_host:
                self.outside.append(url)
                route.abort()
            else:
                route.continue_()

        page.route("**/*", route)

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")
