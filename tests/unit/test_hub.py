"""hub.hub.Hub over the MemoryBroker: refcounted subscriptions, gapless recovery, limits,
publishing rules, disconnect/revoke, drain and token expiry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from hub import errors
from hub.connection import Connection
from hub.errors import HubError
from hub.hub import Hub, SubscribeResult
from hub.protocol import EncodedMessage, StreamPosition
from hub.settings import Settings

from .conftest import SpyBroker, running_hub, service, user, wait_until


@pytest.fixture
async def hub(settings_factory: Callable[..., Settings]) -> AsyncIterator[Hub]:
    async with running_hub(settings_factory()) as hub:
        yield hub


def spy(hub: Hub) -> SpyBroker:
    assert isinstance(hub.broker, SpyBroker)
    return hub.broker


def data(n: int) -> bytes:
    return orjson.dumps({"n": n})


async def publish(hub: Hub, channel: str, *ns: int) -> None:
    for n in ns:
        await hub.publish_encoded(channel, "msg", data(n))


async def drain_outbox(conn: Connection) -> list[Any]:
    """Everything queued for ``conn`` right now (bytes decoded as JSON objects)."""
    batch = await conn.next_batch(0.01)
    assert batch is not None
    return [orjson.loads(item) if isinstance(item, bytes) else item.publication for item in batch]


def ns(items: list[Any]) -> list[int]:
    return [orjson.loads(item.data)["n"] for item in items if hasattr(item, "data")]


# -- subscriptions refcount the broker -------------------------------------------------------


async def test_first_subscriber_subscribes_the_broker_last_unsubscribes(hub: Hub) -> None:
    broker = spy(hub)
    a = await hub.open_connection(user("1"), "websocket")
    b = await hub.open_connection(user("2"), "websocket")
    await hub.subscribe(a, "public:x")
    await hub.subscribe(b, "public:x")
    assert broker.subscribe_calls == [("public:x",)]
    assert broker.subscribed == {"public:x"}
    await hub.unsubscribe(a, "public:x")
    await asyncio.sleep(0.01)
    assert broker.unsubscribe_calls == []
    await hub.unsubscribe(b, "public:x")
    await wait_until(lambda: broker.subscribed == set())
    assert broker.unsubscribe_calls == [("public:x",)]


async def test_concurrent_first_subscribers_subscribe_the_broker_once(hub: Hub) -> None:
    conns = [await hub.open_connection(user(str(n)), "websocket") for n in range(5)]
    await asyncio.gather(*(hub.subscribe(c, "public:x") for c in conns))
    assert spy(hub).subscribe_calls == [("public:x",)]


async def test_releasing_the_last_connection_unsubscribes_the_broker(hub: Hub) -> None:
    broker = spy(hub)
    a = await hub.open_connection(user("1"), "websocket")
    await hub.subscribe(a, "public:x")
    await hub.subscribe(a, "user:1")
    hub.release_connection(a)
    await wait_until(lambda: broker.subscribed == set())
    assert sorted(broker.unsubscribe_calls) == [("public:x",), ("user:1",)]
    hub.release_connection(a)  # a second release is a no-op
    assert len(hub.registry) == 0


async def test_resubscribe_after_unsubscribe_subscribes_the_broker_again(hub: Hub) -> None:
    broker = spy(hub)
    a = await hub.open_connection(user("1"), "websocket")
    await hub.subscribe(a, "public:x")
    await hub.unsubscribe(a, "public:x")
    await hub.subscribe(a, "public:x")
    await asyncio.sleep(0.01)  # let the background reconcile of the unsubscribe run
    assert broker.subscribed == {"public:x"}
    await publish(hub, "public:x", 1)
    assert ns(await drain_outbox(a)) == [1]


# -- subscribe results and recovery ------------------------------------------------------------


async def test_subscribe_without_since_delivers_only_newer_messages(hub: Hub) -> None:
    await publish(hub, "public:x", 1, 2)
    a = await hub.open_connection(user("1"), "websocket")
    result = await hub.subscribe(a, "public:x")
    assert result.channel == "public:x"
    assert result.position.offset == 2
    assert result.recovered is None
    assert a.positions["public:x"] == result.position
    assert await drain_outbox(a) == []
    await publish(hub, "public:x", 3)
    assert ns(await drain_outbox(a)) == [3]


async def test_subscribe_with_since_replays_missed_messages(hub: Hub) -> None:
    await publish(hub, "public:x", 1, 2, 3, 4)
    top = await hub.broker.position("public:x")
    a = await hub.open_connection(user("1"), "websocket")
    result = await hub.subscribe(a, "public:x", StreamPosition(2, top.epoch))
    assert result.recovered is True
    assert result.position == top
    # The connection's position is where the client stands until the writer sends the
    # replay (an SSE cursor built now must not skip it).
    assert a.positions["public:x"] == StreamPosition(2, top.epoch)
    assert ns(await drain_outbox(a)) == [3, 4]


async def test_subscribe_with_since_at_the_top_recovers_nothing_missing(hub: Hub) -> None:
    await publish(hub, "public:x", 1)
    top = await hub.broker.position("public:x")
    a = await hub.open_connection(user("1"), "websocket")
    result = await hub.subscribe(a, "public:x", top)
    assert result.recovered is True
    assert await drain_outbox(a) == []


async def test_subscribe_with_unknown_epoch_is_not_recovered(hub: Hub) -> None:
    await publish(hub, "public:x", 1, 2)
    a = await hub.open_connection(user("1"), "websocket")
    result = await hub.subscribe(a, "public:x", StreamPosition(1, "other-epoch"))
    assert result.recovered is False
    assert result.position.offset == 2
    assert await drain_outbox(a) == []  # nothing replayed: the client must refetch


async def test_subscribe_with_since_older_than_history_is_not_recovered(
    settings_factory: Callable[..., Settings],
) -> None:
    async with running_hub(settings_factory(history_size=2)) as hub:
        await publish(hub, "public:x", 1, 2, 3, 4)
        top = await hub.broker.position("public:x")
        a = await hub.open_connection(user("1"), "websocket")
        assert (await hub.subscribe(a, "public:x", StreamPosition(1, top.epoch))).recovered is False
        b = await hub.open_connection(user("2"), "websocket")
        result = await hub.subscribe(b, "public:x", StreamPosition(2, top.epoch))
        assert result.recovered is True
        assert ns(await drain_outbox(b)) == [3, 4]


async def test_live_messages_during_recovery_arrive_once_in_order(hub: Hub) -> None:
    broker = spy(hub)
    await publish(hub, "public:x", 1, 2, 3)
    epoch = (await broker.position("public:x")).epoch

    async def before() -> None:  # published live after the subscribe, before history
        await publish(hub, "public:x", 4)

    async def after() -> None:  # published live after history was read
        await publish(hub, "public:x", 5, 6)

    broker.before_history, broker.after_history = before, after
    a = await hub.open_connection(user("1"), "websocket")
    result = await hub.subscribe(a, "public:x", StreamPosition(1, epoch))
    broker.before_history = broker.after_history = None
    assert result.recovered is True
    await publish(hub, "public:x", 7)
    assert ns(await drain_outbox(a)) == [2, 3, 4, 5, 6, 7]


async def test_fresh_subscribe_starts_right_after_the_reported_top(hub: Hub) -> None:
    broker = spy(hub)
    original_position = broker.position

    async def racing_position(channel: str) -> StreamPosition:
        await publish(hub, "public:x", 1)  # lands between the broker subscribe and the top
        return await original_position(channel)

    broker.position = racing_position  # type: ignore[method-assign]
    a = await hub.open_connection(user("1"), "websocket")
    result = await hub.subscribe(a, "public:x")
    broker.position = original_position  # type: ignore[method-assign]
    assert result.position.offset == 1
    await publish(hub, "public:x", 2)
    # Message 1 was at or below the reported top: not delivered (the client starts at the
    # top); message 2 is live.
    assert ns(await drain_outbox(a)) == [2]


async def test_subscribe_reply_is_queued_before_the_replay(hub: Hub) -> None:
    await publish(hub, "public:x", 1, 2, 3)
    epoch = (await hub.broker.position("public:x")).epoch
    a = await hub.open_connection(user("1"), "websocket")
    seen: list[SubscribeResult] = []

    def reply(result: SubscribeResult) -> bytes:
        seen.append(result)
        return orjson.dumps({"op": "ack", "id": 1, "offset": result.position.token()})

    await hub.subscribe(a, "public:x", StreamPosition(0, epoch), reply)
    items = await drain_outbox(a)
    assert items[0] == {"op": "ack", "id": 1, "offset": f"3:{epoch}"}
    assert ns(items[1:]) == [1, 2, 3]
    assert seen[0].recovered is True


# -- subscribe errors --------------------------------------------------------------------------


async def subscribe_error(hub: Hub, conn: Connection, channel: object) -> HubError:
    with pytest.raises(HubError) as info:
        await hub.subscribe(conn, channel)
    return info.value


async def test_subscribe_twice_is_already_subscribed(hub: Hub) -> None:
    a = await hub.open_connection(user("1"), "websocket")
    await hub.subscribe(a, "public:x")
    assert (await subscribe_error(hub, a, "public:x")).code == errors.ALREADY_SUBSCRIBED
    assert spy(hub).subscribe_calls == [("public:x",)]


async def test_too_many_channels(settings_factory: Callable[..., Settings]) -> None:
    async with running_hub(settings_factory(max_channels_per_connection=2)) as hub:
        a = await hub.open_connection(user("1"), "websocket")
        await hub.subscribe(a, "public:1")
        await hub.subscribe(a, "public:2")
        error = await subscribe_error(hub, a, "public:3")
        assert error.code == errors.TOO_MANY_CHANNELS and "2" in error.message
        assert a.channels == {"public:1", "public:2"}
        assert not hub.registry.has_subscribers("public:3")
        await hub.unsubscribe(a, "public:1")
        await hub.subscribe(a, "public:3")


async def test_forbidden_and_bad_channels_leave_no_trace(hub: Hub) -> None:
    a = await hub.open_connection(user("1"), "websocket")
    assert (await subscribe_error(hub, a, "user:2")).code == errors.FORBIDDEN
    assert (await subscribe_error(hub, a, "users")).code == errors.FORBIDDEN
    assert (await subscribe_error(hub, a, "bad channel")).code == errors.BAD_CHANNEL
    assert (await subscribe_error(hub, a, None)).code == errors.BAD_CHANNEL
    assert a.channels == set()
    assert spy(hub).subscribe_calls == []


async def test_unsubscribe_unknown_channel_is_not_subscribed(hub: Hub) -> None:
    a = await hub.open_connection(user("1"), "websocket")
    for channel in ("public:x", None, 5):
        with pytest.raises(HubError) as info:
            await hub.unsubscribe(a, channel)
        assert info.value.code == errors.NOT_SUBSCRIBED


async def test_unsubscribed_connection_receives_nothing_more(hub: Hub) -> None:
    a = await hub.open_connection(user("1"), "websocket")
    b = await hub.open_connection(user("2"), "websocket")
    await hub.subscribe(a, "public:x")
    await hub.subscribe(b, "public:x")
    assert await hub.unsubscribe(a, "public:x") == "public:x"
    await publish(hub, "public:x", 1)
    assert await drain_outbox(a) == []
    assert ns(await drain_outbox(b)) == [1]


async def test_fanout_from_the_broker_shares_one_encoding(hub: Hub) -> None:
    conns = [await hub.open_connection(user(str(n)), "websocket") for n in range(3)]
    for c in conns:
        await hub.subscribe(c, "public:x")
    await publish(hub, "public:x", 1)
    batches = [await c.next_batch(0.01) for c in conns]
    firsts = [batch[0] for batch in batches if batch]
    assert len(firsts) == 3
    assert isinstance(firsts[0], EncodedMessage)
    assert all(item is firsts[0] for item in firsts)


# -- publishing --------------------------------------------------------------------------------


async def test_publish_as_follows_the_policy(hub: Hub) -> None:
    for principal, channel in [
        (user("1"), "public:x"),
        (user("1"), "user:1"),
        (user("1", role="admin"), "user:1"),
        (user("1", role="admin"), "users"),
    ]:
        with pytest.raises(HubError) as info:
            await hub.publish_as(principal, channel, "msg", b"1")
        assert info.value.code == errors.FORBIDDEN
    assert (await hub.publish_as(user("1", role="admin"), "public:x", "msg", b"1")).offset == 1
    assert (await hub.publish_as(service(), "user:9", "msg", b"1")).channel == "user:9"
    with pytest.raises(HubError) as info:
        await hub.publish_as(service(), "bad channel", "msg", b"1")
    assert info.value.code == errors.BAD_CHANNEL


async def test_publish_offsets_grow_by_one(hub: Hub) -> None:
    pubs = [await hub.publish("public:x", "msg", {"n": n}) for n in range(3)]
    assert [p.offset for p in pubs] == [1, 2, 3]
    assert len({p.epoch for p in pubs}) == 1
    batch = await hub.publish_many([("public:x", "msg", 1), ("public:y", "msg", 2)])
    assert [(p.channel, p.offset) for p in batch] == [("public:x", 4), ("public:y", 1)]


async def test_message_too_large(settings_factory: Callable[..., Settings]) -> None:
    async with running_hub(settings_factory(max_message_bytes=256)) as hub:
        ok = b'"' + b"x" * 254 + b'"'
        assert (await hub.publish_encoded("public:x", "msg", ok)).offset == 1
        with pytest.raises(HubError) as info:
            await hub.publish_encoded("public:x", "msg", ok + b" ")
        assert info.value.code == errors.MESSAGE_TOO_LARGE and "256" in info.value.message
        with pytest.raises(HubError) as info:
            await hub.publish_many([("public:x", "msg", 1), ("public:x", "msg", "y" * 300)])
        assert info.value.code == errors.MESSAGE_TOO_LARGE
        # Nothing of the refused batch was published.
        assert (await hub.broker.position("public:x")).offset == 1


async def test_publish_validates_event_channel_and_data(hub: Hub) -> None:
    with pytest.raises(HubError) as info:
        await hub.publish("public:x", "bad event", 1)
    assert info.value.code == errors.BAD_REQUEST
    with pytest.raises(HubError) as info:
        await hub.publish("public:{x}", "msg", 1)
    assert info.value.code == errors.BAD_CHANNEL
    with pytest.raises(HubError) as info:
        await hub.publish("public:x", "msg", object())
    assert info.value.code == errors.BAD_REQUEST


# -- connections: limits, disconnect, revoke, drain, expiry ---------------------------------------


async def test_connection_limit_per_user(settings_factory: Callable[..., Settings]) -> None:
    async with running_hub(settings_factory(max_connections_per_user=2)) as hub:
        a = await hub.open_connection(user("1"), "websocket")
        await hub.open_connection(user("1"), "sse")
        with pytest.raises(errors.Refused) as info:
            await hub.open_connection(user("1"), "websocket")
        assert info.value.disconnect is errors.CONNECTION_LIMIT
        await hub.open_connection(user("2"), "websocket")  # other users are not affected
        for _ in range(3):
            await hub.open_connection(service(), "websocket")  # services are not limited per user
        hub.release_connection(a)
        await hub.open_connection(user("1"), "websocket")


async def claim_slot(hub_broker: Any, user_id: str, slot: str, limit: int, ttl: int) -> bool:
    [held] = await hub_broker.claim_connection_slots([(user_id, slot)], limit, ttl)
    return bool(held)


async def test_connection_limit_counts_the_other_workers_connections(
    settings_factory: Callable[..., Settings],
) -> None:
    # Slots held in the broker by "another worker" count against this worker's users.
    async with running_hub(settings_factory(max_connections_per_user=3)) as hub:
        for n in range(2):
            assert await claim_slot(hub.broker, "1", f"elsewhere-{n}", 3, 30)
        mine = await hub.open_connection(user("1"), "websocket")
        with pytest.raises(errors.Refused) as info:
            await hub.open_connection(user("1"), "sse")
        assert info.value.disconnect is errors.CONNECTION_LIMIT
        await hub.broker.release_connection_slots({"1": ["elsewhere-0"]})
        await hub.open_connection(user("1"), "sse")  # the other worker's client left
        assert mine.closed is None


async def test_a_closed_connection_frees_its_slot_for_an_immediate_reconnect(
    settings_factory: Callable[..., Settings],
) -> None:
    async with running_hub(settings_factory(max_connections_per_user=1)) as hub:
        first = await hub.open_connection(user("1"), "websocket")
        hub.release_connection(first)  # the release is queued...
        await hub.open_connection(user("1"), "websocket")  # ...and sent before this claim
        # A slot freed by a connection that ended is free in the broker too.
        second = await hub.open_connection(user("2"), "websocket")
        hub.release_connection(second)
        await wait_until(lambda: not hub.slots._releases)
        assert await claim_slot(hub.broker, "2", "elsewhere", 1, 30)


async def test_held_slots_are_refreshed_and_those_of_a_dead_worker_expire(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(max_connections_per_user=2, connection_slot_ttl=2)
    async with running_hub(settings) as hub:
        await hub.open_connection(user("1"), "websocket")
        assert await claim_slot(hub.broker, "1", "dead-worker", 2, 2)
        with pytest.raises(errors.Refused):
            await hub.open_connection(user("1"), "websocket")
        await asyncio.sleep(3)  # past the TTL: refreshed for the live one only
        await hub.open_connection(user("1"), "websocket")
        with pytest.raises(errors.Refused):
            await hub.open_connection(user("1"), "websocket")


async def test_claims_made_together_take_one_round_trip(
    settings_factory: Callable[..., Settings],
) -> None:
    async with running_hub(settings_factory(max_connections_per_user=2)) as hub:
        calls: list[int] = []
        real = hub.broker.claim_connection_slots

        async def counting(claims: Any, limit: int, ttl: int) -> list[bool]:
            calls.append(len(claims))
            return await real(claims, limit, ttl)

        hub.broker.claim_connection_slots = counting  # type: ignore[method-assign]
        opened = await asyncio.gather(
            *(hub.open_connection(user(str(n % 3)), "websocket") for n in range(6)),
            return_exceptions=True,
        )
        assert calls == [6]
        assert all(isinstance(conn, Connection) for conn in opened)  # 2 per user: all fit
        with pytest.raises(errors.Refused):
            await hub.open_connection(user("0"), "sse")
        assert calls == [6]  # this worker alone holds the limit: refused with no round trip


async def test_a_connection_that_gives_up_while_claiming_frees_its_slot(
    settings_factory: Callable[..., Settings],
) -> None:
    async with running_hub(settings_factory(max_connections_per_user=1)) as hub:
        opening = asyncio.ensure_future(hub.open_connection(user("1"), "websocket"))
        await asyncio.sleep(0)  # the claim is queued...
        opening.cancel()  # ...and its client goes away before the broker answers
        with pytest.raises(asyncio.CancelledError):
            await opening
        await wait_until(lambda: not hub.slots._claims and not hub.slots._releases)
        assert not hub.registry.connections
        assert await claim_slot(hub.broker, "1", "elsewhere", 1, 30)  # nothing left held


async def test_a_broker_that_cannot_be_asked_refuses_with_unavailable(
    settings_factory: Callable[..., Settings],
) -> None:
    from hub.broker import BrokerUnavailable

    async with running_hub(settings_factory()) as hub:

        async def down(*args: Any, **kwargs: Any) -> list[bool]:
            raise BrokerUnavailable("down (test)")

        hub.broker.claim_connection_slots = down  # type: ignore[method-assign]
        with pytest.raises(errors.Refused) as info:
            await hub.open_connection(user("1"), "websocket")
        assert info.value.disconnect is errors.BROKER_UNAVAILABLE
        assert not hub.registry.connections
        await hub.open_connection(service(), "websocket")  # services need no slot


async def test_disconnect_user_closes_only_that_users_connections_and_revokes(hub: Hub) -> None:
    tokens = hub.authenticator.tokens
    old_token = tokens.issue("7")
    principal = await hub.authenticator.authenticate_token(old_token)
    a = await hub.open_connection(principal, "websocket")
    b = await hub.open_connection(principal, "sse")
    other = await hub.open_connection(user("8"), "websocket")
    await hub.disconnect_user("7")
    assert a.closed is errors.USER_DISABLED and b.closed is errors.USER_DISABLED
    assert other.closed is None
    with pytest.raises(HubError) as info:
        await hub.authenticator.authenticate_token(old_token)
    assert info.value.code == errors.UNAUTHORIZED and "revoked" in info.value.message
    assert (await hub.authenticator.authenticate_token(tokens.issue("8"))).subject == "8"


async def test_disconnect_user_without_revoke_forces_reconnect(hub: Hub) -> None:
    token = hub.authenticator.tokens.issue("7")
    a = await hub.open_connection(await hub.authenticator.authenticate_token(token), "websocket")
    await hub.disconnect_user("7", revoke=False, disconnect=errors.FORCE_RECONNECT)
    assert a.closed is errors.FORCE_RECONNECT and a.closed.reconnect
    assert (await hub.authenticator.authenticate_token(token)).subject == "7"


async def test_unknown_control_command_is_ignored(hub: Hub) -> None:
    a = await hub.open_connection(user("7"), "websocket")
    await hub.broker.send_control({"type": "nonsense", "user": "7"})
    await hub.broker.send_control({"type": "disconnect_user", "user": 7})
    assert a.closed is None


async def test_drain_closes_everything_with_shutdown_and_refuses_new(hub: Hub) -> None:
    conns = [await hub.open_connection(user(str(n)), "websocket") for n in range(3)]
    started = time.monotonic()
    await hub.drain(grace=0.1)
    assert time.monotonic() - started < 2
    assert all(c.closed is errors.SHUTDOWN for c in conns)
    assert not hub.accepting
    with pytest.raises(errors.Refused) as info:
        await hub.open_connection(user("9"), "websocket")
    assert info.value.disconnect is errors.SHUTDOWN


async def test_drain_returns_as_soon_as_connections_are_released(hub: Hub) -> None:
    conns = [await hub.open_connection(user(str(n)), "websocket") for n in range(2)]

    async def handler(conn: Connection) -> None:  # what a transport does on close
        await conn.wait_closed()
        hub.release_connection(conn)

    tasks = [asyncio.ensure_future(handler(c)) for c in conns]
    started = time.monotonic()
    await hub.drain(grace=5)
    assert time.monotonic() - started < 1
    await asyncio.gather(*tasks)


async def test_token_expiry_closes_the_connection(hub: Hub) -> None:
    a = await hub.open_connection(user("1", expires_at=time.time() + 0.1), "websocket")
    forever = await hub.open_connection(user("2"), "websocket")
    await asyncio.wait_for(a.wait_closed(), 2)
    assert a.closed is errors.TOKEN_EXPIRED_DISCONNECT
    assert forever.closed is None


async def test_refresh_extends_the_connection(hub: Hub) -> None:
    tokens = hub.authenticator.tokens
    a = await hub.open_connection(user("1", expires_at=time.time() + 0.15), "websocket")
    principal = await hub.refresh(a, tokens.issue("1", ttl=600))
    assert a.principal is principal and principal.expires_at is not None
    await asyncio.sleep(0.3)
    assert a.closed is None


async def test_refresh_with_another_subjects_token_is_forbidden(hub: Hub) -> None:
    a = await hub.open_connection(user("1"), "websocket")
    with pytest.raises(HubError) as info:
        await hub.refresh(a, hub.authenticator.tokens.issue("2"))
    assert info.value.code == errors.FORBIDDEN
    assert a.principal.subject == "1"


async def test_refresh_with_an_invalid_token_is_unauthorized(hub: Hub) -> None:
    a = await hub.open_connection(user("1"), "websocket")
    with pytest.raises(HubError) as info:
        await hub.refresh(a, "not-a-token")
    assert info.value.code == errors.UNAUTHORIZED


async def test_slow_subscriber_is_dropped_and_counted(
    settings_factory: Callable[..., Settings],
) -> None:
    async with running_hub(settings_factory(outbox_max_messages=8)) as hub:
        slow = await hub.open_connection(user("1"), "websocket")
        fast = await hub.open_connection(user("2"), "websocket")
        await hub.subscribe(slow, "public:x")
        await hub.subscribe(fast, "public:x")
        got: list[int] = []
        for n in range(20):
            await publish(hub, "public:x", n)
            got += ns(await drain_outbox(fast))
        assert slow.closed is errors.SLOW_CONSUMER
        assert got == list(range(20))
        assert b"herald_slow_consumer_disconnects_total 1.0" in hub.metrics.render()


# -- broker outage resync ------------------------------------------------------------------------


async def test_broker_reconnect_refills_missed_messages_once_in_order(hub: Hub) -> None:
    broker = spy(hub)
    a = await hub.open_connection(user("1"), "websocket")
    await hub.subscribe(a, "public:x")
    await publish(hub, "public:x", 1)
    hub.on_broker_state(False)
    broker._subscribed.discard("public:x")  # live delivery is lost during the outage
    await publish(hub, "public:x", 2, 3)
    broker._subscribed.add("public:x")
    hub.on_broker_state(True)
    await wait_until(lambda: a.outbox_size >= 3)
    await publish(hub, "public:x", 4)
    assert ns(await drain_outbox(a)) == [1, 2, 3, 4]
    assert a.closed is None


async def test_broker_reconnect_past_history_makes_subscribers_resubscribe(
    settings_factory: Callable[..., Settings],
) -> None:
    async with running_hub(settings_factory(history_size=1)) as hub:
        broker = spy(hub)
        a = await hub.open_connection(user("1"), "websocket")
        await hub.subscribe(a, "public:x")
        broker._subscribed.discard("public:x")
        await publish(hub, "public:x", 1, 2, 3)
        broker._subscribed.add("public:x")
        hub.on_broker_state(True)
        await asyncio.wait_for(a.wait_closed(), 2)
        assert a.closed is errors.INSUFFICIENT_STATE and a.closed.reconnect


async def test_lost_writes_seen_at_a_resync_give_the_channel_a_new_epoch(hub: Hub) -> None:
    broker = spy(hub)
    a = await hub.open_connection(user("1"), "websocket")
    await hub.subscribe(a, "public:lossy")
    await publish(hub, "public:lossy", 1, 2, 3, 4, 5)
    old = await broker.position("public:lossy")
    assert old.offset == 5
    hub.on_broker_state(False)
    # Redis comes back without its last two writes, same epoch (an AOF tail, a lagging
    # replica): the top is 3, behind the 5 this worker delivered.
    stream = broker._streams["public:lossy"]
    stream.offset = 3
    while stream.entries and stream.entries[-1][1].offset > 3:
        stream.entries.pop()
    hub.on_broker_state(True)
    await asyncio.wait_for(a.wait_closed(), 2)
    assert a.closed is errors.INSUFFICIENT_STATE  # told to resubscribe, not left deaf
    top = await broker.position("public:lossy")
    assert top.epoch != old.epoch  # so offset 4 and 5 can never be mistaken...
    await publish(hub, "public:lossy", 6)
    for seen in (4, 5):  # ...for the new messages that reuse them
        history = await broker.history("public:lossy", since=StreamPosition(seen, old.epoch))
        assert history.recovered is False
    b = await hub.open_connection(user("2"), "websocket")
    result = await hub.subscribe(b, "public:lossy", since=StreamPosition(4, old.epoch))
    assert result.recovered is False
