"""Broker backends behind one interface; :func:`create_broker` picks one from the URL."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # Per-namespace overrides: namespace (the part of a channel before ':') ->
    # (history_size, history_ttl).
    history_overrides: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Redis only (HERALD_REDIS_*): seconds, and the command pool's size.
    connect_timeout: float = 2.0
    command_timeout: float = 5.0
    health_check_interval: float = 5.0
    health_check_timeout: float = 3.0
    max_connections: int = 64

    def history_limits(self, channel: str) -> tuple[int, int]:
        """``(history_size, history_ttl)`` for ``channel``, its namespace's if it has one."""
        if self.history_overrides:
            override = self.history_overrides.get(channel.partition(":")[0])
            if override is not None:
                return override
        return self.history_size, self.history_ttl


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
