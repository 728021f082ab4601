"""API keys for services: created by admins, shown once, stored as a SHA-256 digest.

A key authenticates the hub's publish API (and, with the ``admin`` scope, acts as an
admin in the hub): :func:`verify` is plugged into the hub's
:class:`hub.auth.Authenticator` as a service-key verifier.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hub.auth import Principal

from ..db import utcnow
from ..errors import NotFound
from ..models import ApiKey, User
from ..schemas import ApiKeyCreate
from ..security import API_KEY_DISPLAY_LENGTH, hash_api_key, looks_like_api_key, new_api_key

# Recording every use would write on every publish; once a minute is enough to audit.
LAST_USED_GRANULARITY = timedelta(seconds=60)


async def create(
    *, session: AsyncSession, actor: User, api_key_create: ApiKeyCreate
) -> tuple[ApiKey, str]:
    """Create a key; return the record and the secret (which is not stored)."""
    secret = new_api_key()
    now = utcnow()
    record = ApiKey(
        name=api_key_create.name,
        prefix=secret[:API_KEY_DISPLAY_LENGTH],
        key_hash=hash_api_key(secret),
        scopes=[scope.value for scope in api_key_create.scopes],
        created_by_id=actor.id,
        created_at=now,
        expires_at=(
            now + timedelta(days=api_key_create.expires_in_days)
            if api_key_create.expires_in_days
            else None
        ),
    )
    session.add(record)
    await session.commit()
    return record, secret


async def list_keys(*, session: AsyncSession, include_revoked: bool = False) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at.desc(), ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(await session.scalars(query))


async def revoke(*, session: AsyncSession, key_id: uuid.UUID) -> None:
    """Revoke a key; it is refused from the next request on, on every worker."""
    record = await session.get(ApiKey, key_id)
    if record is None:
        raise NotFound("API key not found")
    if record.revoked_at is None:
        record.revoked_at = utcnow()
        await session.commit()


def principal_for(record: ApiKey) -> Principal:
    return Principal(
        subject=f"api-key-{record.id}",
        role="user",
        kind="service",
        scopes=frozenset(record.scopes),
    )


async def verify(*, session: AsyncSession, key: str) -> Principal | None:
    """The service principal of a valid, unexpired, unrevoked key; ``None`` otherwise."""
    if not looks_like_api_key(key):
        return None
    record = await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key)))
    if record is None or record.revoked_at is not None:
        return None
    now = utcnow()
    if record.expires_at is not None and record.expires_at <= now:
        return None
    if record.last_used_at is None or now - record.last_used_at >= LAST_USED_GRANULARITY:
        await session.execute(update(ApiKey).where(ApiKey.id == record.id).values(last_used_at=now))
        await session.commit()
    return principal_for(record)
