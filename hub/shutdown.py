"""Graceful shutdown: drain before uvicorn closes connections.

uvicorn's first reaction to SIGTERM is to close every WebSocket with 1012 at once. We
wrap its signal handler for the app's lifetime: the first SIGTERM/SIGINT runs
:meth:`Hub.drain` (every client gets ``bye`` with ``reconnect: true`` and close 1001;
SSE streams end with ``event: disconnect``), and only then hands the signal to uvicorn.
A second signal goes straight to uvicorn (forced exit). Works the same under
``herald serve`` and a plain ``uvicorn`` command; a no-op outside the main thread.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

logger = logging.getLogger("herald.shutdown")

SignalHandler = Callable[[int, FrameType | None], Any]
HANDLED = (signal.SIGINT, signal.SIGTERM)


class SignalDrain:
    def __init__(self, drain: Callable[[], Awaitable[None]]) -> None:
        self._drain = drain
        self._saved: dict[int, SignalHandler] = {}
        self._installed: dict[int, SignalHandler] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._task: asyncio.Task[None] | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._loop = asyncio.get_running_loop()
        for sig in HANDLED:
            previous = signal.getsignal(sig)
            if not callable(previous) or previous is signal.default_int_handler:
                continue  # no server handler to defer to: leave the default behaviour
            self._saved[sig] = previous
            handler = self._make_handler(previous)
            self._installed[sig] = handler
            signal.signal(sig, handler)

    def _make_handler(self, previous: SignalHandler) -> SignalHandler:
        def handler(sig: int, frame: FrameType | None) -> None:
            if self._draining or self._loop is None or self._loop.is_closed():
                previous(sig, frame)
                return
            self._draining = True
            self._loop.call_soon_threadsafe(self._start, previous, sig)

        return handler

    def _start(self, previous: SignalHandler, sig: int) -> None:
        self._task = asyncio.ensure_future(self._drain_then(previous, sig))

    async def _drain_then(self, previous: SignalHandler, sig: int) -> None:
        logger.info("signal %s: draining connections before shutdown", signal.Signals(sig).name)
        try:
            await self._drain()
        except Exception:
            logger.exception("drain failed")
        finally:
            previous(sig, None)

    def restore(self) -> None:
        for sig, handler in self._installed.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, self._saved[sig])
        self._installed.clear()
        self._saved.clear()
