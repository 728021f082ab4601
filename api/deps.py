"""Dependencies as ``Annotated`` aliases: ``SessionDep``, ``CurrentUser``, ``AdminUser``,
``PublisherDep`` and friends.

A bearer token is verified by the hub's :class:`~hub.auth.Authenticator` (signature,
expiry, audience and the shared revocation mark), then the user is loaded: a deleted
user gets 401 and a user who is not ``active`` gets 403, even if the token is valid.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy.ext.asyncio import AsyncSession

from hub.auth import Principal

from .context import ApiContext
from .errors import Forbidden, Unauthorized, UserDisabled
from .events import Publisher
from .models import Role, User
from .security import Passwords
from .storage import AvatarStorage

TOKEN_URL = "/api/v1/auth/token"

oauth2_scheme = OAuth2PasswordBearer(
    tokenUrl=TOKEN_URL,
    auto_error=False,
    refreshUrl="/api/v1/auth/refresh",
    description="Access token from POST /api/v1/auth/token",
)


def get_context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.api
    return context


ContextDep = Annotated[ApiContext, Depends(get_context)]


async def get_session(context: ContextDep) -> AsyncIterator[AsyncSession]:
    async with context.db.session() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def get_publisher(context: ContextDep) -> Publisher:
    return context.publisher


PublisherDep = Annotated[Publisher, Depends(get_publisher)]


def get_passwords(context: ContextDep) -> Passwords:
    return context.passwords


PasswordsDep = Annotated[Passwords, Depends(get_passwords)]


def get_avatars(context: ContextDep) -> AvatarStorage:
    return context.avatars


AvatarsDep = Annotated[AvatarStorage, Depends(get_avatars)]


async def get_principal(
    context: ContextDep, token: Annotated[str | None, Depends(oauth2_scheme)]
) -> Principal:
    """The user behind the bearer access token (API keys are for the publish API)."""
    if token is None:
        raise Unauthorized("send 'Authorization: Bearer <access token>'")
    authenticator = context.hub.authenticator
    if not authenticator.looks_like_jwt(token):
        raise Unauthorized("this endpoint needs a user access token")
    principal = await authenticator.authenticate_token(token)
    if principal.kind != "user":  # pragma: no cover - JWTs always carry users
        raise Unauthorized("this endpoint needs a user access token")
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_current_user(session: SessionDep, principal: PrincipalDep) -> User:
    try:
        user_id = uuid.UUID(principal.subject)
    except ValueError:
        raise Unauthorized("token subject is not a user of this API") from None
    user = await session.get(User, user_id)
    if user is None:
        raise Unauthorized("user no longer exists")
    if not user.is_active:
        raise UserDisabled(f"account is {user.status.value}")
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


async def get_admin_user(user: CurrentUser) -> User:
    if user.role != Role.ADMIN:
        raise Forbidden("admin role required")
    return user


AdminUser = Annotated[User, Depends(get_admin_user)]


def client_ip(request: Request) -> str:
    """The client's address (uvicorn applies X-Forwarded-For from trusted proxies)."""
    return request.client.host if request.client else "unknown"
