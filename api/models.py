"""ORM models: users, API keys, refresh tokens and the event outbox.

E-mail addresses are stored normalised (lowercase) under a unique constraint, and
usernames are unique regardless of case (a unique index on ``lower(username)``):
the database, not a prior ``SELECT``, decides who wins a concurrent registration.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Uuid,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from .db import Base, UTCDateTime, utcnow


class Role(StrEnum):
    ADMIN = "admin"
    MODERATOR = "moderator"
    USER = "user"
    GUEST = "guest"


class UserStatus(StrEnum):
    ACTIVE = "active"
    INACTIVE = "inactive"
    SUSPENDED = "suspended"
    PENDING = "pending"


class ApiKeyScope(StrEnum):
    PUBLISH = "publish"
    ADMIN = "admin"


def _enum_values(enum: type[StrEnum]) -> list[str]:
    return [member.value for member in enum]


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    username: Mapped[str] = mapped_column(String(50))
    full_name: Mapped[str | None] = mapped_column(String(100), default=None)
    phone: Mapped[str | None] = mapped_column(String(20), default=None)
    role: Mapped[Role] = mapped_column(
        Enum(
            Role,
            name="role",
            native_enum=False,
            create_constraint=True,
            length=16,
            values_callable=_enum_values,
            validate_strings=True,
        ),
        default=Role.USER,
        index=True,
    )
    status: Mapped[UserStatus] = mapped_column(
        Enum(
            UserStatus,
            name="status",
            native_enum=False,
            create_constraint=True,
            length=16,
            values_callable=_enum_values,
            validate_strings=True,
        ),
        default=UserStatus.ACTIVE,
        index=True,
    )
    is_verified: Mapped[bool] = mapped_column(Boolean, default=False)
    password_hash: Mapped[str] = mapped_column(String(255))
    # File name under <data_dir>/avatars/ and its sniffed media type.
    avatar_file: Mapped[str | None] = mapped_column(String(128), default=None)
    avatar_content_type: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    @property
    def is_active(self) -> bool:
        return self.status == UserStatus.ACTIVE

    def __repr__(self) -> str:
        return f"User(id={self.id}, username={self.username!r}, role={self.role.value})"


# Usernames are unique whatever their case ("Alice" and "alice" are the same person).
Index("uq_users_username_lower", func.lower(User.username), unique=True)


class ApiKey(Base):
    """A service credential. Only the SHA-256 of the key is stored (keys are 256-bit
    random, so a slow hash adds nothing); ``prefix`` identifies it in listings."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_by_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="SET NULL"), default=None, index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class RefreshToken(Base):
    """One issued refresh token (by its JWT id). Each is single use: refreshing marks it
    used and issues the next one in the same ``family``; presenting a used token again
    revokes the whole family (a stolen token was replayed)."""

    __tablename__ = "refresh_tokens"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    family: Mapped[str] = mapped_column(String(64), index=True)
    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class OutboxEntry(Base):
    """A hub side effect of a committed change, waiting to be carried into the hub.

    Written in the same transaction as the change (so it exists exactly when the change
    does) and deleted once delivered; see :mod:`api.outbox`. ``kind`` is ``publish``
    (``payload``: channel, event, data) or ``revoke`` (``payload``: user id, not-before
    time). ``owner`` is the worker that relays it (``None``: any worker may).
    """

    __tablename__ = "event_outbox"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    kind: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    owner: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    attempted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
