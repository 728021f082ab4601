"""Flusher: writes every connection that has something queued, once per loop iteration.

On the raw write paths (``herald.raw_frames`` for WebSockets, ``herald.raw_body`` for
SSE) a write never waits for the client: it hands bytes to the transport, which buffers
what the kernel does not take. So no task per connection is needed to write. Instead,
:meth:`hub.connection.Connection._push` marks the connection and the flusher, scheduled
once with ``call_soon`` for however many connections were marked, calls each one's
drain in the next loop iteration.

Why deferred and not written in ``enqueue``: the broker hands over every publication
of one socket read in one callback, and replies, replays and heartbeats are queued in
bursts too. Waiting for the end of the iteration turns each burst into one write (and
one syscall) per connection, and keeps the fan-out loop itself free of I/O.

Compared with a writer task per connection this removes, per delivery, a Future, a
task wake-up and a coroutine resume (most of the fan-out cost), and per idle
connection, a task and its coroutine frame.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

logger = logging.getLogger("herald.flusher")


class Flushable(Protocol):
    def flush(self) -> None: ...


class Flusher:
    """One per worker (owned by the :class:`~hub.hub.Hub`, so by the app's lifespan)."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: list[Flushable] = []

    def schedule(self, item: Flushable) -> None:
        """Flush ``item`` in the next loop iteration (the caller avoids duplicates)."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._run)
        self._pending.append(item)

    def _run(self) -> None:
        pending = self._pending
        self._pending = []
        for item in pending:
            try:
                item.flush()
            except Exception:  # one broken connection must not stall the others
                logger.exception("flushing %r failed", item)
