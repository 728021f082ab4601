"""Channel bookkeeping shared by both transports: which channels are wanted, the last
offset processed on each, and delivery into subscriptions.

Exactly once, in order: a message is delivered only if its offset follows the last one
processed on its channel (:meth:`Offset.follows`), and the last offset is what the next
connection resumes from (WebSocket ``since``, SSE ``Last-Event-ID``). Messages already
queued in a subscription survive reconnects, so resuming from the last *queued* offset
loses nothing.

Subscriptions are held weakly: one that the caller dropped (left its ``async for``
without closing it) is forgotten by the garbage collector and its channels are
unsubscribed, instead of filling its queue forever.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from ._errors import HeraldError
from ._models import Message, Offset, Recovery

if TYPE_CHECKING:
    from .client import Subscription

logger = logging.getLogger("herald.client")

RecoveryHandler = Callable[[Recovery], Awaitable[None] | None]


class _Channel:
    __slots__ = ("confirmed", "last", "subs")

    def __init__(self, last: Offset | None) -> None:
        self.last = last
        self.confirmed = False  # the hub acknowledged a subscription (at least once)
        self.subs: dict[int, weakref.ref[Subscription]] = {}


class Router:
    """Channels -> subscriptions, with the per-channel resume offsets."""

    def __init__(self, on_recovery: RecoveryHandler | None = None) -> None:
        self._channels: dict[str, _Channel] = {}
        self._on_recovery = on_recovery
        self.changed = asyncio.Event()  # the wanted channel set changed
        self.progress = asyncio.Event()  # a channel was confirmed or a subscription failed

    # -- membership -------------------------------------------------------------------------

    def add(self, sub: Subscription, since: dict[str, Offset]) -> None:
        key = id(sub)
        ref = weakref.ref(sub, lambda _ref: self._forget(key))
        for channel in sub.channels:
            state = self._channels.get(channel)
            if state is None:
                state = self._channels[channel] = _Channel(since.get(channel))
                self.changed.set()
            state.subs[key] = ref

    def remove(self, sub: Subscription) -> None:
        self._forget(id(sub))

    def _forget(self, key: int) -> None:
        for channel in [ch for ch, state in self._channels.items() if key in state.subs]:
            state = self._channels[channel]
            del state.subs[key]
            if not state.subs:
                # A later subscription to this channel starts fresh, not from here.
                del self._channels[channel]
                self.changed.set()

    def wanted(self) -> list[str]:
        """The channels some live subscription wants, sorted."""
        return sorted(self._channels)

    def confirmed(self, channel: str) -> bool:
        state = self._channels.get(channel)
        return state is not None and state.confirmed

    def last(self, channel: str) -> Offset | None:
        state = self._channels.get(channel)
        return None if state is None else state.last

    def offsets(self) -> dict[str, str]:
        """The last offset processed per channel (to persist, and pass back as ``since``)."""
        return {ch: str(st.last) for ch, st in self._channels.items() if st.last is not None}

    def _subs(self, channel: str) -> list[Subscription]:
        state = self._channels.get(channel)
        if state is None:
            return []
        return [sub for ref in list(state.subs.values()) if (sub := ref()) is not None]

    # -- server events ----------------------------------------------------------------------

    def subscribed(
        self, channel: str, offset: str, recovered: bool | None, since: Offset | None
    ) -> Recovery | None:
        """The server confirmed ``channel`` at ``offset`` (its top). With a ``since`` that
        was recovered, the missed messages follow and the last offset stays; without
        one, delivery starts after ``offset``; an unrecovered ``since`` is a
        :class:`Recovery` the caller must hear about."""
        state = self._channels.get(channel)
        if state is None:
            return None
        state.confirmed = True
        self.progress.set()
        try:
            top = Offset.parse(offset)
        except ValueError:
            logger.warning("ignoring malformed offset %r for %s", offset, channel)
            return None
        if since is None:
            if state.last is None or top.epoch != state.last.epoch or top.seq > state.last.seq:
                state.last = top
            return None
        if recovered:
            return None
        state.last = top
        return Recovery(channel, str(since), offset)

    async def recover(self, recovery: Recovery) -> None:
        """Tell the subscriptions of the channel (and the client's handler) about it."""
        handlers: list[RecoveryHandler] = [
            sub.on_recovery for sub in self._subs(recovery.channel) if sub.on_recovery
        ]
        if self._on_recovery is not None:
            handlers.append(self._on_recovery)
        if not handlers:
            logger.warning(
                "messages on %s after %s were lost (history no longer holds them); "
                "pass on_recovery= to refetch",
                recovery.channel,
                recovery.since,
            )
        for handler in handlers:
            try:
                result = handler(recovery)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("on_recovery handler failed")

    async def deliver(self, message: Message) -> bool:
        """Queue ``message`` in every subscription of its channel, unless it is a
        duplicate. Waits while a subscription's queue is full (backpressure)."""
        state = self._channels.get(message.channel)
        if state is None:
            return False
        position = Offset.parse(message.offset)
        if not position.follows(state.last):
            return False
        subs = self._subs(message.channel)
        for sub in subs:
            await sub._put(message)
        state.last = position
        return True

    def fail(self, error: HeraldError, channels: Iterable[str] | None = None) -> None:
        """End the subscriptions of ``channels`` (all when None) with ``error``."""
        names = list(self._channels) if channels is None else list(channels)
        for channel in names:
            for sub in self._subs(channel):
                sub._fail(error)
                self.remove(sub)
        self.progress.set()

    def end_all(self) -> None:
        """The client closed: every subscription's iteration ends."""
        for channel in list(self._channels):
            for sub in self._subs(channel):
                sub._end()
        self._channels.clear()
        self.changed.set()
        self.progress.set()
