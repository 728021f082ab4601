"""The product app: the hub with the users API mounted (``herald serve`` runs this).

:class:`UsersApi` is a hub extension. Its lifespan, entered after the hub started,
opens the database, prepares the schema (migrates in development, refuses an outdated
schema in production), plugs stored API keys into the hub's authenticator, adds a
database readiness check and starts this worker's event-outbox relay; it stops the
relay and closes the database before the hub drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI
from prometheus_client import Gauge
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from hub import errors as hub_errors
from hub.app import create_app as create_hub_app
from hub.auth import Principal
from hub.errors import HubError
from hub.hub import Hub
from hub.settings import Settings

from .context import ApiContext
from .db import Database
from .errors import install_error_handlers
from .migrate import SchemaOutdated, prepare_schema
from .outbox import EventSink, HubSink, Outbox, OutboxRelay
from .routers import api_keys, auth, users
from .security import Passwords
from .services import api_keys as api_key_service
from .settings import ApiSettings
from .storage import AvatarStorage

logger = logging.getLogger("herald.api")

SinkFactory = Callable[[Hub], EventSink]


class UsersApi:
    """The users API as a hub extension (see :class:`hub.app.Extension`)."""

    def __init__(
        self,
        api_settings: ApiSettings | None = None,
        *,
        sink_factory: SinkFactory = HubSink,
    ) -> None:
        self._api_settings = api_settings
        self._sink_factory = sink_factory

    def install(self, app: FastAPI) -> None:
        app.include_router(auth.router)
        app.include_router(users.router)
        app.include_router(api_keys.router)
        install_error_handlers(app)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        settings: Settings = app.state.settings
        hub: Hub = app.state.hub
        api_settings = self._api_settings or ApiSettings()
        db = Database.from_url(
            settings.effective_database_url,
            echo=api_settings.database_echo,
            pool_size=api_settings.database_pool_size,
        )
        try:
            try:
                await prepare_schema(db.engine, migrate=api_settings.auto_migrate_for(settings))
            except SchemaOutdated as exc:
                logger.error("herald: %s", exc)
                raise
            pending, oldest = _outbox_gauges(hub)
            relay = OutboxRelay(
                db,
                self._sink_factory(hub),
                owner=hub.node_id,
                observe=_observer(pending, oldest),
                poll_interval=api_settings.event_outbox_poll_interval,
                takeover_after=api_settings.event_outbox_takeover_after,
                flush_timeout=api_settings.event_outbox_flush_timeout,
            )
            app.state.api = ApiContext(
                settings=settings,
                api_settings=api_settings,
                hub=hub,
                db=db,
                passwords=Passwords(
                    time_cost=api_settings.argon2_time_cost,
                    memory_kib=api_settings.argon2_memory_kib,
                    parallelism=api_settings.argon2_parallelism,
                ),
                avatars=AvatarStorage(
                    settings.data_dir / "avatars", max_bytes=api_settings.avatar_max_bytes
                ),
                publisher=Outbox(relay),
            )
            hub.authenticator.add_service_key_verifier(_key_verifier(db))
            checks = getattr(app.state, "readiness_checks", None)
            if isinstance(checks, dict):
                checks["database"] = _database_check(db)
            relay_task = asyncio.create_task(relay.run(), name="herald-outbox-relay")
            try:
                yield
            finally:
                relay_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay_task
                # One last, bounded pass: what this worker staged goes out now if it
                # can (otherwise another worker or the next start takes it over).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(api_settings.event_outbox_flush_timeout):
                        await relay.relay_once()
        finally:
            await db.aclose()


def _outbox_gauges(hub: Hub) -> tuple[Gauge, Gauge]:
    """The outbox as every worker sees it (one table): the highest live value is it."""
    registry = hub.metrics.registry
    pending = Gauge(
        "herald_event_outbox_pending",
        "Users-API events and revocations written but not yet delivered to the hub",
        registry=registry,
        multiprocess_mode="livemax",
    )
    oldest = Gauge(
        "herald_event_outbox_oldest_seconds",
        "Age of the oldest undelivered outbox entry (0 if none)",
        registry=registry,
        multiprocess_mode="livemax",
    )
    return pending, oldest


def _observer(pending: Gauge, oldest: Gauge) -> Callable[[int, float], None]:
    def observe(count: int, age: float) -> None:
        pending.set(count)
        oldest.set(age)

    return observe


def _key_verifier(db: Database) -> Callable[[str], Awaitable[Principal | None]]:
    async def verify(key: str) -> Principal | None:
        try:
            async with db.session() as session:
                return await api_key_service.verify(session=session, key=key)
        except SQLAlchemyError:
            logger.exception("API key lookup failed")
            raise HubError(
                hub_errors.UNAVAILABLE,
                "credential store unavailable, retry shortly",
                temporary=True,
            ) from None

    return verify


def _database_check(db: Database) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        async with db.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return True

    return check


def create_app(
    settings: Settings | None = None, *, api_settings: ApiSettings | None = None
) -> FastAPI:
    """The hub and the users API in one ASGI app (the factory ``herald serve`` runs)."""
    return create_hub_app(settings, extensions=[UsersApi(api_settings)])
