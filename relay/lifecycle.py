"""Graceful shutdown. On SIGTERM (or SIGINT) uvicorn stops accepting connections and waits up to
RELAY_DRAIN_TIMEOUT_S for open ones; streams that would outlast that are ended a second before it with a
proper OpenAI error event (and [DONE]) instead of a cut connection, so clients know to retry."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

_MARGIN_S = 1.0  # streams end this long before uvicorn gives up on them


class DrainTimeout(Exception):
    """The gateway is shutting down and this stream ran out of time."""


class Drain:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.deadline: float | None = None  # monotonic time by which open streams must have ended

    def start(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + max(self.timeout_s - _MARGIN_S, 0.1)

    def install(self) -> None:
        """Runs before uvicorn's own handlers (which it installed with signal.signal before our startup). Only the
        main thread may set handlers: an app embedded in another thread (a test client) drains nothing."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue

            def handler(signum: int, frame: Any, previous=previous) -> None:
                self.start()
                previous(signum, frame)

            signal.signal(sig, handler)

    async def next(self, chunks: AsyncIterator[Any]) -> Any:
        """The next item of a stream (None at its end), within the drain deadline once draining."""
        if self.deadline is None:
            return await anext(chunks, None)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DrainTimeout
        try:
            return await asyncio.wait_for(anext(chunks, None), remaining)
        except TimeoutError:
            raise DrainTimeout from None
