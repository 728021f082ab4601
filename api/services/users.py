"""Users: registration, sign-in, profile and admin changes, listing and export.

Uniqueness (e-mail, username) is decided by the database's unique constraints, so two
concurrent registrations with one address give one account and one 409. Every change
stages its events (and, when suspending, deleting or re-roling a user, the revocation
of their connections and tokens) in its own transaction, then commits and flushes:
see :mod:`api.outbox`. Changes are flushed before their events are built, so the events
carry what the database holds (generated defaults, ``updated_at``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncScalarResult, AsyncSession

from .. import events
from ..db import utcnow
from ..errors import (
    AdminProtected,
    ApiError,
    Conflict,
    EmailTaken,
    Forbidden,
    InvalidCredentials,
    InvalidInput,
    NotFound,
    UserDisabled,
    UsernameTaken,
)
from ..events import Event, Publisher
from ..models import Role, User, UserStatus
from ..schemas import (
    BulkItemResult,
    BulkUpdateResult,
    ErrorInfo,
    UserAdminUpdate,
    UserCreate,
    UserFilters,
    UserPage,
    UserQuery,
    UserRead,
    UserUpdate,
)
from ..security import Passwords
from ..storage import AvatarStorage, StoredAvatar
from ..validation import is_disposable
from . import tokens

Changes = dict[str, dict[str, Any]]


# -- creation and sign-in ----------------------------------------------------------------


def _refuse_disposable(email: str, extra: frozenset[str], loc: list[str]) -> None:
    if extra and is_disposable(email, extra):
        raise InvalidInput(loc, "disposable e-mail addresses are not accepted")


async def _flush_unique(
    session: AsyncSession, *, email: str, exclude: uuid.UUID | None = None
) -> None:
    """Write the pending change (not yet committed); turn a unique-constraint violation
    into the matching 409."""
    try:
        await session.flush()
    except IntegrityError:
        await session.rollback()
        query = select(User.id).where(User.email == email)
        if exclude is not None:
            query = query.where(User.id != exclude)
        if await session.scalar(query) is not None:
            raise EmailTaken() from None
        raise UsernameTaken() from None


async def register(
    *,
    session: AsyncSession,
    publisher: Publisher,
    passwords: Passwords,
    user_create: UserCreate,
    disposable_domains: frozenset[str] = frozenset(),
    role: Role = Role.USER,
    verified: bool = False,
) -> User:
    """Create an active account; publishes ``user.created``."""
    _refuse_disposable(user_create.email, disposable_domains, ["body", "email"])
    now = utcnow()
    user = User(
        email=user_create.email,
        username=user_create.username,
        full_name=user_create.full_name,
        phone=user_create.phone,
        role=role,
        status=UserStatus.ACTIVE,
        is_verified=verified,
        password_hash=await passwords.hash(user_create.password),
        created_at=now,
        updated_at=now,
    )
    session.add(user)
    await _flush_unique(session, email=user.email)
    publisher.stage(session, events.created(user))
    await session.commit()
    await publisher.flush()
    return user


async def authenticate(
    *, session: AsyncSession, passwords: Passwords, login: str, password: str
) -> User:
    """The active user whose e-mail or username is ``login`` and whose password matches.

    Unknown logins cost as much time as wrong passwords. Records the sign-in time.
    """
    key = login.strip().lower()
    if not key or "\x00" in key:  # no such account (and PostgreSQL refuses NUL)
        await passwords.verify(None, password)
        raise InvalidCredentials()
    user = await session.scalar(
        select(User).where(or_(User.email == key, func.lower(User.username) == key))
    )
    matches = await passwords.verify(user.password_hash if user else None, password)
    if user is None or not matches:
        raise InvalidCredentials()
    if not user.is_active:
        raise UserDisabled(f"account is {user.status.value}")
    values: dict[str, Any] = {"last_login_at": utcnow(), "updated_at": user.updated_at}
    if passwords.needs_rehash(user.password_hash):
        values["password_hash"] = await passwords.hash(password)
    await session.execute(update(User).where(User.id == user.id).values(**values))
    await session.commit()
    await session.refresh(user)
    return user


async def get_user(*, session: AsyncSession, user_id: uuid.UUID) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise NotFound("user not found")
    return user


async def read_user(*, session: AsyncSession, actor: User, user_id: uuid.UUID) -> User:
    """A user as seen by ``actor``: themself, or anyone if ``actor`` is an admin."""
    if actor.id != user_id and actor.role != Role.ADMIN:
        raise Forbidden("you may only read your own account")
    return await get_user(session=session, user_id=user_id)


# -- own profile -------------------------------------------------------------------------


def _apply(user: User, values: dict[str, Any]) -> Changes:
    changes: Changes = {}
    for field, new in values.items():
        old = getattr(user, field)
        if old != new:
            changes[field] = {"old": _plain(old), "new": _plain(new)}
            setattr(user, field, new)
    return changes


def _plain(value: object) -> object:
    if isinstance(value, Role | UserStatus):
        return value.value
    return value


async def update_profile(
    *,
    session: AsyncSession,
    publisher: Publisher,
    user: User,
    user_update: UserUpdate,
    disposable_domains: frozenset[str] = frozenset(),
) -> User:
    """Apply a user's own change; publishes ``user.updated`` with the changed fields."""
    values = user_update.model_dump(exclude_unset=True)
    if "email" in values:
        _refuse_disposable(values["email"], disposable_domains, ["body", "email"])
    changes = _apply(user, values)
    if "email" in changes and user.is_verified:
        changes.update(_apply(user, {"is_verified": False}))
    if not changes:
        return user
    await _flush_unique(session, email=user.email, exclude=user.id)
    publisher.stage(session, events.updated(user, changes))
    await session.commit()
    await publisher.flush()
    return user


async def change_password(
    *,
    session: AsyncSession,
    passwords: Passwords,
    user: User,
    current_password: str,
    new_password: str,
) -> None:
    """Change the password and revoke every refresh token (other sessions sign in again
    when their access token expires)."""
    if not await passwords.verify(user.password_hash, current_password):
        raise InvalidInput(["body", "current_password"], "the current password is incorrect")
    user.password_hash = await passwords.hash(new_password)
    await tokens.revoke_all(session, user.id)
    await session.commit()


async def set_avatar(
    *,
    session: AsyncSession,
    publisher: Publisher,
    avatars: AvatarStorage,
    user: User,
    stored: StoredAvatar | None,
) -> User:
    """Point the user at a stored avatar (or none), then remove the previous file."""
    old_url = UserRead.model_validate(user).avatar_url
    old_file = user.avatar_file
    user.avatar_file = stored.file_name if stored else None
    user.avatar_content_type = stored.content_type if stored else None
    changed = old_file != user.avatar_file
    try:
        if changed:
            await session.flush()
            new_url = UserRead.model_validate(user).avatar_url
            publisher.stage(
                session, events.updated(user, {"avatar_url": {"old": old_url, "new": new_url}})
            )
        await session.commit()
    except BaseException:
        if stored is not None:
            await avatars.delete(stored.file_name)
        raise
    if changed:
        await avatars.delete(old_file)
        await publisher.flush()
    return user


# -- admin changes -----------------------------------------------------------------------


@dataclass(slots=True)
class _AdminChange:
    """What an admin change did to one user."""

    user: User
    changes: Changes
    old_status: str | None  # set if the status changed
    revoke: bool

    @property
    def changed(self) -> bool:
        return bool(self.changes) or self.old_status is not None

    def events(self) -> list[Event]:
        """Built after the flush, so the payload holds what the database holds."""
        found: list[Event] = []
        if self.changes:
            found += events.updated(self.user, self.changes)
        if self.old_status is not None:
            found += events.status_changed(self.user, self.old_status, self.user.status.value)
        return found


def _admin_change(actor: User, user: User, change: UserAdminUpdate) -> _AdminChange:
    """Apply ``change`` to ``user``; say what changed and whether to revoke sessions."""
    values = change.model_dump(exclude_unset=True)
    if user.id == actor.id and (
        ("role" in values and values["role"] != user.role)
        or ("status" in values and values["status"] != user.status)
    ):
        raise AdminProtected("admins cannot change their own role or status")
    old_status = user.status
    old_role = user.role
    changes = _apply(user, values)
    status_change = changes.pop("status", None)
    # Tokens carry the role, and only active users may hold sessions.
    revoke = (user.role != old_role) or (old_status != user.status and not user.is_active)
    return _AdminChange(user, changes, old_status.value if status_change else None, revoke)


async def admin_update(
    *,
    session: AsyncSession,
    publisher: Publisher,
    actor: User,
    user_id: uuid.UUID,
    change: UserAdminUpdate,
) -> User:
    """An admin changes role, status or verified flag. A new role, or leaving ``active``,
    closes the user's connections and revokes their tokens."""
    user = await get_user(session=session, user_id=user_id)
    done = _admin_change(actor, user, change)
    if not done.changed:
        return user
    if done.revoke:
        await tokens.revoke_all(session, user.id)
    await session.flush()
    publisher.stage(session, done.events())
    if done.revoke:
        publisher.stage_revocation(session, str(user.id))
    await session.commit()
    await publisher.flush()
    return user


async def bulk_update(
    *,
    session: AsyncSession,
    publisher: Publisher,
    actor: User,
    ids: Sequence[uuid.UUID],
    change: UserAdminUpdate,
) -> BulkUpdateResult:
    """Apply one admin change to many users in one transaction; report per id."""
    found = {u.id: u for u in (await session.scalars(select(User).where(User.id.in_(ids))))}
    results: list[BulkItemResult] = []
    applied: list[_AdminChange] = []
    for user_id in ids:
        user = found.get(user_id)
        try:
            if user is None:
                raise NotFound("user not found")
            done = _admin_change(actor, user, change)
        except ApiError as exc:
            error = ErrorInfo(code=exc.code, message=exc.message)
            results.append(BulkItemResult(id=user_id, ok=False, error=error))
            continue
        applied.append(done)
        if done.revoke:
            await tokens.revoke_all(session, user_id)
        results.append(BulkItemResult(id=user_id, ok=True))
    await session.flush()
    for done in applied:
        publisher.stage(session, done.events())
    for done in applied:
        if done.revoke:
            publisher.stage_revocation(session, str(done.user.id))
    await session.commit()
    await publisher.flush()
    succeeded = sum(1 for r in results if r.ok)
    return BulkUpdateResult(
        results=results,
        succeeded=succeeded,
        failed=len(results) - succeeded,
        success_rate=round(succeeded / len(results), 4),
    )


async def delete_user(
    *,
    session: AsyncSession,
    publisher: Publisher,
    avatars: AvatarStorage,
    user_id: uuid.UUID,
) -> None:
    """Delete a non-admin user, their refresh tokens and avatar; close their connections."""
    user = await get_user(session=session, user_id=user_id)
    if user.role == Role.ADMIN:
        raise AdminProtected("admins cannot be deleted; change their role first")
    avatar = user.avatar_file
    await session.delete(user)
    publisher.stage(session, events.deleted(user_id))
    publisher.stage_revocation(session, str(user_id))
    await session.commit()
    await avatars.delete(avatar)
    await publisher.flush()


# -- listing and export ------------------------------------------------------------------


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _conditions(filters: UserFilters) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if filters.q:
        pattern = f"%{_escape_like(filters.q.lower())}%"
        conditions.append(
            or_(
                User.email.like(pattern, escape="\\"),
                func.lower(User.username).like(pattern, escape="\\"),
                func.lower(User.full_name).like(pattern, escape="\\"),
            )
        )
    if filters.role is not None:
        conditions.append(User.role == filters.role)
    if filters.status is not None:
        conditions.append(User.status == filters.status)
    if filters.verified_only:
        conditions.append(User.is_verified.is_(True))
    if filters.created_after is not None:
        conditions.append(User.created_at >= filters.created_after)
    if filters.created_before is not None:
        conditions.append(User.created_at < filters.created_before)
    return conditions


def _sorted(query: Select[User], sort: str) -> Select[User]:
    column = {
        "created_at": User.created_at,
        "username": func.lower(User.username),
        "email": User.email,
    }[sort.lstrip("-")]
    if sort.startswith("-"):
        return query.order_by(column.desc(), User.id.desc())
    return query.order_by(column.asc(), User.id.asc())


async def list_users(*, session: AsyncSession, query: UserQuery) -> UserPage:
    conditions = _conditions(query)
    total = await session.scalar(select(func.count()).select_from(User).where(*conditions)) or 0
    rows = await session.scalars(
        _sorted(select(User).where(*conditions), query.sort)
        .limit(query.size)
        .offset((query.page - 1) * query.size)
    )
    items = [UserRead.model_validate(user) for user in rows]
    return UserPage.build(items, total=total, page=query.page, size=query.size)


async def stream_users(
    *, session: AsyncSession, filters: UserFilters, batch: int = 500
) -> AsyncScalarResult[User]:
    """Every matching user, fetched in batches through a server-side cursor. The query
    runs here, so a failure surfaces before anything is streamed."""
    statement = _sorted(select(User).where(*_conditions(filters)), filters.sort)
    return await session.stream_scalars(statement.execution_options(yield_per=batch))


# -- bootstrap ---------------------------------------------------------------------------


async def create_admin(
    *,
    session: AsyncSession,
    publisher: Publisher,
    passwords: Passwords,
    user_create: UserCreate,
) -> User:
    """The first admin (``herald users create-admin``): active, verified, role admin."""
    existing = await session.scalar(select(User).where(User.email == user_create.email))
    if existing is not None:
        raise Conflict(f"a user with e-mail {user_create.email} already exists")
    return await register(
        session=session,
        publisher=publisher,
        passwords=passwords,
        user_create=user_create,
        role=Role.ADMIN,
        verified=True,
    )
