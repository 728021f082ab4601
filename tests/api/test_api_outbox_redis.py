"""The event outbox across a real Redis outage (the app in process, on a test-owned
redis-server that the test stops and starts again by PID).

A change committed while Redis is down is answered; its events and the revocation wait
in the outbox; once Redis is back (same port, the hub's broker reconnects by itself) the
relay delivers them: they are in Redis's history and the revocation is in Redis. Runs on
SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from api_helpers import make_admin, pending, published, user_with_token

from api.context import ApiContext
from api.schemas import UserAdminUpdate, UserUpdate
from api.services import users
from api.settings import ApiSettings
from hub.settings import Settings

pytestmark = [pytest.mark.timeout(90)]


@pytest.fixture
def own_redis(redis_server_factory: Callable[..., Any]) -> Any:
    return redis_server_factory()


@pytest.fixture
def settings(settings: Settings, own_redis: Any, unique_prefix: str) -> Settings:
    return settings.model_copy(update={"redis_url": own_redis.url, "redis_prefix": unique_prefix})


@pytest.fixture
def api_settings(api_settings: ApiSettings) -> ApiSettings:
    return api_settings.model_copy(
        update={"event_outbox_poll_interval": 0.1, "event_outbox_flush_timeout": 2.0}
    )


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


async def test_events_committed_while_redis_is_down_are_delivered_when_it_is_back(
    client: Any, context: ApiContext, own_redis: Any
) -> None:
    user, _ = await user_with_token(client, full_name="Before")
    admin, _ = await make_admin(context, client)
    user_id = uuid.UUID(user["id"])
    assert await context.hub.broker.get_user_not_before(user["id"]) is None

    own_redis.stop()
    await wait_until(
        lambda: _disconnected(context), 10, "the broker did not notice that Redis is down"
    )
    async with context.db.session() as session:
        me = await users.get_user(session=session, user_id=user_id)
        await users.update_profile(
            session=session,
            publisher=context.publisher,
            user=me,
            user_update=UserUpdate(full_name="During the outage"),
        )
    async with context.db.session() as session:
        actor = await users.get_user(session=session, user_id=admin.id)
        await users.admin_update(
            session=session,
            publisher=context.publisher,
            actor=actor,
            user_id=user_id,
            change=UserAdminUpdate(status="suspended"),
        )
    waiting = await pending(context.db)
    assert [(e.kind, e.payload.get("event")) for e in waiting] == [
        ("publish", "user.updated"),
        ("publish", "user.updated"),
        ("publish", "user.status_changed"),
        ("publish", "user.status_changed"),
        ("revoke", None),
    ]
    assert all(e.attempts >= 1 for e in waiting)  # the relay tried, and kept them

    own_redis.start()  # same port; the data is gone (no AOF), the events are not
    await wait_until(
        lambda: _outbox_empty(context), 30, "the outbox was not delivered after Redis came back"
    )
    events = await published(context, f"user:{user['id']}")
    assert [e for e, _ in events] == ["user.updated", "user.status_changed"]
    assert events[0][1]["user"]["full_name"] == "During the outage"
    assert events[1][1]["new"] == "suspended"
    directory = [e for e, _ in await published(context, "users")]
    assert directory == ["user.updated", "user.status_changed"]
    assert await context.hub.broker.get_user_not_before(user["id"]) is not None


async def _disconnected(context: ApiContext) -> bool:
    return not context.hub.broker.connected


async def _outbox_empty(context: ApiContext) -> bool:
    return not await pending(context.db)
