"""Typed values of the client: messages, recovery notices, offsets, publish results,
and the reconnect backoff policy."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

__all__ = ["Backoff", "Message", "Offset", "PublishResult", "Recovery"]


@dataclass(frozen=True, slots=True, order=True)
class Offset:
    """A parsed ``"<seq>:<epoch>"`` offset. ``seq`` grows by one per message on a channel
    within an ``epoch``; a new epoch means the channel's history was lost."""

    seq: int
    epoch: str

    @classmethod
    def parse(cls, token: str) -> Offset:
        """Parse an offset token; raises :class:`ValueError` when it is malformed."""
        seq, sep, epoch = token.partition(":")
        if not sep or not seq.isdigit() or not epoch:
            raise ValueError(f"malformed offset {token[:64]!r} (expected '<seq>:<epoch>')")
        return cls(int(seq), epoch)

    def __str__(self) -> str:
        return f"{self.seq}:{self.epoch}"

    def follows(self, previous: Offset | None) -> bool:
        """Whether a message at this offset is new after ``previous`` (the last one
        processed): later in the same epoch, or in a different epoch altogether."""
        return previous is None or self.epoch != previous.epoch or self.seq > previous.seq


@dataclass(frozen=True, slots=True)
class Message:
    """One message published on ``channel``.

    ``data`` is exactly the JSON value that was published; ``offset`` is the opaque
    token to resume after this message (``since``); ``ts`` is the publish time in
    milliseconds since the Unix epoch.
    """

    channel: str
    event: str
    data: Any
    offset: str
    ts: int

    @property
    def position(self) -> Offset:
        """:attr:`offset`, parsed."""
        return Offset.parse(self.offset)

    def to_json(self) -> dict[str, Any]:
        """The message as a JSON-able dict (what ``herald subscribe`` prints)."""
        return {
            "channel": self.channel,
            "event": self.event,
            "data": self.data,
            "offset": self.offset,
            "ts": self.ts,
        }


@dataclass(frozen=True, slots=True)
class Recovery:
    """A resume that could not recover every missed message.

    After a reconnect the client asks the hub for everything after ``since`` on
    ``channel``. When history no longer holds it (too old, or the history was lost and
    the epoch changed), nothing is replayed and this notice is given instead: messages
    were lost, so refetch the state this channel describes. ``offset`` is where the
    channel stands now; delivery continues from there.
    """

    channel: str
    since: str | None
    offset: str


@dataclass(frozen=True, slots=True)
class PublishResult:
    """Where a published message landed: its channel, offset (``since`` token),
    sequence number, epoch and publish time (ms)."""

    channel: str
    offset: str
    seq: int
    epoch: str
    ts: int

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PublishResult:
        return cls(
            channel=str(obj["channel"]),
            offset=str(obj["offset"]),
            seq=int(obj["seq"]),
            epoch=str(obj["epoch"]),
            ts=int(obj["ts"]),
        )


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter between reconnect attempts.

    Attempt ``n`` (from 0) waits a random time in ``[d * (1 - jitter), d]`` with
    ``d = min(maximum, initial * factor**n)``: clients dropped together (a worker
    restart) spread their reconnects instead of arriving as one wave.
    """

    initial: float = 0.25
    maximum: float = 15.0
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.factor < 1:
            raise ValueError("need 0 < initial <= maximum and factor >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnect attempt ``attempt`` (0 = the first retry)."""
        ceiling = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return ceiling * (1.0 - self.jitter * random.random())
