"""Herald's real-time core: registry, channels, transports, broker and auth."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .publisher import HeraldPublisher

__all__ = ["HeraldPublisher"]


def __getattr__(name: str) -> Any:
    # Lazy: ``import hub.anything`` must not pull in the Redis client.
    if name == "HeraldPublisher":
        from .publisher import HeraldPublisher

        return HeraldPublisher
    raise AttributeError(f"module 'hub' has no attribute {name!r}")
