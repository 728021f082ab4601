"""Access and refresh tokens.

Access tokens are the hub's short-lived JWTs. Refresh tokens are JWTs of type
``refresh`` whose id is recorded: each one is single use (refreshing returns a new
pair in the same family), and presenting a used one again revokes its whole family,
because only a copied token can be replayed.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from hub.auth import Authenticator, TokenService
from hub.errors import HubError

from ..db import utcnow
from ..errors import Unauthorized, UserDisabled
from ..models import RefreshToken, User
from ..schemas import TokenPair


async def issue_pair(
    *,
    session: AsyncSession,
    tokens: TokenService,
    user: User,
    access_ttl: int,
    refresh_ttl: int,
    family: str | None = None,
) -> TokenPair:
    """A new access token and a recorded refresh token for ``user``; commits."""
    subject = str(user.id)
    jti = uuid.uuid4().hex
    # A fractional "iat" (RFC 7519 NumericDate allows it): the hub refuses tokens issued
    # at or before a user's revocation time, and with whole seconds a token issued just
    # *after* a revocation, in the same second, would be refused too.
    issued_at = time.time()
    access = tokens.issue(subject, role=user.role.value, ttl=access_ttl, extra={"iat": issued_at})
    refresh = tokens.issue(
        subject,
        role=user.role.value,
        ttl=refresh_ttl,
        token_type="refresh",
        extra={"jti": jti, "iat": issued_at},
    )
    now = utcnow()
    session.add(
        RefreshToken(
            jti=jti,
            family=family or jti,
            user_id=user.id,
            issued_at=now,
            expires_at=now + timedelta(seconds=refresh_ttl),
        )
    )
    await session.commit()
    return TokenPair(
        access_token=access,
        expires_in=access_ttl,
        refresh_token=refresh,
        refresh_expires_in=refresh_ttl,
    )


async def _decode_refresh(authenticator: Authenticator, token: str) -> tuple[str, str]:
    """Verify a refresh token; return its id and subject. Raises 401 errors."""
    claims = authenticator.tokens.decode(token, token_type="refresh")
    principal = authenticator.tokens.principal_from_claims(claims)
    await authenticator.check_not_revoked(principal)
    jti = claims.get("jti")
    if not isinstance(jti, str):
        raise Unauthorized("refresh token has no id")
    return jti, principal.subject


async def refresh(
    *,
    session: AsyncSession,
    authenticator: Authenticator,
    token: str,
    access_ttl: int,
    refresh_ttl: int,
) -> TokenPair:
    """Exchange a refresh token for a new pair (rotation with reuse detection)."""
    jti, _subject = await _decode_refresh(authenticator, token)
    record = await session.get(RefreshToken, jti)
    if record is None or record.revoked_at is not None:
        raise Unauthorized("refresh token was revoked")
    now = utcnow()
    if record.used_at is not None:
        await _revoke_family(session, record.family)
        await session.commit()
        raise Unauthorized("refresh token was already used; this session is now revoked")
    claimed = await session.execute(
        update(RefreshToken)
        .where(
            RefreshToken.jti == jti,
            RefreshToken.used_at.is_(None),
            RefreshToken.revoked_at.is_(None),
        )
        .values(used_at=now)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        await session.rollback()
        raise Unauthorized("refresh token was already used")
    user = await session.get(User, record.user_id)
    if user is None:
        await session.rollback()
        raise Unauthorized("user no longer exists")
    if not user.is_active:
        await session.rollback()
        raise UserDisabled(f"account is {user.status.value}")
    return await issue_pair(
        session=session,
        tokens=authenticator.tokens,
        user=user,
        access_ttl=access_ttl,
        refresh_ttl=refresh_ttl,
        family=record.family,
    )


async def logout(*, session: AsyncSession, authenticator: Authenticator, token: str) -> None:
    """Revoke the refresh token's whole family (this login on this device)."""
    try:
        jti, _subject = await _decode_refresh(authenticator, token)
    except HubError:
        raise Unauthorized("refresh token is invalid or expired") from None
    record = await session.get(RefreshToken, jti)
    if record is None:
        raise Unauthorized("refresh token is unknown")
    await _revoke_family(session, record.family)
    await session.commit()


async def _revoke_family(session: AsyncSession, family: str) -> None:
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.family == family, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )


async def revoke_all(session: AsyncSession, user_id: uuid.UUID) -> None:
    """Revoke every refresh token of a user (in the caller's transaction)."""
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.user_id == user_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
