"""``HeraldPublisher``: publish from a backend service straight into the hub's Redis.

::

    from hub import HeraldPublisher

    async with HeraldPublisher("redis://localhost:6379/0", prefix="herald") as pub:
        await pub.publish("user:42", "order.shipped", {"id": 7})

Like socket.io's redis-emitter: no HTTP hop, no hub process in the path. It is a thin
wrapper over :class:`hub.broker.redis.RedisBroker`'s publish path — the same Lua script
the hub runs (offset ``HINCRBY``, history ``XADD``, ``PUBLISH`` in one atomic step) — so
subscribers cannot tell its messages from an HTTP publish: same offsets, same history,
same resume. Publishing needs only the broker's command pool: the pub/sub reader is
never started.

It lives in ``hub`` (not in the dependency-free ``clients`` package) because it *is*
server code: it must share the broker's script and key layout, byte for byte.

Keep ``prefix``, ``history_size`` and ``history_ttl`` equal to the hub's
``HERALD_REDIS_PREFIX``, ``HERALD_HISTORY_SIZE`` and ``HERALD_HISTORY_TTL``
(:meth:`HeraldPublisher.from_settings` reads them from the same environment). There is
no channel policy here: whoever can write to Redis can publish anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from . import errors
from .broker import BrokerConfig, BrokerUnavailable, PublishRequest
from .broker.redis import RedisBroker
from .errors import HubError
from .policy import validate_channel
from .protocol import Publication, encode_data, validate_event_name
from .settings import Settings

__all__ = ["HeraldPublisher", "PublishResult"]


@dataclass(frozen=True, slots=True)
class PublishResult:
    """Where a message landed; the same fields as the HTTP publish API's answer."""

    channel: str
    offset: str  # "<seq>:<epoch>", usable as a subscriber's ``since``
    seq: int
    epoch: str
    ts: int  # publish time, milliseconds since the Unix epoch

    @classmethod
    def of(cls, pub: Publication) -> PublishResult:
        return cls(pub.channel, pub.position.token(), pub.offset, pub.epoch, pub.ts)


class HeraldPublisher:
    """Publishes into the hub's Redis with the hub's own atomic publish step.

    Channel and event names are validated as the hub validates them; ``data`` is any
    JSON-able value, at most ``max_message_bytes`` encoded. Errors are
    :class:`hub.errors.HubError` (``bad_channel``, ``bad_request``,
    ``message_too_large``, and ``unavailable`` when Redis cannot be reached: the
    message was then not published). A timed-out publish may have been applied.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        prefix: str = "herald",
        history_size: int = 1000,
        history_ttl: int = 24 * 3600,
        max_message_bytes: int = 64 * 1024,
        redis_tuning: dict[str, Any] | None = None,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self._broker = RedisBroker(
            BrokerConfig(
                url=redis_url,
                prefix=prefix,
                history_size=history_size,
                history_ttl=history_ttl,
                **(redis_tuning or {}),
            )
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> HeraldPublisher:
        """A publisher configured like the hub (``HERALD_REDIS_URL`` and friends)."""
        if settings.redis_url is None:
            raise ValueError(
                "HERALD_REDIS_URL is not set: in embedded mode only the hub process can "
                "publish (use the HTTP publish API)"
            )
        return cls(
            settings.redis_url,
            prefix=settings.redis_prefix,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            max_message_bytes=settings.max_message_bytes,
            redis_tuning=settings.redis_tuning(),
        )

    async def __aenter__(self) -> HeraldPublisher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the Redis connections. Idempotent."""
        await self._broker.aclose()

    def _request(self, channel: str, event: str, data: Any) -> PublishRequest:
        encoded = encode_data(data)
        if len(encoded) > self.max_message_bytes:
            raise HubError(
                errors.MESSAGE_TOO_LARGE,
                f"data is {len(encoded)} bytes, the limit is {self.max_message_bytes}",
            )
        return PublishRequest(validate_channel(channel), validate_event_name(event), encoded)

    async def publish(self, channel: str, event: str, data: Any = None) -> PublishResult:
        """Append to the channel's history and fan out to every worker, atomically."""
        request = self._request(channel, event, data)
        try:
            pub = await self._broker.publish(request.channel, request.event, request.data)
        except BrokerUnavailable as exc:
            raise HubError(errors.UNAVAILABLE, str(exc), temporary=True) from None
        return PublishResult.of(pub)

    async def publish_batch(self, messages: Iterable[tuple[str, str, Any]]) -> list[PublishResult]:
        """Publish ``(channel, event, data)`` messages in one round trip, in order; each
        one atomically. All are validated before any is sent."""
        requests = [self._request(channel, event, data) for channel, event, data in messages]
        try:
            pubs = await self._broker.publish_batch(requests)
        except BrokerUnavailable as exc:
            raise HubError(errors.UNAVAILABLE, str(exc), temporary=True) from None
        return [PublishResult.of(pub) for pub in pubs]
