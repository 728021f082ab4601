"""Fixtures for the users API: the real product app (hub + API) in process, on SQLite
and on PostgreSQL.

PostgreSQL: one database per test session (random name, dropped at the end), migrated
once; tables are emptied before each test. SQLite: a fresh file per test.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from api_helpers import PG_ADMIN_DSN, TEST_SECRET, pg_url
from fastapi import FastAPI
from sqlalchemy import text

from api.app import UsersApi
from api.context import ApiContext
from api.events import Publisher
from api.outbox import HubSink
from api.settings import ApiSettings
from hub.app import create_app as create_hub_app
from hub.settings import Settings

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    name = f"herald_api_{uuid.uuid4().hex[:12]}"

    async def run(statement: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    try:
        yield pg_url(name)
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite+aiosqlite:///{(tmp_path / 'herald.db').as_posix()}"


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        env="development",
        secret_key=TEST_SECRET,
        data_dir=tmp_path / "data",
        database_url=database_url,
        redis_url=None,
    )


@pytest.fixture
def api_settings() -> ApiSettings:
    """Cheap hashing and limits high enough not to interfere (rate-limit tests lower them)."""
    return ApiSettings(
        argon2_time_cost=1,
        argon2_memory_kib=1024,
        argon2_parallelism=1,
        login_rate_per_minute=1e6,
        login_burst=1_000_000,
        register_rate_per_minute=1e6,
        register_burst=1_000_000,
        disposable_email_domains=["throwaway.example"],
    )


@pytest.fixture
def sink_factory() -> Any:
    """Where the outbox relay delivers; tests override this fixture to wrap the hub."""
    return HubSink


async def _empty_tables(context: ApiContext) -> None:
    async with context.db.engine.begin() as conn:
        if context.db.dialect == "postgresql":
            await conn.execute(
                text("TRUNCATE users, api_keys, refresh_tokens, event_outbox CASCADE")
            )
        else:
            for table in ("refresh_tokens", "api_keys", "users", "event_outbox"):
                await conn.execute(text(f"DELETE FROM {table}"))


@pytest.fixture
async def app(
    settings: Settings, api_settings: ApiSettings, sink_factory: Any
) -> AsyncIterator[FastAPI]:
    application = create_hub_app(
        settings, extensions=[UsersApi(api_settings, sink_factory=sink_factory)]
    )
    async with application.router.lifespan_context(application):
        await _empty_tables(application.state.api)
        yield application


@pytest.fixture
def context(app: FastAPI) -> ApiContext:
    ctx: ApiContext = app.state.api
    return ctx


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://herald.test") as c:
        yield c


@pytest.fixture
def publisher(context: ApiContext) -> Publisher:
    return context.publisher
