"""The Broker interface. The delivery contract is documented here and only here.

A broker carries everything that must be shared between workers: fan-out of
publications, per-channel history and offsets, control commands (such as
"disconnect user X"), per-user token revocation and rate-limit counters.
Backends: :class:`hub.broker.memory.MemoryBroker` (one process) and
:class:`hub.broker.redis.RedisBroker` (any number of workers and hosts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..protocol import Publication, StreamPosition


class BrokerUnavailable(Exception):
    """The backend cannot be reached right now; the operation may succeed later."""


@dataclass(frozen=True, slots=True)
class HistoryResult:
    """What :meth:`Broker.history` found.

    ``publications`` are in offset order. ``position`` is the channel's current top
    (offset of the latest publication and the epoch). ``recovered`` is true when
    ``publications`` holds *every* publication after ``since`` (no gap); when it is
    false (epoch changed, or ``since`` is older than what history retains),
    ``publications`` is empty and the client must refetch its state.
    """

    publications: list[Publication]
    position: StreamPosition
    recovered: bool


@dataclass(frozen=True, slots=True)
class RateLimitResult:
    allowed: bool
    limit: int
    remaining: int
    retry_after: float  # seconds until one more request would be allowed (0 if allowed)
    reset_after: float  # seconds until the bucket is full again


@dataclass(frozen=True, slots=True)
class PublishRequest:
    channel: str
    event: str
    data: bytes  # JSON, encoded once by the publisher


class BrokerHandler(Protocol):
    """What a broker calls back into (the Hub). Callbacks must not block or await."""

    def on_publication(self, publication: Publication) -> None:
        """A publication on a channel this process subscribed to.

        Called from the broker's single reader, in publish order per channel.
        """

    def on_control(self, command: dict[str, Any]) -> None:
        """A control command sent by any process with :meth:`Broker.send_control`."""

    def on_broker_state(self, connected: bool) -> None:
        """The backend connection was lost (``False``) or re-established and every
        subscription restored (``True``). Publications in between were not delivered
        live; they are still in history."""


@runtime_checkable
class Broker(Protocol):
    """Fan-out, history and shared state for the hub.

    Delivery guarantee: a publication is delivered at most once, live, to every
    process subscribed to its channel at the moment it is published, in publish order
    per channel. Every publication is appended to the channel's history (bounded by
    ``history_size`` entries and ``history_ttl`` seconds) *in the same atomic step* as
    its fan-out, and carries its offset: a subscriber never sees a publication that
    history lacks, and can recover anything it missed while history retains it.
    Offsets grow by exactly one per publication within an epoch; a new epoch (random
    string) means history was lost and offsets restarted from 1.
    """

    @property
    def connected(self) -> bool:
        """Whether the backend connection is currently up."""

    async def start(self, handler: BrokerHandler) -> None:
        """Connect and start delivering to ``handler``. Subscribes to the control channel.
        Raises :class:`BrokerUnavailable` if the backend cannot be reached at all."""

    async def aclose(self) -> None:
        """Stop the reader and close connections. Idempotent."""

    async def subscribe(self, channels: Sequence[str]) -> None:
        """Start receiving ``channels``. Returns once the subscription is active, so any
        publication made after it returns is delivered. Idempotent per channel (the
        caller reference-counts). Raises :class:`BrokerUnavailable` when disconnected;
        the broker still remembers the channel and subscribes it on reconnect."""

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        """Stop receiving ``channels``. Never raises for a lost connection."""

    async def publish(self, channel: str, event: str, data: bytes) -> Publication:
        """Append to history and fan out, atomically. Returns the publication with its
        offset. Raises :class:`BrokerUnavailable` (the message was not published)."""

    async def publish_batch(self, requests: Sequence[PublishRequest]) -> list[Publication]:
        """Publish several messages in one round trip, in order; each one atomically as
        :meth:`publish`. Returns the publications in request order."""

    async def history(
        self, channel: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> HistoryResult:
        """Publications after ``since`` (all retained ones when ``since`` is None), at most
        ``limit`` of them (oldest first). See :class:`HistoryResult` for ``recovered``;
        with ``since=None`` it is always true."""

    async def position(self, channel: str) -> StreamPosition:
        """The channel's current top: last offset (0 if none) and epoch."""

    async def reset_epoch_if_behind(self, channel: str, seen: StreamPosition) -> bool:
        """If the channel's top is *behind* ``seen`` in the same epoch, Redis lost writes
        this process saw (a crash under ``appendfsync everysec``, a failover to a lagging
        replica): give the channel a new epoch, so every position of the old one answers
        ``recovered: false`` instead of being confused with the offsets reused next.
        True if it did. Only for positions the hub itself saw, never a client's claim."""

    async def send_control(self, command: dict[str, Any]) -> None:
        """Deliver a JSON-able command to every process's handler, this one included."""

    async def check_delivery(self, timeout: float) -> bool:
        """Prove that live delivery works end to end: a canary publication must come
        back through this process's own subscription within ``timeout`` seconds."""

    async def set_user_not_before(self, user_id: str, timestamp: float, ttl: int) -> None:
        """Tokens of ``user_id`` issued before ``timestamp`` are revoked (for ``ttl`` s).

        The time only moves forward: an earlier ``timestamp`` than the one set keeps the
        later one (a late revocation never shortens a newer one); the TTL only grows."""

    async def get_user_not_before(self, user_id: str) -> float | None:
        """The revocation timestamp set for ``user_id``, if any."""

    async def rate_limit(self, key: str, *, rate: float, burst: int) -> RateLimitResult:
        """Take one token from the bucket ``key`` (shared by all processes): ``rate``
        tokens per second, at most ``burst`` stored (GCRA)."""

    async def presence_update(self, updates: Mapping[str, Mapping[str, str]], ttl: int) -> None:
        """Mark clients present, in one round trip: ``updates[channel][client_id] =
        user_id``. Each entry expires ``ttl`` seconds from now unless updated again, so
        the entries of a process that died vanish by themselves."""

    async def presence_remove(self, channel: str, client_ids: Sequence[str]) -> None:
        """Remove clients from a channel's presence (they left). Never fails loudly for
        unknown ids."""

    async def presence(self, channel: str) -> dict[str, str]:
        """The live presence of ``channel``: client id -> user id, expired entries
        excluded (and cleaned up)."""

    async def claim_connection_slots(
        self, claims: Sequence[tuple[str, str]], limit: int, ttl: int
    ) -> list[bool]:
        """For each ``(user_id, slot)``, in order and in one round trip: take one of
        ``user_id``'s ``limit`` connection slots (shared by all processes), held ``ttl``
        seconds unless refreshed. False where all are held by other live slots; claiming
        a slot already held just refreshes it."""

    async def refresh_connection_slots(self, slots: Mapping[str, Sequence[str]], ttl: int) -> None:
        """Hold ``slots[user_id]`` for another ``ttl`` seconds (re-adding any a Redis
        restart lost), in one round trip. The slots of a process that died expire."""

    async def release_connection_slots(self, slots: Mapping[str, Sequence[str]]) -> None:
        """Free ``slots[user_id]`` (their connections ended), in one round trip."""
