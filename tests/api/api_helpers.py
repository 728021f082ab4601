"""Helpers for the users API tests: registering, logging in, making admins, reading
what the hub published."""

from __future__ import annotations

import os
import uuid
from typing import Any

import httpx
import orjson
from sqlalchemy import select

from api.context import ApiContext
from api.db import Database
from api.models import OutboxEntry, Role, User
from api.schemas import UserCreate
from api.services import users

# The maintenance database that test databases are created from (trust auth here; the
# password is for CI's self-started cluster).
PG_ADMIN_DSN = os.environ.get(
    "HERALD_TEST_POSTGRES_DSN", "postgresql://postgres:postgres@127.0.0.1:5432/postgres"
)


def pg_url(database: str) -> str:
    """The SQLAlchemy (asyncpg) URL of ``database`` on the test server."""
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{database}"


TEST_SECRET = "api-test-secret-" + "s" * 40
PASSWORD = "correct horse battery"


def new_user_body(**overrides: Any) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:10]
    body: dict[str, Any] = {
        "email": f"user_{tag}@example.com",
        "username": f"user_{tag}",
        "password": PASSWORD,
        "password_confirm": PASSWORD,
        "accept_terms": True,
    }
    body.update(overrides)
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def register(client: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    response = await client.post("/api/v1/auth/register", json=new_user_body(**overrides))
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def login(
    client: httpx.AsyncClient, username: str, password: str = PASSWORD
) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/auth/token", data={"username": username, "password": password}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def user_with_token(
    client: httpx.AsyncClient, **overrides: Any
) -> tuple[dict[str, Any], str]:
    """Register a user and log in; returns the user and an access token."""
    user = await register(client, **overrides)
    tokens = await login(client, user["username"])
    return user, tokens["access_token"]


async def make_admin(context: ApiContext, client: httpx.AsyncClient) -> tuple[User, str]:
    """An admin created the way ``herald users create-admin`` does, and their token."""
    body = new_user_body()
    async with context.db.session() as session:
        admin = await users.create_admin(
            session=session,
            publisher=context.publisher,
            passwords=context.passwords,
            user_create=UserCreate(**body),
        )
    assert admin.role == Role.ADMIN
    tokens = await login(client, body["username"])
    return admin, tokens["access_token"]


async def published(context: ApiContext, channel: str) -> list[tuple[str, Any]]:
    """Every (event, data) the hub holds in ``channel``'s history, oldest first."""
    result = await context.hub.broker.history(channel)
    return [(pub.event, orjson.loads(pub.data)) for pub in result.publications]


async def published_events(context: ApiContext, channel: str) -> list[str]:
    return [event for event, _ in await published(context, channel)]


async def pending(db: Database) -> list[OutboxEntry]:
    """Every outbox entry not yet delivered, oldest first."""
    async with db.session() as session:
        return list(await session.scalars(select(OutboxEntry).order_by(OutboxEntry.id)))
