"""An aiohttp application served from a thread of the test process (or from a script's own
loop with `start_async`): what the fake providers share. A subclass sets `thread_name`,
builds its routes in `app()` and keeps `port` (0: the kernel picks one)."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web


class AppInThread:
    thread_name = "fake-server"
    host = "127.0.0.1"
    port = 0
    # Seconds a stop waits for open requests (aiohttp's default is a minute).
    shutdown_timeout = 60.0
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    def app(self) -> web.Application:
        raise NotImplementedError

    async def start_async(self) -> None:
        # handler_cancellation: a client that leaves cancels its handler.
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                                     shutdown_timeout=self.shutdown_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def start(self) -> AppInThread:
        """Serve from a thread of this process."""
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start_async())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name=self.thread_name)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"{self.thread_name} did not start")
        return self

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
