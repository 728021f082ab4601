"""MemoryBroker: the embedded default, for one process. See :class:`hub.broker.base.Broker`."""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from ..protocol import Publication, StreamPosition
from .base import Broker, BrokerHandler, HistoryResult, PublishRequest, RateLimitResult

if TYPE_CHECKING:
    from . import BrokerConfig


@dataclass(slots=True)
class _ChannelStream:
    epoch: str
    offset: int = 0
    entries: deque[tuple[float, Publication]] = field(default_factory=deque)


class MemoryBroker:
    """Everything in this process: history in bounded deques, fan-out by direct call."""

    def __init__(self, config: BrokerConfig) -> None:
        self._config = config
        self._handler: BrokerHandler | None = None
        self._streams: dict[str, _ChannelStream] = {}
        self._subscribed: set[str] = set()
        self._not_before: dict[str, tuple[float, float]] = {}
        self._buckets: dict[str, float] = {}  # GCRA theoretical arrival times
        # channel -> client id -> (user id, expires at, monotonic)
        self._presence: dict[str, dict[str, tuple[str, float]]] = {}
        # user id -> connection slot -> expiry (monotonic)
        self._slots: dict[str, dict[str, float]] = {}
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._handler is not None and not self._closed

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler
        self._closed = False

    async def aclose(self) -> None:
        self._closed = True
        self._subscribed.clear()

    async def subscribe(self, channels: Sequence[str]) -> None:
        self._subscribed.update(channels)

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        self._subscribed.difference_update(channels)

    def _stream(self, channel: str) -> _ChannelStream:
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _ChannelStream(epoch=secrets.token_hex(4))
        return stream

    def _trim(self, channel: str, stream: _ChannelStream, now: float) -> None:
        size, ttl = self._config.history_limits(channel)
        entries = stream.entries
        while len(entries) > size:
            entries.popleft()
        horizon = now - ttl
        while entries and entries[0][0] < horizon:
            entries.popleft()

    def _publish_now(self, channel: str, event: str, data: bytes) -> Publication:
        now = time.time()
        stream = self._stream(channel)
        stream.offset += 1
        pub = Publication(channel, stream.offset, stream.epoch, event, data, int(now * 1000))
        if self._config.history_limits(channel)[0] > 0:
            stream.entries.append((now, pub))
            self._trim(channel, stream, now)
        if channel in self._subscribed and self._handler is not None and not self._closed:
            self._handler.on_publication(pub)
        return pub

    async def publish(self, channel: str, event: str, data: bytes) -> Publication:
        return self._publish_now(channel, event, data)

    async def publish_batch(self, requests: Sequence[PublishRequest]) -> list[Publication]:
        return [self._publish_now(r.channel, r.event, r.data) for r in requests]

    async def history(
        self, channel: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> HistoryResult:
        stream = self._stream(channel)
        self._trim(channel, stream, time.time())
        top = StreamPosition(stream.offset, stream.epoch)
        retained = [pub for _, pub in stream.entries]
        if since is not None:
            first_retained = retained[0].offset if retained else stream.offset + 1
            if (
                since.epoch != stream.epoch
                or since.offset > stream.offset
                or since.offset + 1 < first_retained
            ):
                return HistoryResult([], top, recovered=False)
            retained = [pub for pub in retained if pub.offset > since.offset]
        if limit is not None:
            retained = retained[: max(limit, 0)]
        return HistoryResult(retained, top, recovered=True)

    async def position(self, channel: str) -> StreamPosition:
        stream = self._stream(channel)
        return StreamPosition(stream.offset, stream.epoch)

    async def reset_epoch_if_behind(self, channel: str, seen: StreamPosition) -> bool:
        stream = self._stream(channel)
        if stream.epoch != seen.epoch or stream.offset >= seen.offset:
            return False
        stream.epoch = secrets.token_hex(4)
        return True

    async def send_control(self, command: dict[str, Any]) -> None:
        # Round-trip through JSON so both backends hand the same shapes to the handler.
        decoded = orjson.loads(orjson.dumps(command))
        if self._handler is not None and not self._closed:
            self._handler.on_control(decoded)

    async def check_delivery(self, timeout: float) -> bool:
        await asyncio.sleep(0)
        return self.connected

    async def set_user_not_before(self, user_id: str, timestamp: float, ttl: int) -> None:
        if ttl <= 0:
            self._not_before.pop(user_id, None)
            return
        expires = time.monotonic() + ttl
        current = self._not_before.get(user_id)
        if current is not None and current[1] >= time.monotonic():
            timestamp = max(timestamp, current[0])
            expires = max(expires, current[1])
        self._not_before[user_id] = (timestamp, expires)

    async def get_user_not_before(self, user_id: str) -> float | None:
        entry = self._not_before.get(user_id)
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            del self._not_before[user_id]
            return None
        return entry[0]

    async def rate_limit(self, key: str, *, rate: float, burst: int) -> RateLimitResult:
        now = time.monotonic()
        interval = 1.0 / rate
        tolerance = interval * (burst - 1)
        tat = max(self._buckets.get(key, now), now)
        allow_at = tat - tolerance
        if now < allow_at:
            retry_after = allow_at - now
            return RateLimitResult(False, burst, 0, retry_after, tat - now)
        new_tat = tat + interval
        self._buckets[key] = new_tat
        if len(self._buckets) > 100_000:  # drop buckets that are full again
            for stale in [k for k, v in self._buckets.items() if v <= now]:
                del self._buckets[stale]
        # The epsilon absorbs binary rounding (1/3 s intervals), as the Lua script's
        # integer microseconds do.
        remaining = max(0, math.floor((tolerance - (new_tat - now)) / interval + 1e-9) + 1)
        return RateLimitResult(True, burst, remaining, 0.0, new_tat - now)

    async def presence_update(self, updates: Mapping[str, Mapping[str, str]], ttl: int) -> None:
        expires = time.monotonic() + ttl
        for channel, members in updates.items():
            entries = self._presence.setdefault(channel, {})
            for client, user in members.items():
                entries[client] = (user, expires)

    async def presence_remove(self, channel: str, client_ids: Sequence[str]) -> None:
        entries = self._presence.get(channel)
        if entries is None:
            return
        for client in client_ids:
            entries.pop(client, None)
        if not entries:
            del self._presence[channel]

    async def presence(self, channel: str) -> dict[str, str]:
        entries = self._presence.get(channel)
        if not entries:
            return {}
        now = time.monotonic()
        for client in [c for c, (_, exp) in entries.items() if exp <= now]:
            del entries[client]
        return {client: user for client, (user, _) in entries.items()}

    async def claim_connection_slots(
        self, claims: Sequence[tuple[str, str]], limit: int, ttl: int
    ) -> list[bool]:
        return [self._claim_slot(user_id, slot, limit, ttl) for user_id, slot in claims]

    def _claim_slot(self, user_id: str, slot: str, limit: int, ttl: int) -> bool:
        now = time.monotonic()
        held = self._slots.setdefault(user_id, {})
        for expired in [s for s, expires in held.items() if expires <= now]:
            del held[expired]
        if slot not in held and len(held) >= limit:
            return False
        held[slot] = now + ttl
        return True

    async def refresh_connection_slots(self, slots: Mapping[str, Sequence[str]], ttl: int) -> None:
        expires = time.monotonic() + ttl
        for user_id, ids in slots.items():
            held = self._slots.setdefault(user_id, {})
            for slot in ids:
                held[slot] = expires

    async def release_connection_slots(self, slots: Mapping[str, Sequence[str]]) -> None:
        for user_id, ids in slots.items():
            held = self._slots.get(user_id)
            if held is None:
                continue
            for slot in ids:
                held.pop(slot, None)
            if not held:
                del self._slots[user_id]


_conforms: type[Broker] = MemoryBroker
