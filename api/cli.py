"""The ``herald`` console script: the hub's commands plus ``db`` and ``users``.

herald serve                  run the hub with the users API
herald db upgrade             migrate the database to this version's schema
herald db current             print the schema revision (and whether it is current)
herald users create-admin --email a@example.com [--password ...] [--username ...]
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import re
import sys

from pydantic import ValidationError

from clients import cli as clients_cli
from hub import cli as hub_cli
from hub.settings import Settings, SettingsError, load_settings

from . import migrate
from .db import Database
from .errors import ApiError
from .outbox import Outbox
from .schemas import UserCreate
from .security import Passwords
from .services import users
from .settings import ApiSettings

PASSWORD_ENV = "HERALD_ADMIN_PASSWORD"


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(f"herald: {text}\n")


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        _err(str(exc))
        raise SystemExit(2) from None


# -- db ----------------------------------------------------------------------------------


async def _db_upgrade(settings: Settings, revision: str) -> int:
    db = Database.from_url(settings.effective_database_url)
    try:
        before = await migrate.current_revision(db.engine)
        await migrate.upgrade(db.engine, revision)
        after = await migrate.current_revision(db.engine)
    finally:
        await db.aclose()
    if before == after:
        _out(f"database already at revision {after}")
    else:
        _out(f"database upgraded from {before or 'empty'} to {after}")
    return 0


async def _db_current(settings: Settings) -> int:
    db = Database.from_url(settings.effective_database_url)
    try:
        current = await migrate.current_revision(db.engine)
    finally:
        await db.aclose()
    head = migrate.head_revision()
    state = "current" if current == head else f"outdated, run `{migrate.UPGRADE_COMMAND}`"
    _out(f"{current or 'empty'} (head {head}: {state})")
    return 0 if current == head else 1


def db_upgrade(args: argparse.Namespace) -> int:
    return asyncio.run(_db_upgrade(_settings(), args.revision))


def db_current(args: argparse.Namespace) -> int:
    return asyncio.run(_db_current(_settings()))


# -- users -------------------------------------------------------------------------------


def _default_username(email: str) -> str:
    local = re.sub(r"[^A-Za-z0-9_]", "_", email.partition("@")[0])[:50]
    return local if len(local) >= 3 else "admin"


def _read_password(given: str | None) -> str:
    if given is not None:
        return given
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env:
        return from_env
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise ValueError("the passwords do not match")
        return first
    return sys.stdin.readline().rstrip("\n")


async def _create_admin(settings: Settings, user_create: UserCreate) -> int:
    api_settings = ApiSettings()
    db = Database.from_url(settings.effective_database_url)
    try:
        await migrate.prepare_schema(db.engine, migrate=api_settings.auto_migrate_for(settings))
        async with db.session() as session:
            user = await users.create_admin(
                session=session,
                publisher=Outbox(),  # no hub here: a running server delivers the event
                passwords=Passwords(
                    time_cost=api_settings.argon2_time_cost,
                    memory_kib=api_settings.argon2_memory_kib,
                    parallelism=api_settings.argon2_parallelism,
                ),
                user_create=user_create,
            )
    finally:
        await db.aclose()
    _out(f"created admin {user.username} <{user.email}> id {user.id}")
    return 0


def create_admin(args: argparse.Namespace) -> int:
    settings = _settings()
    try:
        password = _read_password(args.password)
        user_create = UserCreate(
            email=args.email,
            username=args.username or _default_username(args.email),
            password=password,
            password_confirm=password,
            accept_terms=True,
        )
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "input"
            _err(f"{field}: {error['msg']}")
        return 2
    except ValueError as exc:
        _err(str(exc))
        return 2
    try:
        return asyncio.run(_create_admin(settings, user_create))
    except migrate.SchemaOutdated as exc:
        _err(str(exc))
        return 1
    except ApiError as exc:
        _err(exc.message)
        return 1


# -- entry point -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herald", description="Herald real-time hub")
    sub = parser.add_subparsers(dest="command", required=True)
    hub_cli.add_commands(sub)
    clients_cli.add_commands(sub)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    p = db_sub.add_parser("upgrade", help="migrate the database (HERALD_DATABASE_URL)")
    p.add_argument("revision", nargs="?", default="head", help="target (default: head)")
    p.set_defaults(func=db_upgrade)
    p = db_sub.add_parser("current", help="show the schema revision; exit 1 if outdated")
    p.set_defaults(func=db_current)

    accounts = sub.add_parser("users", help="user accounts")
    accounts_sub = accounts.add_subparsers(dest="users_command", required=True)
    p = accounts_sub.add_parser("create-admin", help="create an admin (bootstrap)")
    p.add_argument("--email", required=True)
    p.add_argument(
        "--password",
        help=f"default: ${PASSWORD_ENV}, else prompted (or one line of stdin)",
    )
    p.add_argument("--username", help="default: derived from the e-mail address")
    p.set_defaults(func=create_admin)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
