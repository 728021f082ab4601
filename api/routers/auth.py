"""``/api/v1/auth``: registration, OAuth2 password login, refresh and logout."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.security import OAuth2PasswordRequestForm

from hub.ratelimit import enforce

from ..deps import ContextDep, PasswordsDep, PublisherDep, SessionDep, client_ip
from ..schemas import RefreshRequest, TokenPair, UserCreate, UserRead
from ..services import tokens, users
from .responses import errors

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


async def _limit(context: ContextDep, response: Response, *buckets: tuple[str, float, int]) -> None:
    """Take one token from each bucket (shared by every worker); 429 if one is empty.
    The response reports the bucket closest to its limit."""
    tightest: dict[str, str] | None = None
    for key, per_minute, burst in buckets:
        headers = await enforce(context.hub.broker, key, rate=per_minute / 60.0, burst=burst)
        if tightest is None or int(headers["X-RateLimit-Remaining"]) < int(
            tightest["X-RateLimit-Remaining"]
        ):
            tightest = headers
    if tightest:
        response.headers.update(tightest)


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    summary="Create an account",
    description="Rate limited per client address. New accounts are active, with role "
    "`user`, not verified. Publishes `user.created` on `user:{id}` and `users`.",
    responses=errors(409, 429),
)
async def register(
    user_create: UserCreate,
    request: Request,
    response: Response,
    context: ContextDep,
    session: SessionDep,
    publisher: PublisherDep,
    passwords: PasswordsDep,
) -> UserRead:
    settings = context.api_settings
    await _limit(
        context,
        response,
        (
            f"api:register:ip:{client_ip(request)}",
            settings.register_rate_per_minute,
            settings.register_burst,
        ),
    )
    user = await users.register(
        session=session,
        publisher=publisher,
        passwords=passwords,
        user_create=user_create,
        disposable_domains=context.disposable_domains,
    )
    response.headers["Location"] = f"/api/v1/users/{user.id}"
    return UserRead.model_validate(user)


@router.post(
    "/token",
    summary="Log in (OAuth2 password flow)",
    description="`username` is the username or the e-mail address. Returns a short-lived "
    "access token (a hub JWT, also valid on /ws and /sse) and a single-use refresh token. "
    "Rate limited per client address and per username.",
    responses=errors(401, 403, 429),
)
async def login(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    request: Request,
    response: Response,
    context: ContextDep,
    session: SessionDep,
    passwords: PasswordsDep,
) -> TokenPair:
    settings = context.api_settings
    rate, burst = settings.login_rate_per_minute, settings.login_burst
    await _limit(
        context,
        response,
        (f"api:login:ip:{client_ip(request)}", rate, burst),
        (f"api:login:user:{form.username.strip().lower()[:320]}", rate, burst),
    )
    user = await users.authenticate(
        session=session, passwords=passwords, login=form.username, password=form.password
    )
    response.headers.update(NO_STORE)
    return await tokens.issue_pair(
        session=session,
        tokens=context.hub.authenticator.tokens,
        user=user,
        access_ttl=context.settings.access_token_ttl,
        refresh_ttl=context.settings.refresh_token_ttl,
    )


@router.post(
    "/refresh",
    summary="Exchange a refresh token for a new token pair",
    description="Refresh tokens are single use. Presenting one a second time revokes "
    "every token issued from the same login.",
    responses=errors(401, 403),
)
async def refresh(
    body: RefreshRequest, response: Response, context: ContextDep, session: SessionDep
) -> TokenPair:
    pair = await tokens.refresh(
        session=session,
        authenticator=context.hub.authenticator,
        token=body.refresh_token,
        access_ttl=context.settings.access_token_ttl,
        refresh_ttl=context.settings.refresh_token_ttl,
    )
    response.headers.update(NO_STORE)
    return pair


@router.post(
    "/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Revoke a refresh token (and every token refreshed from the same login)",
    responses=errors(401),
)
async def logout(body: RefreshRequest, context: ContextDep, session: SessionDep) -> None:
    await tokens.logout(
        session=session, authenticator=context.hub.authenticator, token=body.refresh_token
    )
