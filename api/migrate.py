"""Schema migrations, driven programmatically (``herald db ...`` and the app's start-up).

Policy: in development the app upgrades the schema when it starts; in production it
refuses to serve on an outdated schema and says which command to run. Concurrent
upgrades (several workers starting at once) are serialised: a PostgreSQL advisory
lock, or a lock file next to the SQLite database.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# An arbitrary constant naming Herald's migration lock among PostgreSQL advisory locks.
PG_LOCK_KEY = 0x48_45_52_41_4C_44  # "HERALD"
UPGRADE_COMMAND = "herald db upgrade"


class SchemaOutdated(RuntimeError):
    """The database schema is not the one this version of the code needs."""


def alembic_config(url: str | None = None) -> Config:
    """An Alembic configuration for Herald's migrations, no ``alembic.ini`` needed."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships migrations
        raise RuntimeError("no migrations found")
    return head


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at (``None`` for an empty database)."""
    async with engine.connect() as connection:
        return await connection.run_sync(_current)


@contextlib.asynccontextmanager
async def _file_lock(path: Path) -> AsyncIterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _sqlite_lock_path(engine: AsyncEngine) -> Path | None:
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database + ".migrate-lock")


def _upgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the schema to ``revision``; safe to call from several processes at once."""
    lock_path = _sqlite_lock_path(engine) if engine.dialect.name == "sqlite" else None
    async with contextlib.AsyncExitStack() as stack:
        if lock_path is not None:
            await stack.enter_async_context(_file_lock(lock_path))
        async with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                await connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY}
                )
            await connection.run_sync(_upgrade, revision)


async def check_schema(engine: AsyncEngine) -> None:
    """Raise :class:`SchemaOutdated`, naming the command to run, unless at the head."""
    current = await current_revision(engine)
    head = head_revision()
    if current != head:
        found = f"revision {current}" if current else "no schema (an empty database)"
        raise SchemaOutdated(
            f"the database has {found} but this version of Herald needs revision {head}; "
            f"run `{UPGRADE_COMMAND}` with the same HERALD_DATABASE_URL, then start again"
        )


async def prepare_schema(engine: AsyncEngine, *, migrate: bool) -> None:
    """At start-up: upgrade (development) or verify (production) the schema."""
    if migrate:
        await upgrade(engine)
    else:
        await check_schema(engine)
