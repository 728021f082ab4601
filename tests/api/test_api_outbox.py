"""The event outbox: a committed change's events and revocations are never lost.

The relay's sink is wrapped so that the broker can be "down" on demand (the real hub
publisher behind it): a change made while it is down is committed and answered, its
events wait in the outbox and go out, in order, once it is back. Entries the hub refuses
for good are dropped without blocking the rest; entries of a dead worker are taken
over; entries written without a hub (the CLI) are delivered by a running server; two
relays never deliver one entry twice. Runs on SQLite and PostgreSQL. (The same outage
with a real redis-server stopped and restarted: test_api_outbox_redis.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from typing import Any

import pytest
from api_helpers import (
    bearer,
    make_admin,
    pending,
    published,
    published_events,
    user_with_token,
)
from sqlalchemy import delete, update
from sqlalchemy.exc import OperationalError

from api.context import ApiContext
from api.db import Database, utcnow
from api.events import Event
from api.migrate import upgrade
from api.models import OutboxEntry
from api.outbox import MAX_UNEXPECTED_FAILURES, HubSink, Outbox, OutboxRelay
from api.settings import ApiSettings
from hub import errors as hub_errors
from hub.errors import HubError


class SwitchableSink:
    """The real hub sink, behind a switch that makes the broker look unavailable."""

    def __init__(self, hub: Any) -> None:
        self.inner = HubSink(hub)
        self.down = False
        self.attempts = 0
        self.revocations: list[tuple[str, float]] = []

    def _check(self) -> None:
        self.attempts += 1
        if self.down:
            raise HubError(hub_errors.UNAVAILABLE, "broker down (test)", temporary=True)

    async def publish(self, events: Sequence[Event]) -> None:
        self._check()
        await self.inner.publish(events)

    async def revoke_user(self, user_id: str, not_before: float) -> None:
        self._check()
        self.revocations.append((user_id, not_before))
        await self.inner.revoke_user(user_id, not_before)


@pytest.fixture
def sinks() -> list[SwitchableSink]:
    return []


@pytest.fixture
def sink_factory(sinks: list[SwitchableSink]) -> Callable[[Any], SwitchableSink]:
    def build(hub: Any) -> SwitchableSink:
        sink = SwitchableSink(hub)
        sinks.append(sink)
        return sink

    return build


@pytest.fixture
def api_settings(api_settings: ApiSettings) -> ApiSettings:
    return api_settings.model_copy(
        update={"event_outbox_poll_interval": 0.05, "event_outbox_flush_timeout": 2.0}
    )


@pytest.fixture
def sink(app: Any, sinks: list[SwitchableSink]) -> SwitchableSink:
    return sinks[0]


async def wait_for_empty_outbox(context: ApiContext, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while await pending(context.db):
        assert time.monotonic() < deadline, "the outbox was not delivered"
        await asyncio.sleep(0.05)


async def test_events_of_a_change_made_while_the_broker_is_down_go_out_later(
    client: Any, context: ApiContext, sink: SwitchableSink
) -> None:
    user, token = await user_with_token(client, full_name="Ada")
    channel = f"user:{user['id']}"
    sink.down = True
    names = ["Ada B", "Ada C", "Ada D"]
    for name in names:
        response = await client.patch(
            "/api/v1/users/me", json={"full_name": name}, headers=bearer(token)
        )
        assert response.status_code == 200  # committed: the outage is not the client's
        assert response.json()["full_name"] == name
    waiting = await pending(context.db)
    assert [e.payload["event"] for e in waiting] == ["user.updated"] * 6
    assert all(e.attempts >= 1 for e in waiting)  # tried, and kept
    assert await published_events(context, channel) == ["user.created"]

    sink.down = False
    await wait_for_empty_outbox(context)
    events = await published(context, channel)
    assert [e for e, _ in events] == ["user.created"] + ["user.updated"] * 3
    assert [data["user"]["full_name"] for _, data in events[1:]] == names  # in order
    directory = await published(context, "users")
    assert [data["user"]["full_name"] for e, data in directory if e == "user.updated"] == names


async def test_a_revocation_made_during_an_outage_is_applied_with_the_change_time(
    client: Any, context: ApiContext, sink: SwitchableSink
) -> None:
    user, token = await user_with_token(client)
    _, admin_token = await make_admin(context, client)
    sink.down = True
    before = time.time()
    response = await client.patch(
        f"/api/v1/users/{user['id']}", json={"status": "suspended"}, headers=bearer(admin_token)
    )
    assert response.status_code == 200
    changed = time.time()
    assert [e.kind for e in await pending(context.db)] == ["publish", "publish", "revoke"]
    assert await context.hub.broker.get_user_not_before(user["id"]) is None

    await asyncio.sleep(0.3)  # the outage lasts: the revocation keeps the change's time
    sink.down = False
    await wait_for_empty_outbox(context)
    not_before = await context.hub.broker.get_user_not_before(user["id"])
    assert not_before is not None and before <= not_before <= changed
    assert sink.revocations == [(user["id"], not_before)]
    assert "user.status_changed" in await published_events(context, f"user:{user['id']}")
    assert (await client.get("/api/v1/users/me", headers=bearer(token))).status_code == 401


async def test_a_request_waits_for_its_events_only_briefly(
    client: Any, context: ApiContext, sink: SwitchableSink
) -> None:
    user, token = await user_with_token(client)

    async def hanging(events: Sequence[Event]) -> None:
        await asyncio.sleep(30)

    sink.inner.publish = hanging  # type: ignore[method-assign]
    started = time.monotonic()
    response = await client.patch(
        "/api/v1/users/me", json={"full_name": "Patient"}, headers=bearer(token)
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert 1.5 < elapsed < 4.0  # event_outbox_flush_timeout is 2 s
    assert len(await pending(context.db)) == 2  # still there, still on its way


async def test_an_event_the_hub_refuses_is_dropped_and_the_rest_go_out(
    context: ApiContext, sink: SwitchableSink, caplog: pytest.LogCaptureFixture
) -> None:
    async with context.db.session() as session:
        context.publisher.stage(
            session,
            [
                Event("public:outbox", "first", {"n": 1}),
                Event("not a channel!", "broken", {"n": 2}),
                Event("public:outbox", "third", {"n": 3}),
            ],
        )
        await session.commit()
    with caplog.at_level(logging.ERROR, logger="herald.api.outbox"):
        await context.publisher.flush()
        await wait_for_empty_outbox(context)
    assert await published_events(context, "public:outbox") == ["first", "third"]
    assert any("dropped outbox entry" in r.getMessage() for r in caplog.records)


async def test_an_entry_failing_unexpectedly_is_dropped_after_a_few_attempts(
    context: ApiContext, sink: SwitchableSink, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(events: Sequence[Event]) -> None:
        if any(e.event == "poison" for e in events):
            raise RuntimeError("a bug in the sink")
        await HubSink(context.hub).publish(events)

    sink.inner.publish = broken  # type: ignore[method-assign]
    async with context.db.session() as session:
        context.publisher.stage(session, [Event("public:poison", "poison", {})])
        context.publisher.stage(session, [Event("public:poison", "after", {})])
        await session.commit()
    with caplog.at_level(logging.ERROR, logger="herald.api.outbox"):
        await context.publisher.flush()
        await wait_for_empty_outbox(context)
    assert await published_events(context, "public:poison") == ["after"]
    failures = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert len(failures) >= MAX_UNEXPECTED_FAILURES


async def _insert(context: ApiContext, owner: str | None, age: float, attempted: float | None):
    now = utcnow()
    async with context.db.session() as session:
        entry = OutboxEntry(
            kind="publish",
            payload={"channel": "public:orphans", "event": f"from-{owner}", "data": {}},
            owner=owner,
            created_at=now - timedelta(seconds=age),
            attempted_at=None if attempted is None else now - timedelta(seconds=attempted),
        )
        session.add(entry)
        await session.commit()


async def test_entries_of_a_dead_worker_are_taken_over_and_a_live_ones_are_not(
    context: ApiContext, sink: SwitchableSink
) -> None:
    # takeover_after is 30 s (the default).
    await _insert(context, "dead", age=60, attempted=None)  # never attempted, old
    await _insert(context, "stalled", age=90, attempted=45)  # last attempt long ago
    await _insert(context, "busy", age=90, attempted=1)  # alive: retrying right now
    await _insert(context, "young", age=1, attempted=None)  # just written, its own worker
    await context.publisher.flush()
    events = await published_events(context, "public:orphans")
    assert sorted(events) == ["from-dead", "from-stalled"]
    assert sorted(e.owner or "" for e in await pending(context.db)) == ["busy", "young"]


async def test_entries_staged_without_a_hub_are_delivered_by_a_server(
    context: ApiContext, sink: SwitchableSink
) -> None:
    cli = Outbox()  # what `herald users create-admin` uses
    async with context.db.session() as session:
        cli.stage(session, [Event("public:cli", "from-the-cli", {"ok": True})])
        await session.commit()
    await cli.flush()  # nothing to wake: no relay in the CLI
    [entry] = await pending(context.db)
    assert entry.owner is None
    await wait_for_empty_outbox(context)  # the server's relay polls and takes it
    assert await published(context, "public:cli") == [("from-the-cli", {"ok": True})]


async def test_a_rolled_back_change_leaves_nothing_in_the_outbox(
    context: ApiContext, sink: SwitchableSink
) -> None:
    async with context.db.session() as session:
        context.publisher.stage(session, [Event("public:never", "never", {})])
        context.publisher.stage_revocation(session, "nobody")
        await session.rollback()
    await context.publisher.flush()
    assert await pending(context.db) == []
    assert await published_events(context, "public:never") == []
    assert sink.revocations == []


# -- relays on their own (no app running, so no other relay polls the table) -------------


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database.from_url(database_url)
    await upgrade(database.engine)
    async with database.engine.begin() as connection:
        await connection.execute(delete(OutboxEntry))
    try:
        yield database
    finally:
        await database.aclose()


class CountingSink:
    """Records what it is given; ``down`` makes it fail like an unavailable broker."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.down = False

    async def publish(self, events: Sequence[Event]) -> None:
        if self.down:
            raise HubError(hub_errors.UNAVAILABLE, "broker down (test)", temporary=True)
        await asyncio.sleep(0.001)
        self.seen.extend(int(e.data["n"]) for e in events)

    async def revoke_user(self, user_id: str, not_before: float) -> None:
        raise AssertionError("no revocations here")


async def stage(db: Database, outbox: Outbox, ns: range) -> None:
    async with db.session() as session:
        outbox.stage(session, [Event("public:x", "e", {"n": n}) for n in ns])
        await session.commit()


async def test_two_relays_deliver_each_entry_once(db: Database) -> None:
    count = 120
    await stage(db, Outbox(), range(count))  # no owner: both relays compete for them
    sinks = [CountingSink(), CountingSink()]
    relays = [OutboxRelay(db, s, owner=f"relay-{i}", batch_size=10) for i, s in enumerate(sinks)]

    async def drain(relay: OutboxRelay) -> None:
        for _ in range(100):
            await relay.relay_once()
            if not await pending(db):
                return
            await asyncio.sleep(0)

    await asyncio.gather(*(drain(r) for r in relays))
    delivered = sinks[0].seen + sinks[1].seen
    assert sorted(delivered) == list(range(count))  # each once, none lost
    for s in sinks:
        assert s.seen == sorted(s.seen)  # each relay in id order


async def test_a_database_outage_in_the_relay_is_retried(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    sink = CountingSink()
    relay = OutboxRelay(db, sink, owner="probe")
    await stage(db, Outbox(relay), range(1))

    def database_down() -> Any:
        raise OperationalError("connect", {}, Exception("database down (test)"))

    with caplog.at_level(logging.ERROR, logger="herald.api.outbox"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(db, "session", database_down)
            assert await relay.relay_once() is False
    assert any("could not read the event outbox" in r.getMessage() for r in caplog.records)
    assert sink.seen == []
    await relay.relay_once()
    assert sink.seen == [0]
    assert await pending(db) == []


async def test_attempts_keep_an_entry_with_its_worker(db: Database) -> None:
    # A worker retrying through a long outage refreshes attempted_at, so another worker
    # never takes its entries over (that would deliver them twice once it is back).
    sink = CountingSink()
    sink.down = True
    relay = OutboxRelay(db, sink, owner="retrier", takeover_after=30)
    await stage(db, Outbox(relay), range(1))
    async with db.session() as session:
        await session.execute(
            update(OutboxEntry).values(created_at=utcnow() - timedelta(seconds=120))
        )
        await session.commit()
    await relay.relay_once()
    [entry] = await pending(db)
    assert entry.owner == "retrier" and entry.attempts == 1
    assert entry.attempted_at is not None
    assert (utcnow() - entry.attempted_at).total_seconds() < 5
    other_sink = CountingSink()
    await OutboxRelay(db, other_sink, owner="other", takeover_after=30).relay_once()
    [entry] = await pending(db)
    assert entry.owner == "retrier" and other_sink.seen == []
    sink.down = False
    await relay.relay_once()
    assert sink.seen == [0] and await pending(db) == []


async def test_deliver_now_waits_for_a_pass_that_saw_the_commit(db: Database) -> None:
    sink = CountingSink()
    relay = OutboxRelay(db, sink, owner="me", poll_interval=30)  # only wake-ups count
    runner = asyncio.create_task(relay.run())
    try:
        outbox = Outbox(relay)
        for n in range(3):
            await stage(db, outbox, range(n, n + 1))
            await outbox.flush()
            assert sink.seen == list(range(n + 1))  # delivered before flush returned
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def test_the_relay_survives_a_pass_that_fails_unexpectedly(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    sink = CountingSink()
    relay = OutboxRelay(db, sink, owner="me", poll_interval=0.05, flush_timeout=1.0)
    real_pass = relay.relay_once
    calls = 0

    async def flaky_pass() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in a pass (test)")
        return await real_pass()

    relay.relay_once = flaky_pass  # type: ignore[method-assign]
    runner = asyncio.create_task(relay.run())
    try:
        outbox = Outbox(relay)
        await stage(db, outbox, range(1))
        with caplog.at_level(logging.ERROR, logger="herald.api.outbox"):
            started = time.monotonic()
            await outbox.flush()  # the failed pass still answers the waiting request
            assert time.monotonic() - started < 0.9
        for _ in range(100):
            if sink.seen:
                break
            await asyncio.sleep(0.05)
        assert sink.seen == [0]  # the next pass delivered it
        assert any("relay pass failed" in r.getMessage() for r in caplog.records)
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def test_waiting_entries_show_in_the_metrics(
    client: Any, context: ApiContext, sink: SwitchableSink
) -> None:
    async def gauges() -> tuple[float, float]:
        text = (await client.get("/metrics")).text
        values = {}
        for name in ("herald_event_outbox_pending", "herald_event_outbox_oldest_seconds"):
            [line] = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
            values[name] = float(line.split()[1])
        return values["herald_event_outbox_pending"], values["herald_event_outbox_oldest_seconds"]

    async def until(predicate: Callable[[float, float], bool]) -> tuple[float, float]:
        deadline = time.monotonic() + 8  # counted at most once a second, passes back off
        while not predicate(*(values := await gauges())):
            assert time.monotonic() < deadline, f"metrics stayed at {values}"
            await asyncio.sleep(0.1)
        return values

    user, token = await user_with_token(client)
    sink.down = True
    await client.patch("/api/v1/users/me", json={"full_name": "Waiting"}, headers=bearer(token))
    await until(lambda pending, oldest: pending == 2 and oldest >= 1.0)
    sink.down = False
    await wait_for_empty_outbox(context)
    assert await until(lambda pending, oldest: pending == 0) == (0, 0)
