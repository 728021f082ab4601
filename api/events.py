"""User events and the :class:`Publisher` that carries them into the hub.

Services call a publisher only *after* their transaction committed, so a rolled-back
change never produces an event. Delivery is at most once: if the broker is down at
that moment the change stays committed, the event is logged as lost, and clients
recover by refetching (documented in docs/api.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hub.errors import HubError
from hub.hub import Hub

from .models import User
from .schemas import UserRead

logger = logging.getLogger("herald.api.events")

USER_CREATED = "user.created"
USER_UPDATED = "user.updated"
USER_STATUS_CHANGED = "user.status_changed"
USER_DELETED = "user.deleted"
DIRECTORY_CHANNEL = "users"


def user_channel(user_id: object) -> str:
    return f"user:{user_id}"


@dataclass(frozen=True, slots=True)
class Event:
    """One publication: ``event`` with JSON-able ``data`` on ``channel``."""

    channel: str
    event: str
    data: dict[str, Any]


class Publisher(Protocol):
    """Where the API's side effects on the real-time hub go."""

    async def publish(self, events: Sequence[Event]) -> None:
        """Publish ``events`` in order, in one round trip. Never raises: a failure is
        logged (the database change it describes is already committed)."""

    async def revoke_user(self, user_id: str) -> None:
        """Close every live connection of ``user_id`` on every worker and refuse every
        token issued to them until now. Retries briefly; logs if the broker is down."""


def user_payload(user: User) -> dict[str, Any]:
    return UserRead.model_validate(user).model_dump(mode="json")


def for_user(user_id: object, event: str, data: dict[str, Any]) -> list[Event]:
    """The same event on the user's own channel and on the ``users`` directory."""
    return [Event(user_channel(user_id), event, data), Event(DIRECTORY_CHANNEL, event, data)]


def created(user: User) -> list[Event]:
    return for_user(user.id, USER_CREATED, {"id": str(user.id), "user": user_payload(user)})


def updated(user: User, changes: dict[str, dict[str, Any]]) -> list[Event]:
    """``changes`` maps each changed field to ``{"old": ..., "new": ...}``."""
    data = {"id": str(user.id), "changes": changes, "user": user_payload(user)}
    return for_user(user.id, USER_UPDATED, data)


def status_changed(user: User, old: str, new: str) -> list[Event]:
    data = {"id": str(user.id), "old": old, "new": new, "user": user_payload(user)}
    return for_user(user.id, USER_STATUS_CHANGED, data)


def deleted(user_id: object) -> list[Event]:
    return for_user(user_id, USER_DELETED, {"id": str(user_id)})


class HubPublisher:
    """:class:`Publisher` over this worker's :class:`hub.hub.Hub` (and so its broker)."""

    def __init__(self, hub: Hub, *, attempts: int = 3, backoff: float = 0.1) -> None:
        self._hub = hub
        self._attempts = attempts
        self._backoff = backoff

    async def publish(self, events: Sequence[Event]) -> None:
        if not events:
            return
        items = [(e.channel, e.event, e.data) for e in events]
        try:
            await self._hub.publish_many(items)
        except HubError as exc:
            logger.error(
                "lost %d event(s) %s: %s",
                len(events),
                sorted({e.event for e in events}),
                exc.message,
            )

    async def revoke_user(self, user_id: str) -> None:
        for attempt in range(1, self._attempts + 1):
            try:
                await self._hub.disconnect_user(user_id, revoke=True)
                return
            except HubError as exc:
                if attempt == self._attempts:
                    logger.error(
                        "could not disconnect user %s or revoke their tokens: %s",
                        user_id,
                        exc.message,
                    )
                    return
                await asyncio.sleep(self._backoff * attempt)
