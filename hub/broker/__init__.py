"""Broker backends behind one interface; :func:`create_broker` picks one from the URL."""

from __future__ import annotations

from dataclasses import dataclass

from .base import (
    Broker,
    BrokerHandler,
    BrokerUnavailable,
    HistoryResult,
    PublishRequest,
    RateLimitResult,
)

__all__ = [
    "Broker",
    "BrokerConfig",
    "BrokerHandler",
    "BrokerUnavailable",
    "HistoryResult",
    "PublishRequest",
    "RateLimitResult",
    "create_broker",
]


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """What every backend needs to know; built from :class:`hub.settings.Settings`."""

    url: str = "memory://"
    prefix: str = "herald"
    history_size: int = 1000
    history_ttl: int = 24 * 3600


def create_broker(config: BrokerConfig) -> Broker:
    """A broker for ``config.url``: ``memory://`` or ``redis://``/``rediss://``/``unix://``.

    Backends are imported lazily so the embedded default needs no Redis client setup.
    """
    scheme = config.url.split(":", 1)[0]
    if scheme == "memory":
        from .memory import MemoryBroker

        return MemoryBroker(config)
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisBroker

        return RedisBroker(config)
    raise ValueError(f"unsupported broker URL scheme {scheme!r}")
