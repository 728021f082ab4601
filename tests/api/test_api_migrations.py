"""Migrations, the schema policy at start-up, and the ``herald db``/``users`` commands."""

from __future__ import annotations

import argparse
import asyncio
import io
import uuid
import warnings
from pathlib import Path

import asyncpg
import httpx
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from api_helpers import PG_ADMIN_DSN, TEST_SECRET, pg_url

from api import cli, migrate
from api.app import UsersApi, create_app
from api.db import Base, create_engine
from api.settings import ApiSettings
from hub.app import create_app as create_hub_app
from hub.settings import Settings


@pytest.fixture
async def empty_database_url(backend, tmp_path: Path):
    """A database with nothing in it, of each backend."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{(tmp_path / 'empty.db').as_posix()}"
        return
    name = f"herald_mig_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield pg_url(name)
    finally:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture
def cli_env(monkeypatch, tmp_path, empty_database_url):
    monkeypatch.setenv("HERALD_ENV", "development")
    monkeypatch.setenv("HERALD_SECRET_KEY", TEST_SECRET)
    monkeypatch.setenv("HERALD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HERALD_DATABASE_URL", empty_database_url)
    monkeypatch.setenv("HERALD_ARGON2_MEMORY_KIB", "1024")
    monkeypatch.setenv("HERALD_ARGON2_TIME_COST", "1")
    monkeypatch.delenv("HERALD_REDIS_URL", raising=False)
    return empty_database_url


def _diff(connection):
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return compare_metadata(context, Base.metadata)


async def test_migrations_produce_exactly_the_models(empty_database_url):
    engine = create_engine(empty_database_url)
    try:
        await migrate.upgrade(engine)
        assert await migrate.current_revision(engine) == migrate.head_revision()
        with warnings.catch_warnings():
            # Expression indexes (lower(username)) cannot be reflected for comparison.
            warnings.simplefilter("ignore")
            async with engine.connect() as connection:
                assert await connection.run_sync(_diff) == []
    finally:
        await engine.dispose()


async def test_migrations_downgrade_and_upgrade_again(empty_database_url):
    engine = create_engine(empty_database_url)

    def downgrade(connection):
        config = migrate.alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "base")

    try:
        await migrate.upgrade(engine)
        async with engine.begin() as connection:
            await connection.run_sync(downgrade)
        assert await migrate.current_revision(engine) is None
        await migrate.upgrade(engine)
        assert await migrate.current_revision(engine) == migrate.head_revision()
    finally:
        await engine.dispose()


async def test_concurrent_upgrades_are_serialised(empty_database_url):
    engines = [create_engine(empty_database_url) for _ in range(3)]
    try:
        await asyncio.gather(*(migrate.upgrade(engine) for engine in engines))
        assert await migrate.current_revision(engines[0]) == migrate.head_revision()
    finally:
        for engine in engines:
            await engine.dispose()


def _settings(tmp_path, url, env="development"):
    return Settings(env=env, secret_key=TEST_SECRET, data_dir=tmp_path / "data", database_url=url)


async def test_production_refuses_an_outdated_schema(tmp_path, empty_database_url, caplog):
    app = create_app(_settings(tmp_path, empty_database_url, env="production"))
    with pytest.raises(migrate.SchemaOutdated, match="herald db upgrade"):
        async with app.router.lifespan_context(app):
            pass  # pragma: no cover
    assert "herald db upgrade" in caplog.text
    engine = create_engine(empty_database_url)
    try:
        assert await migrate.current_revision(engine) is None  # nothing was touched
        await migrate.upgrade(engine)
    finally:
        await engine.dispose()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/health/ready")).status_code == 200


async def test_development_migrates_at_start(tmp_path, empty_database_url):
    app = create_app(_settings(tmp_path, empty_database_url))
    async with app.router.lifespan_context(app):
        engine = app.state.api.db.engine
        assert await migrate.current_revision(engine) == migrate.head_revision()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            ready = await client.get("/health/ready")
    assert ready.json()["checks"]["database"] == "ok"


async def test_auto_migrate_can_be_turned_off_in_development(tmp_path, empty_database_url):
    app = create_hub_app(
        _settings(tmp_path, empty_database_url),
        extensions=[UsersApi(ApiSettings(auto_migrate=False))],
    )
    with pytest.raises(migrate.SchemaOutdated):
        async with app.router.lifespan_context(app):
            pass  # pragma: no cover


def test_default_sqlite_database_lives_in_the_data_dir(tmp_path):
    settings = Settings(env="development", data_dir=tmp_path / "d", secret_key=TEST_SECRET)
    assert settings.effective_database_url.endswith(f"{tmp_path}/d/herald.db")


# -- CLI ---------------------------------------------------------------------------------


def test_cli_db_current_and_upgrade(cli_env, capsys):
    assert cli.main(["db", "current"]) == 1
    assert "outdated, run `herald db upgrade`" in capsys.readouterr().out
    assert cli.main(["db", "upgrade"]) == 0
    assert f"to {migrate.head_revision()}" in capsys.readouterr().out
    assert cli.main(["db", "upgrade"]) == 0
    assert "already at revision" in capsys.readouterr().out
    assert cli.main(["db", "current"]) == 0
    assert "current" in capsys.readouterr().out


def test_cli_create_admin_then_login(cli_env, capsys, tmp_path):
    code = cli.main(
        ["users", "create-admin", "--email", "Root@Example.com", "--password", "bootstrap pw"]
    )
    assert code == 0, capsys.readouterr()
    assert "created admin Root <root@example.com>" in capsys.readouterr().out
    again = cli.main(
        ["users", "create-admin", "--email", "root@example.com", "--password", "x" * 9]
    )
    assert again == 1
    assert "already exists" in capsys.readouterr().err
    settings = Settings()

    async def login() -> dict:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                tokens = await client.post(
                    "/api/v1/auth/token", data={"username": "root", "password": "bootstrap pw"}
                )
                me = await client.get(
                    "/api/v1/users/me",
                    headers={"Authorization": f"Bearer {tokens.json()['access_token']}"},
                )
                return me.json()

    me = asyncio.run(login())
    assert (me["role"], me["is_verified"], me["status"]) == ("admin", True, "active")


@pytest.mark.parametrize(
    "argv",
    [
        ["--email", "not-an-email", "--password", "long enough"],
        ["--email", "a@example.com", "--password", "short"],
        ["--email", "a@example.com", "--password", "long enough", "--username", "no spaces"],
    ],
)
def test_cli_create_admin_refuses_invalid_input(cli_env, capsys, argv):
    assert cli.main(["users", "create-admin", *argv]) == 2
    assert capsys.readouterr().err.startswith("herald: ")


def test_cli_create_admin_reads_the_password_from_env_or_stdin(cli_env, capsys, monkeypatch):
    monkeypatch.setenv("HERALD_ADMIN_PASSWORD", "from the environment")
    assert cli.main(["users", "create-admin", "--email", "env@example.com"]) == 0
    monkeypatch.delenv("HERALD_ADMIN_PASSWORD")
    monkeypatch.setattr("sys.stdin", io.StringIO("from standard input\n"))
    assert (
        cli.main(["users", "create-admin", "--email", "stdin@example.com", "--username", "std"])
        == 0
    )
    out = capsys.readouterr().out
    assert "env <env@example.com>" in out and "std <stdin@example.com>" in out


def test_cli_has_the_hub_commands_too():
    parser = cli.build_parser()
    commands = {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }
    assert {"serve", "token", "publish", "db", "users"} <= commands
    args = parser.parse_args(["serve"])
    assert args.app == "api.app:create_app"
