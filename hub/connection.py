"""Connection: one subscriber's bounded outbox, drained by exactly one writer.

The fan-out path only calls :meth:`Connection.enqueue_message`, which never awaits:
it appends to a deque and wakes the writer. The writer is either a *drain* (a plain
function of a raw write path, attached with :meth:`Connection.attach_drain` and run by
the worker's :class:`~hub.flusher.Flusher` once per loop iteration), or a writer task
of the portable ASGI path awaiting :meth:`Connection.next_batch`. When the
outbox passes its count or byte limit the connection is closed with ``slow_consumer``
and its outbox dropped, so a slow client costs the others nothing
(``docs/architecture.md``).

The writer side allocates as little as possible per wake-up (one Future, no timers):
with thousands of writers, every per-wait ``asyncio.timeout`` or ``Event`` becomes
garbage that survives long enough to trigger full GC passes. Heartbeats and stuck
writes are handled by one sweep per worker (:meth:`hub.hub.Hub.sweep`) instead.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from . import errors
from .auth import Principal
from .errors import Disconnect
from .protocol import EncodedMessage, Publication, StreamPosition

if TYPE_CHECKING:
    from .flusher import Flusher

Outbound = EncodedMessage | bytes
TransportKind = Literal["websocket", "sse"]

_ids = itertools.count(1)


class Connection:
    """State of one live WebSocket or SSE connection on this worker."""

    __slots__ = (
        "__weakref__",
        "_bytes",
        "_closed_waiters",
        "_drain",
        "_expiry_timer",
        "_floors",
        "_flush_pending",
        "_flusher",
        "_loop",
        "_on_overflow",
        "_outbox",
        "_recovering",
        "_waiter",
        "channels",
        "closed",
        "heartbeat",
        "id",
        "leaves_cycles",
        "last_write",
        "max_bytes",
        "max_messages",
        "positions",
        "principal",
        "send_started",
        "transport",
        "writer_task",
    )

    def __init__(
        self,
        principal: Principal,
        transport: TransportKind,
        *,
        max_messages: int,
        max_bytes: int,
        on_overflow: Callable[[Connection, int], None] | None = None,
    ) -> None:
        self.id = next(_ids)
        self.principal = principal
        self.transport: TransportKind = transport
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.channels: set[str] = set()
        # Last position written per channel (kept for SSE cursors and resume).
        self.positions: dict[str, StreamPosition] = {}
        self.closed: Disconnect | None = None
        # A list, not a deque: it is only appended to and taken whole, and an empty
        # deque costs ~600 bytes per idle connection against a list's 56.
        self._outbox: list[Outbound] = []
        self._bytes = 0
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._closed_waiters: list[asyncio.Future[None]] | None = None
        # monotonic time of the last write, and of the start of a write still in progress
        # (0 when none): read by the hub's sweep for heartbeats and stuck writers.
        self.last_write = time.monotonic()
        self.send_started = 0.0
        self.writer_task: asyncio.Task[None] | None = None
        # What the sweep queues when the connection was idle for a heartbeat interval
        # (None: the transport sends its own heartbeats).
        self.heartbeat: bytes | None = None
        self._drain: Callable[[], None] | None = None
        self._flusher: Flusher | None = None
        self._flush_pending = False
        # Whether closing leaves objects in reference cycles (uvicorn's and websockets'
        # protocol state does, unless herald's raw protocols break them): read by the
        # GC policy, which must then thaw now and then (hub/gc_tuning.py).
        self.leaves_cycles = True
        self._recovering: dict[str, list[EncodedMessage]] = {}
        # Per channel, the position queued when its subscription became live: live
        # publications at or below it (still in flight when the subscribe read the top,
        # or already replayed) are dropped, once; the entry goes at the first newer one.
        self._floors: dict[str, StreamPosition] = {}
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._on_overflow = on_overflow

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.transport} sub={self.principal.subject!r}>"

    @property
    def user_id(self) -> str | None:
        return self.principal.subject if self.principal.kind == "user" else None

    @property
    def direct(self) -> bool:
        """Whether a raw write path drains this connection (no writer task)."""
        return self._drain is not None

    @property
    def outbox_size(self) -> int:
        return len(self._outbox)

    # -- fan-out side (never awaits) ---------------------------------------------------------

    def enqueue_message(self, message: EncodedMessage) -> None:
        if self.closed is not None:
            return
        pending = self._recovering.get(message.publication.channel)
        if pending is not None:
            pending.append(message)
            return
        if self._floors:
            pub = message.publication
            floor = self._floors.get(pub.channel)
            if floor is not None:
                if pub.epoch == floor.epoch and pub.offset <= floor.offset:
                    return
                del self._floors[pub.channel]
        self._push(message, len(message.envelope))

    def enqueue_control(self, frame: bytes) -> None:
        if self.closed is None:
            self._push(frame, len(frame))

    def _push(self, item: Outbound, size: int) -> None:
        outbox = self._outbox
        outbox.append(item)
        self._bytes += size
        if len(outbox) > self.max_messages or self._bytes > self.max_bytes:
            self._overflow()
            return
        self._wake()

    def _wake(self) -> None:
        if self._flusher is not None:
            if not self._flush_pending:
                self._flush_pending = True
                self._flusher.schedule(self)
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _overflow(self) -> None:
        dropped = len(self._outbox)
        self.close(errors.SLOW_CONSUMER)
        if self._on_overflow is not None:
            self._on_overflow(self, dropped)

    def close(self, disconnect: Disconnect) -> None:
        """Mark the connection closed; the writer sends the goodbye and stops."""
        if self.closed is not None:
            return
        self.closed = disconnect
        self._outbox.clear()
        self._bytes = 0
        self._recovering.clear()
        self.cancel_expiry()
        self._wake()
        for waiter in self._closed_waiters or ():
            if not waiter.done():
                waiter.set_result(None)
        self._closed_waiters = None

    async def wait_closed(self) -> None:
        if self.closed is not None:
            return
        waiter = self._loop.create_future()
        if self._closed_waiters is None:
            self._closed_waiters = []
        self._closed_waiters.append(waiter)
        await waiter

    # -- recovery: buffer live messages of a channel while its history is read -----------

    def begin_recovery(self, channel: str) -> None:
        self._recovering[channel] = []

    def finish_recovery(
        self,
        channel: str,
        replay: list[Publication],
        after: StreamPosition | None,
        head: bytes | None = None,
    ) -> StreamPosition | None:
        """Queue ``head`` (the subscribe reply), then ``replay``, then the live messages
        buffered meanwhile, skipping any offset at or below what was already queued (no
        gap, no duplicate). Returns the position of the last queued message, or
        ``after`` if none."""
        from .protocol import encode_message

        buffered = self._recovering.pop(channel, [])
        if self.closed is not None:
            return after
        if head is not None:
            self._outbox.append(head)
            self._bytes += len(head)
        last = after
        # Replay may exceed the live limits (history is bounded on its own); the writer
        # drains it in large batches.
        for pub in replay:
            self._outbox.append(encode_message(pub))
            last = pub.position
        self._wake()
        for message in buffered:
            pub = message.publication
            if last is not None and pub.epoch == last.epoch and pub.offset <= last.offset:
                continue
            self._push(message, len(message.envelope))
            last = message.position
        if last is not None:
            self._floors[channel] = last
        return last

    def abort_recovery(self, channel: str) -> None:
        self._recovering.pop(channel, None)

    # -- token expiry -----------------------------------------------------------------------

    def schedule_expiry(self, expires_at: float | None, now: float) -> None:
        """Close with ``token_expired`` at ``expires_at`` (epoch seconds) unless refreshed."""
        self.cancel_expiry()
        if expires_at is None:
            return
        self._expiry_timer = self._loop.call_later(
            max(0.0, expires_at - now), self.close, errors.TOKEN_EXPIRED_DISCONNECT
        )

    def cancel_expiry(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None

    # -- writer side: a drain run by the flusher (raw write paths) ------------------------

    def attach_drain(self, drain: Callable[[], None], flusher: Flusher) -> None:
        """From now on, ``drain()`` runs in the loop iteration after anything is queued
        (and after :meth:`close`); it takes the outbox with :meth:`take_batch`. What was
        queued before is flushed in the next iteration. (Only herald's raw protocols
        offer a drain-able transport, and they leave no reference cycles behind.)"""
        self.leaves_cycles = False
        self._drain = drain
        self._flusher = flusher
        self._flush_pending = False
        if self._outbox or self.closed is not None:
            self._wake()

    def flush(self) -> None:
        """Called by the flusher: run the drain once."""
        self._flush_pending = False
        drain = self._drain
        if drain is not None:
            drain()

    def detach_drain(self) -> None:
        """The transport is done writing: later wake-ups do nothing (and the connection
        no longer refers to its writer, so no reference cycle outlives it)."""
        self._drain = None

    def take_batch(self) -> list[Outbound] | None:
        """Everything queued, oldest first (empty if nothing), or ``None`` once closed."""
        if self.closed is not None:
            return None
        if not self._outbox:
            return []
        batch = self._outbox
        self._outbox = []
        self._bytes = 0
        return batch

    # -- writer side: a writer task (the portable ASGI path) ------------------------------

    async def next_batch(self, timeout: float | None = None) -> list[Outbound] | None:
        """Everything queued (the writer sends it in one write), oldest first.

        Waits while nothing is queued: until something is, until the connection is
        closed (then ``None``), or until ``timeout`` seconds passed (then an empty
        list). Writers normally pass no timeout: the hub's sweep queues heartbeats.
        """
        if not self._outbox and self.closed is None:
            waiter = self._waiter = self._loop.create_future()
            timer = None if timeout is None else self._loop.call_later(timeout, self._wake)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        return self.take_batch()
