"""Run the Campaign Monitor simulator in a background thread with its own event loop.

For synchronous clients (the official `createsend` package, urllib) that cannot share the
test's event loop. Other test modules may import `SimulatorThread` and `FakeClock`.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from types import TracebackType

from consumer.devtools.simulator import Simulator, serve


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SimulatorThread:
    """``with SimulatorThread(sim) as base_url: …`` serves `sim` from a daemon thread.

    The simulator's state is plain Python; reading or changing it from the test thread while
    no request is in flight is safe.
    """

    def __init__(
        self,
        sim: Simulator,
        *,
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.sim = sim
        self._host = host
        self._ssl = ssl_context
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.base_url = ""
        self._thread = threading.Thread(target=self._main, name="cm-simulator", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test thread in __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self.sim, self._host, 0, ssl_context=self._ssl) as url:
            self.base_url = url
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> str:
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("the simulator did not start")
        if self._error is not None:
            raise RuntimeError("the simulator failed to start") from self._error
        return self.base_url

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)
