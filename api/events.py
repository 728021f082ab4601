"""User events, and the :class:`Publisher` interface through which services emit them.

Services *stage* their events in the session of the change, before committing, and
*flush* after the commit. The implementation (:class:`api.outbox.Outbox`) writes them to
the event outbox in that transaction, so a rolled-back change never produces an event
and a committed one always does, even if the broker is down at that moment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from .models import User
from .schemas import UserRead

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

    def stage(self, session: AsyncSession, events: Sequence[Event]) -> None:
        """Add ``events`` to ``session``'s transaction: they are published, in order,
        if and only if it commits."""

    def stage_revocation(self, session: AsyncSession, user_id: str) -> None:
        """Add to ``session``'s transaction: close every live connection of ``user_id``
        on every worker and refuse every token issued to them until now."""

    async def flush(self) -> None:
        """After a commit: deliver what was staged now (briefly awaited). Never raises;
        what cannot be delivered yet is retried in the background."""


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
