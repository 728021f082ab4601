"""The Broker contract (hub/broker/base.py), one suite run against every backend.

Tests taking ``broker``/``make_broker`` run once per backend (memory, redis). Tests
about several workers sharing one Redis are Redis-only and take ``make_redis_broker``.
Every Redis test runs against the session's own redis-server with its own key prefix.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from hub.broker import Broker, BrokerConfig, PublishRequest, create_broker
from hub.protocol import Publication, StreamPosition

pytestmark = pytest.mark.timeout(60)

BrokerFactory = Callable[..., Awaitable[tuple[Broker, Any]]]


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def broker_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    request.applymarker(pytest.mark.integration)
    return str(request.getfixturevalue("redis_url"))


async def _factory(url: str, prefix: str, handler_class: type[Any]) -> AsyncIterator[BrokerFactory]:
    made: list[Broker] = []

    async def make(
        *,
        history_size: int = 100,
        history_ttl: int = 3600,
        history_overrides: dict[str, tuple[int, int]] | None = None,
        start: bool = True,
    ) -> tuple[Broker, Any]:
        config = BrokerConfig(
            url=url,
            prefix=prefix,
            history_size=history_size,
            history_ttl=history_ttl,
            history_overrides=history_overrides or {},
        )
        broker = create_broker(config)
        made.append(broker)
        handler = handler_class()
        if start:
            await broker.start(handler)
        return broker, handler

    try:
        yield make
    finally:
        for broker in made:
            await broker.aclose()


@pytest.fixture
async def make_broker(
    broker_url: str, unique_prefix: str, recording_handler: type[Any]
) -> AsyncIterator[BrokerFactory]:
    """Build, start (with a RecordingHandler) and finally close brokers of this backend."""
    async for factory in _factory(broker_url, unique_prefix, recording_handler):
        yield factory


@pytest.fixture
async def make_redis_broker(
    redis_url: str, unique_prefix: str, recording_handler: type[Any]
) -> AsyncIterator[BrokerFactory]:
    """Several Redis brokers with the same prefix: each one is a separate worker."""
    async for factory in _factory(redis_url, unique_prefix, recording_handler):
        yield factory


@pytest.fixture
async def pair(make_broker: BrokerFactory) -> tuple[Broker, Any]:
    return await make_broker()


@pytest.fixture
def broker(pair: tuple[Broker, Any]) -> Broker:
    return pair[0]


@pytest.fixture
def recorder(pair: tuple[Broker, Any]) -> Any:
    return pair[1]


async def publish_many(broker: Broker, channel: str, count: int) -> list[Publication]:
    return [await broker.publish(channel, "e", orjson.dumps({"n": n})) for n in range(count)]


async def barrier(broker: Broker, recorder: Any, channel: str = "sync:barrier") -> None:
    """Publish on a subscribed channel and wait for it: every publication made before
    has been delivered by then (one Redis connection delivers in publish order)."""
    if channel not in getattr(recorder, "_barrier_channels", set()):
        await broker.subscribe([channel])
        recorder._barrier_channels = {*getattr(recorder, "_barrier_channels", set()), channel}
    pub = await broker.publish(channel, "barrier", b"null")
    await recorder.wait_for(lambda: pub in recorder.on(channel), what="the barrier publication")


# -- publish and offsets ------------------------------------------------------------------


async def test_publish_assigns_consecutive_offsets_per_channel_with_a_stable_epoch(
    broker: Broker,
) -> None:
    first = await publish_many(broker, "chat:a", 3)
    other = await publish_many(broker, "chat:b", 2)

    assert [p.offset for p in first] == [1, 2, 3]
    assert [p.offset for p in other] == [1, 2]
    assert len({p.epoch for p in first}) == 1 and first[0].epoch
    assert len({p.epoch for p in other}) == 1 and other[0].epoch
    assert (await broker.position("chat:a")) == StreamPosition(3, first[0].epoch)
    assert (await broker.publish("chat:a", "e", b"1")).position == StreamPosition(4, first[0].epoch)


async def test_publication_carries_channel_event_data_and_publish_time(broker: Broker) -> None:
    before = int(time.time() * 1000)
    pub = await broker.publish("user:42", "user.updated", b'{"name":"Ada"}')
    after = int(time.time() * 1000)

    assert (pub.channel, pub.event, pub.data) == ("user:42", "user.updated", b'{"name":"Ada"}')
    assert before - 1000 <= pub.ts <= after + 1000


# -- live delivery ------------------------------------------------------------------------


async def test_subscribe_then_publish_delivers_in_order_exactly_once(
    broker: Broker, recorder: Any
) -> None:
    await broker.subscribe(["room:1"])
    published = await publish_many(broker, "room:1", 50)

    await recorder.wait_for(lambda: len(recorder.on("room:1")) >= 50, what="50 publications")
    await barrier(broker, recorder)
    assert recorder.on("room:1") == published  # same offsets, epoch, event, data and ts


async def test_concurrent_publishes_are_delivered_in_offset_order(
    broker: Broker, recorder: Any
) -> None:
    await broker.subscribe(["room:2"])
    published = await asyncio.gather(
        *(broker.publish("room:2", "e", str(n).encode()) for n in range(40))
    )

    assert sorted(p.offset for p in published) == list(range(1, 41))
    await recorder.wait_for(lambda: len(recorder.on("room:2")) >= 40, what="40 publications")
    await barrier(broker, recorder)
    delivered = recorder.on("room:2")
    assert [p.offset for p in delivered] == list(range(1, 41))
    assert sorted(delivered, key=lambda p: p.offset) == sorted(published, key=lambda p: p.offset)


async def test_unsubscribed_channel_is_not_delivered(broker: Broker, recorder: Any) -> None:
    await broker.subscribe(["news:on"])
    await broker.publish("news:off", "e", b"1")
    on = await broker.publish("news:on", "e", b"2")

    await recorder.wait_for(lambda: on in recorder.publications, what="news:on")
    await barrier(broker, recorder)
    assert recorder.on("news:off") == []


async def test_subscribe_is_idempotent_and_unsubscribe_stops_delivery(
    broker: Broker, recorder: Any
) -> None:
    await broker.subscribe(["idem"])
    await broker.subscribe(["idem"])
    first = await broker.publish("idem", "e", b"1")
    await barrier(broker, recorder)
    assert recorder.on("idem") == [first]

    await broker.unsubscribe(["idem"])
    await broker.publish("idem", "e", b"2")
    await barrier(broker, recorder)
    assert recorder.on("idem") == [first]

    await broker.subscribe(["idem"])
    third = await broker.publish("idem", "e", b"3")
    await barrier(broker, recorder)
    assert recorder.on("idem") == [first, third]


async def test_nothing_is_delivered_after_unsubscribe_returns(
    broker: Broker, recorder: Any
) -> None:
    await broker.subscribe(["flood"])

    async def flood() -> None:
        for n in range(300):
            await broker.publish("flood", "e", str(n).encode())

    publisher = asyncio.create_task(flood())
    await recorder.wait_for(lambda: len(recorder.on("flood")) >= 20, what="the flood to start")
    await broker.unsubscribe(["flood"])
    seen = len(recorder.on("flood"))
    await publisher
    await barrier(broker, recorder)
    assert len(recorder.on("flood")) == seen
    assert [p.offset for p in recorder.on("flood")] == list(range(1, seen + 1))


async def test_subscribe_many_channels_at_once_and_concurrently(
    broker: Broker, recorder: Any
) -> None:
    await broker.subscribe([f"many:{n}" for n in range(20)])
    await asyncio.gather(*(broker.subscribe([f"many:{n}"]) for n in range(20, 40)))
    for n in range(40):
        await broker.publish(f"many:{n}", "e", str(n).encode())

    await recorder.wait_for(lambda: len(recorder.publications) >= 40, what="40 channels")
    assert sorted(p.channel for p in recorder.publications) == sorted(
        f"many:{n}" for n in range(40)
    )


async def test_data_bytes_are_preserved_exactly_live_and_in_history(
    broker: Broker, recorder: Any
) -> None:
    payloads = [
        orjson.dumps({"text": "line one\nline two\r\n\ttabbed", "emoji": "héllo 👋 世界"}),
        orjson.dumps({"nested": {"list": [1, 2.5, None, True, {"deep": ["x"]}]}, "e": ""}),
        b'{\n  "pretty": "json with raw newlines between tokens"\n}',
        b'"\\u0000 and \\\\ and \\"quotes\\""',
        b"[]",
        b"\n\n\n",
    ]
    await broker.subscribe(["bytes"])
    published = [await broker.publish("bytes", "e", data) for data in payloads]

    await recorder.wait_for(lambda: len(recorder.on("bytes")) >= len(payloads), what="payloads")
    assert [p.data for p in recorder.on("bytes")] == payloads
    assert [p.data for p in (await broker.history("bytes")).publications] == payloads
    assert [p.data for p in published] == payloads
    assert orjson.loads(recorder.on("bytes")[0].data)["emoji"] == "héllo 👋 世界"


async def test_event_names_survive_the_round_trip(broker: Broker, recorder: Any) -> None:
    await broker.subscribe(["events"])
    names = ["user.updated", "a:b-c_d.e", "x" * 64]
    for name in names:
        await broker.publish("events", name, b"{}")
    await recorder.wait_for(lambda: len(recorder.on("events")) >= 3, what="events")
    assert [p.event for p in recorder.on("events")] == names
    assert [p.event for p in (await broker.history("events")).publications] == names


# -- publish_batch ------------------------------------------------------------------------


async def test_publish_batch_returns_publications_in_request_order(
    broker: Broker, recorder: Any
) -> None:
    await broker.subscribe(["batch:a", "batch:b"])
    await broker.publish("batch:a", "e", b"0")
    requests = [
        PublishRequest("batch:a", "one", b"1"),
        PublishRequest("batch:b", "two", b"2"),
        PublishRequest("batch:a", "three", b"3"),
        PublishRequest("batch:a", "four", b"4"),
    ]
    pubs = await broker.publish_batch(requests)

    assert [(p.channel, p.offset, p.event, p.data) for p in pubs] == [
        ("batch:a", 2, "one", b"1"),
        ("batch:b", 1, "two", b"2"),
        ("batch:a", 3, "three", b"3"),
        ("batch:a", 4, "four", b"4"),
    ]
    await recorder.wait_for(lambda: len(recorder.publications) >= 5, what="the batch")
    assert recorder.on("batch:a")[1:] == [pubs[0], pubs[2], pubs[3]]
    assert recorder.on("batch:b") == [pubs[1]]
    assert await broker.publish_batch([]) == []
    history = await broker.history("batch:a")
    assert [p.offset for p in history.publications] == [1, 2, 3, 4]


# -- history ------------------------------------------------------------------------------


async def test_history_since_none_returns_every_retained_publication(broker: Broker) -> None:
    published = await publish_many(broker, "h:all", 5)
    result = await broker.history("h:all")

    assert result.recovered is True
    assert result.publications == published
    assert result.position == published[-1].position


async def test_history_since_a_position_returns_what_followed(broker: Broker) -> None:
    published = await publish_many(broker, "h:since", 5)
    result = await broker.history("h:since", since=published[1].position)

    assert result.recovered is True
    assert result.publications == published[2:]
    assert result.position == StreamPosition(5, published[0].epoch)


async def test_history_since_the_top_is_recovered_and_empty(broker: Broker) -> None:
    published = await publish_many(broker, "h:top", 3)
    result = await broker.history("h:top", since=published[-1].position)
    assert (result.recovered, result.publications) == (True, [])


async def test_history_limit_returns_the_oldest_first(broker: Broker) -> None:
    published = await publish_many(broker, "h:limit", 6)

    assert (await broker.history("h:limit", limit=2)).publications == published[:2]
    after = await broker.history("h:limit", since=published[1].position, limit=3)
    assert (after.recovered, after.publications) == (True, published[2:5])
    zero = await broker.history("h:limit", since=published[1].position, limit=0)
    assert (zero.recovered, zero.publications, zero.position.offset) == (True, [], 6)


async def test_history_since_older_than_retained_is_not_recovered(
    make_broker: BrokerFactory,
) -> None:
    broker, _ = await make_broker(history_size=3)
    published = await publish_many(broker, "h:trim", 6)

    retained = await broker.history("h:trim")
    assert retained.publications == published[3:]  # exactly history_size entries
    assert retained.recovered is True
    lost = await broker.history("h:trim", since=published[1].position)  # needs offset 3
    assert (lost.recovered, lost.publications) == (False, [])
    assert lost.position == published[-1].position
    edge = await broker.history("h:trim", since=published[2].position)  # needs 4, retained
    assert (edge.recovered, edge.publications) == (True, published[3:])
    start = await broker.history("h:trim", since=StreamPosition(0, published[0].epoch))
    assert (start.recovered, start.publications) == (False, [])


async def test_history_with_another_epoch_is_not_recovered(broker: Broker) -> None:
    published = await publish_many(broker, "h:epoch", 3)
    result = await broker.history("h:epoch", since=StreamPosition(1, published[0].epoch + "x"))
    assert (result.recovered, result.publications) == (False, [])
    assert result.position == published[-1].position


async def test_history_since_the_future_is_not_recovered(broker: Broker) -> None:
    published = await publish_many(broker, "h:future", 3)
    result = await broker.history("h:future", since=StreamPosition(4, published[0].epoch))
    assert (result.recovered, result.publications) == (False, [])
    assert result.position == published[-1].position


async def test_history_of_an_unknown_channel_is_empty_at_offset_zero(broker: Broker) -> None:
    result = await broker.history("h:nothing")
    assert (result.recovered, result.publications, result.position.offset) == (True, [], 0)
    again = await broker.history("h:nothing", since=result.position)
    assert (again.recovered, again.publications) == (True, [])


async def test_position_of_an_unknown_channel_is_zero_and_its_epoch_is_kept(
    broker: Broker,
) -> None:
    position = await broker.position("pos:new")
    assert position.offset == 0 and position.epoch
    assert await broker.position("pos:new") == position

    pub = await broker.publish("pos:new", "e", b"1")
    assert pub.position == StreamPosition(1, position.epoch)
    result = await broker.history("pos:new", since=position)  # a client that saw nothing
    assert (result.recovered, result.publications) == (True, [pub])


async def test_history_size_zero_keeps_offsets_but_no_entries(make_broker: BrokerFactory) -> None:
    broker, handler = await make_broker(history_size=0)
    await broker.subscribe(["h:zero"])
    published = await publish_many(broker, "h:zero", 3)

    assert [p.offset for p in published] == [1, 2, 3]
    await handler.wait_for(lambda: len(handler.on("h:zero")) == 3, what="live delivery")
    everything = await broker.history("h:zero")
    assert (everything.recovered, everything.publications) == (True, [])
    assert everything.position == published[-1].position
    assert (await broker.history("h:zero", since=published[-1].position)).recovered is True
    assert (await broker.history("h:zero", since=published[0].position)).recovered is False


async def test_history_drops_entries_older_than_history_ttl(make_broker: BrokerFactory) -> None:
    broker, _ = await make_broker(history_ttl=1)
    old = await broker.publish("h:ttl", "e", b"old")
    await asyncio.sleep(1.1)
    young = await broker.publish("h:ttl", "e", b"young")  # old is past the TTL, young is not

    result = await broker.history("h:ttl")
    assert (result.recovered, result.publications) == (True, [young])
    assert (await broker.history("h:ttl", since=old.position)).publications == [young]
    gone = await broker.history("h:ttl", since=StreamPosition(0, old.epoch))
    assert (gone.recovered, gone.publications) == (False, [])

    await asyncio.sleep(1.1)  # now both are older than the TTL
    empty = await broker.history("h:ttl")
    assert (empty.recovered, empty.publications) == (True, [])
    assert empty.position == young.position  # offsets and epoch outlive the entries
    assert (await broker.history("h:ttl", since=old.position)).recovered is False
    assert (await broker.history("h:ttl", since=young.position)).recovered is True
    later = await broker.publish("h:ttl", "e", b"later")
    assert later.position == StreamPosition(3, old.epoch)
    assert (await broker.history("h:ttl")).publications == [later]


async def test_history_limits_can_differ_per_namespace(make_broker: BrokerFactory) -> None:
    broker, _ = await make_broker(history_size=10, history_overrides={"short": (2, 3600)})
    short = await publish_many(broker, "short:x", 5)
    normal = await publish_many(broker, "normal:x", 5)

    assert (await broker.history("short:x")).publications == short[3:]
    assert (await broker.history("normal:x")).publications == normal
    assert (await broker.history("short:x", since=short[1].position)).recovered is False
    assert (await broker.history("short:x", since=short[2].position)).publications == short[3:]


async def test_history_ttl_can_differ_per_namespace(make_broker: BrokerFactory) -> None:
    broker, _ = await make_broker(history_ttl=3600, history_overrides={"brief": (100, 1)})
    brief = await broker.publish("brief:x", "e", b"1")
    lasting = await broker.publish("lasting:x", "e", b"1")
    await asyncio.sleep(1.1)

    assert (await broker.history("brief:x")).publications == []
    assert (
        await broker.history("brief:x", since=StreamPosition(0, brief.epoch))
    ).recovered is False
    assert (await broker.history("lasting:x")).publications == [lasting]


# -- presence -----------------------------------------------------------------------------


async def test_presence_lists_updates_and_removes_clients(broker: Broker) -> None:
    assert await broker.presence("room:p") == {}
    await broker.presence_update(
        {"room:p": {"c1": "u1", "c2": "u2"}, "room:q": {"c3": "u1"}, "room:empty": {}}, 60
    )
    assert await broker.presence("room:p") == {"c1": "u1", "c2": "u2"}
    assert await broker.presence("room:q") == {"c3": "u1"}
    assert await broker.presence("room:empty") == {}

    await broker.presence_update({"room:p": {"c2": "u2", "c4": "ü-ser 👋"}}, 60)
    await broker.presence_remove("room:p", ["c1", "never-there"])
    assert await broker.presence("room:p") == {"c2": "u2", "c4": "ü-ser 👋"}
    await broker.presence_remove("room:nothing", ["c1"])
    await broker.presence_remove("room:p", [])
    await broker.presence_update({}, 60)
    await broker.presence_remove("room:p", ["c2", "c4"])
    assert await broker.presence("room:p") == {}
    assert await broker.presence("room:q") == {"c3": "u1"}


async def test_presence_entries_expire_unless_refreshed(broker: Broker) -> None:
    await broker.presence_update({"room:ttl": {"short": "u1", "refreshed": "u2"}}, 1)
    await broker.presence_update({"room:ttl": {"long": "u3"}}, 60)
    await asyncio.sleep(0.6)
    await broker.presence_update({"room:ttl": {"refreshed": "u2"}}, 1)
    await asyncio.sleep(0.6)  # short: 1.2 s old; refreshed: 0.6 s since its refresh

    assert await broker.presence("room:ttl") == {"refreshed": "u2", "long": "u3"}
    await asyncio.sleep(0.6)
    assert await broker.presence("room:ttl") == {"long": "u3"}


# -- control, delivery check, revocation ---------------------------------------------------


async def test_send_control_reaches_the_sending_process(broker: Broker, recorder: Any) -> None:
    command = {"type": "disconnect_user", "user": "42", "nested": {"ids": [1, 2], "é": None}}
    await broker.send_control(command)
    await recorder.wait_for(lambda: recorder.controls, what="the control command")
    assert recorder.controls == [command]


async def test_check_delivery_is_true_when_healthy(broker: Broker) -> None:
    assert broker.connected is True
    assert await broker.check_delivery(2.0) is True


async def test_user_not_before_only_moves_forward(broker: Broker) -> None:
    # A revocation carried late (after an outage) must not undo a later one.
    await broker.set_user_not_before("fwd", 200.0, ttl=1)
    await broker.set_user_not_before("fwd", 100.0, ttl=60)
    assert await broker.get_user_not_before("fwd") == 200.0
    await asyncio.sleep(1.6)  # the TTL grew to the longer one: still there
    assert await broker.get_user_not_before("fwd") == 200.0
    await broker.set_user_not_before("fwd", 300.5, ttl=60)
    assert await broker.get_user_not_before("fwd") == 300.5


async def claim_slot(broker: Broker, user_id: str, slot: str, limit: int, ttl: int) -> bool:
    [held] = await broker.claim_connection_slots([(user_id, slot)], limit, ttl)
    return held


async def test_reset_epoch_only_when_the_top_is_behind_what_was_seen(broker: Broker) -> None:
    pubs = await publish_many(broker, "lossy", 3)
    epoch = pubs[0].epoch
    assert not await broker.reset_epoch_if_behind("lossy", StreamPosition(3, epoch))
    assert not await broker.reset_epoch_if_behind("lossy", StreamPosition(2, epoch))
    assert not await broker.reset_epoch_if_behind("lossy", StreamPosition(9, "other"))
    assert (await broker.position("lossy")).epoch == epoch

    # The hub saw offset 5: the broker's top (3) went back, writes were lost.
    assert await broker.reset_epoch_if_behind("lossy", StreamPosition(5, epoch))
    top = await broker.position("lossy")
    assert top.epoch != epoch and top.offset == 3
    for seen in (1, 3, 4):  # no position of the old epoch passes for the new one
        assert (await broker.history("lossy", since=StreamPosition(seen, epoch))).recovered is False
    after = await broker.publish("lossy", "e", b"4")
    assert after.position == StreamPosition(4, top.epoch)
    assert (await broker.history("lossy", since=top)).publications == [after]
    assert not await broker.reset_epoch_if_behind("lossy", StreamPosition(5, epoch))


async def test_connection_slots_claimed_together_are_claimed_in_order(broker: Broker) -> None:
    claims = [("u5", "a"), ("u6", "a"), ("u5", "b"), ("u5", "c"), ("u5", "a")]
    assert await broker.claim_connection_slots(claims, 2, 60) == [True, True, True, False, True]
    assert await broker.claim_connection_slots([], 2, 60) == []


async def test_connection_slots_hold_a_user_to_the_limit(broker: Broker) -> None:
    assert await claim_slot(broker, "u1", "a", limit=2, ttl=60)
    assert await claim_slot(broker, "u1", "b", limit=2, ttl=60)
    assert not await claim_slot(broker, "u1", "c", limit=2, ttl=60)
    assert await claim_slot(broker, "u1", "a", limit=2, ttl=60)  # held: refresh
    assert await claim_slot(broker, "u2", "c", limit=2, ttl=60)  # per user
    await broker.release_connection_slots({"u1": ["b", "never-held"], "nobody": ["x"]})
    assert await claim_slot(broker, "u1", "c", limit=2, ttl=60)
    assert not await claim_slot(broker, "u1", "d", limit=2, ttl=60)


async def test_connection_slots_expire_unless_refreshed(broker: Broker) -> None:
    assert await claim_slot(broker, "u3", "kept", limit=2, ttl=1)
    assert await claim_slot(broker, "u3", "dead", limit=2, ttl=1)
    assert not await claim_slot(broker, "u3", "new", limit=2, ttl=1)
    for _ in range(4):  # 2 s: past the TTL of "dead", never of "kept"
        await asyncio.sleep(0.5)
        await broker.refresh_connection_slots({"u3": ["kept"]}, ttl=1)
    assert await claim_slot(broker, "u3", "new", limit=2, ttl=60)
    assert not await claim_slot(broker, "u3", "dead", limit=2, ttl=60)


async def test_user_not_before_round_trip_and_expiry(broker: Broker) -> None:
    assert await broker.get_user_not_before("u1") is None
    stamp = 1_712_345_678.123456
    await broker.set_user_not_before("u1", stamp, ttl=60)
    await broker.set_user_not_before("u2", 5.5, ttl=1)
    assert await broker.get_user_not_before("u1") == stamp
    assert await broker.get_user_not_before("u2") == 5.5

    deadline = time.monotonic() + 4
    while await broker.get_user_not_before("u2") is not None:
        assert time.monotonic() < deadline, "the revocation did not expire after its TTL"
        await asyncio.sleep(0.1)
    assert await broker.get_user_not_before("u1") == stamp


async def test_rate_limit_allows_a_burst_then_refuses_then_refills(broker: Broker) -> None:
    # rate 2/s: one token every 500 ms (exact in binary floating point), burst 3
    results = [await broker.rate_limit("k", rate=2, burst=3) for _ in range(4)]

    assert [r.allowed for r in results] == [True, True, True, False]
    assert [r.remaining for r in results] == [2, 1, 0, 0]
    assert all(r.limit == 3 for r in results)
    assert [r.retry_after for r in results[:3]] == [0.0, 0.0, 0.0]
    refused = results[3]
    assert 0 < refused.retry_after <= 0.5
    assert 1.0 < refused.reset_after <= 1.5
    assert 0.4 < results[0].reset_after <= 0.5

    other = await broker.rate_limit("other-key", rate=2, burst=3)
    assert (other.allowed, other.remaining) == (True, 2)

    await asyncio.sleep(refused.retry_after + 0.05)
    again = await broker.rate_limit("k", rate=2, burst=3)
    assert again.allowed is True
    assert (await broker.rate_limit("k", rate=2, burst=3)).allowed is False


# -- several workers on one Redis ---------------------------------------------------------

redis_only = pytest.mark.integration


@redis_only
async def test_a_second_worker_receives_publications_from_the_first(
    make_redis_broker: BrokerFactory,
) -> None:
    first, _ = await make_redis_broker()
    second, handler = await make_redis_broker()
    await second.subscribe(["cross:1"])

    published = await publish_many(first, "cross:1", 10)
    await handler.wait_for(lambda: len(handler.on("cross:1")) == 10, what="cross-worker")
    assert handler.on("cross:1") == published
    batch = await first.publish_batch([PublishRequest("cross:1", "b", b"11")])
    await handler.wait_for(lambda: len(handler.on("cross:1")) == 11, what="cross-worker batch")
    assert handler.on("cross:1")[-1] == batch[0]


@redis_only
async def test_only_workers_subscribed_to_a_channel_receive_it(
    make_redis_broker: BrokerFactory,
) -> None:
    first, one = await make_redis_broker()
    second, two = await make_redis_broker()
    await first.subscribe(["only:a"])
    await second.subscribe(["only:b"])

    a = await first.publish("only:a", "e", b"a")
    b = await first.publish("only:b", "e", b"b")
    await one.wait_for(lambda: a in one.publications, what="only:a")
    await two.wait_for(lambda: b in two.publications, what="only:b")
    await barrier(first, one)
    await barrier(second, two)
    assert one.on("only:b") == [] and two.on("only:a") == []


@redis_only
async def test_send_control_reaches_every_worker(make_redis_broker: BrokerFactory) -> None:
    workers = [await make_redis_broker() for _ in range(3)]
    await workers[1][0].send_control({"type": "ping", "n": 1})
    for _, handler in workers:
        await handler.wait_for(lambda h=handler: h.controls, what="control on every worker")
        assert handler.controls == [{"type": "ping", "n": 1}]


@redis_only
async def test_offsets_and_history_are_shared_between_workers(
    make_redis_broker: BrokerFactory,
) -> None:
    first, _ = await make_redis_broker()
    second, _ = await make_redis_broker()
    a = await first.publish("shared", "e", b"1")
    b = await second.publish("shared", "e", b"2")

    assert (b.offset, b.epoch) == (2, a.epoch)
    assert (await first.history("shared")).publications == [a, b]
    assert await second.position("shared") == b.position


@redis_only
async def test_rate_limits_are_shared_between_workers(make_redis_broker: BrokerFactory) -> None:
    first, _ = await make_redis_broker()
    second, _ = await make_redis_broker()
    assert (await first.rate_limit("shared", rate=2, burst=3)).remaining == 2
    assert (await second.rate_limit("shared", rate=2, burst=3)).remaining == 1
    assert (await first.rate_limit("shared", rate=2, burst=3)).remaining == 0
    refused = await second.rate_limit("shared", rate=2, burst=3)
    assert refused.allowed is False and refused.retry_after > 0


@redis_only
async def test_connection_slots_are_shared_between_workers(
    make_redis_broker: BrokerFactory,
) -> None:
    first, _ = await make_redis_broker()
    second, _ = await make_redis_broker()
    assert await claim_slot(first, "u7", "w1-1", limit=2, ttl=60)
    assert await claim_slot(second, "u7", "w2-1", limit=2, ttl=60)
    assert not await claim_slot(first, "u7", "w1-2", limit=2, ttl=60)
    await second.release_connection_slots({"u7": ["w2-1"]})
    assert await claim_slot(first, "u7", "w1-2", limit=2, ttl=60)


@redis_only
async def test_user_revocation_is_shared_between_workers(make_redis_broker: BrokerFactory) -> None:
    first, _ = await make_redis_broker()
    second, _ = await make_redis_broker()
    await first.set_user_not_before("u9", 123.25, ttl=60)
    assert await second.get_user_not_before("u9") == 123.25


@redis_only
async def test_presence_is_shared_between_workers(make_redis_broker: BrokerFactory) -> None:
    first, _ = await make_redis_broker()
    second, _ = await make_redis_broker()
    await first.presence_update({"room:s": {"a-1": "ada"}}, 60)
    await second.presence_update({"room:s": {"b-1": "bob"}}, 60)

    assert await first.presence("room:s") == {"a-1": "ada", "b-1": "bob"}
    await second.presence_remove("room:s", ["a-1"])
    assert await first.presence("room:s") == {"b-1": "bob"}


async def count_writes(broker: Broker, call: Awaitable[Any]) -> tuple[int, Any]:
    """How many writes (round trips) ``call`` makes on the broker's command connections."""
    pool = broker._pool  # type: ignore[attr-defined]
    writes = 0
    original = pool.get_connection

    async def counting_get_connection(*args: Any, **kwargs: Any) -> Any:
        connection = await original(*args, **kwargs)
        send = connection.send_packed_command

        async def counting_send(*a: Any, **k: Any) -> Any:
            nonlocal writes
            writes += 1
            return await send(*a, **k)

        connection.send_packed_command = counting_send
        return connection

    pool.get_connection = counting_get_connection
    try:
        result = await call
    finally:
        pool.get_connection = original
        for connection in [*pool._available_connections, *pool._in_use_connections]:
            connection.__dict__.pop("send_packed_command", None)
    return writes, result


@redis_only
async def test_publish_batch_is_one_round_trip(make_redis_broker: BrokerFactory) -> None:
    broker, _ = await make_redis_broker()
    await broker.publish("rt", "e", b"warm")  # a pooled connection exists already
    requests = [PublishRequest(f"rt:{n % 3}", "e", str(n).encode()) for n in range(30)]

    writes, pubs = await count_writes(broker, broker.publish_batch(requests))
    assert writes == 1
    assert [p.offset for p in pubs if p.channel == "rt:0"] == list(range(1, 11))


@redis_only
async def test_presence_update_is_one_round_trip(make_redis_broker: BrokerFactory) -> None:
    broker, _ = await make_redis_broker()
    await broker.publish("rt", "e", b"warm")
    updates = {f"room:{n}": {f"c{n}-{k}": f"u{k}" for k in range(5)} for n in range(10)}

    writes, _ = await count_writes(broker, broker.presence_update(updates, 30))
    assert writes == 1
    assert await broker.presence("room:7") == updates["room:7"]


@redis_only
async def test_keys_are_cluster_safe_and_expire(
    make_redis_broker: BrokerFactory, redis_url: str, unique_prefix: str
) -> None:
    from redis.crc import key_slot

    broker, _ = await make_redis_broker(history_ttl=600)
    await broker.publish("user:42", "e", b"1")
    await broker.rate_limit("ip:1", rate=1, burst=1)
    await broker.set_user_not_before("42", 1.0, ttl=30)
    await broker.presence_update({"user:42": {"c1": "42"}}, 20)

    meta = f"{unique_prefix}:meta:{{user:42}}"
    stream = f"{unique_prefix}:stream:{{user:42}}"
    client = Redis.from_url(redis_url)
    try:
        assert await client.type(meta) == b"hash"
        assert await client.type(stream) == b"stream"
        assert key_slot(meta.encode()) == key_slot(stream.encode())
        assert key_slot(f"{unique_prefix}:ch:{{user:42}}".encode()) == key_slot(meta.encode())
        assert 0 < await client.pttl(stream) <= 600_000
        assert await client.pttl(meta) >= 600_000
        assert 0 < await client.ttl(f"{unique_prefix}:nbf:42") <= 30
        assert 0 < await client.pttl(f"{unique_prefix}:rl:ip:1") <= 1000
        presence = f"{unique_prefix}:presence:{{user:42}}"
        presence_exp = f"{unique_prefix}:presence-exp:{{user:42}}"
        assert (
            key_slot(presence.encode())
            == key_slot(presence_exp.encode())
            == key_slot(meta.encode())
        )
        assert 0 < await client.pttl(presence) <= 20_000
        assert 0 < await client.pttl(presence_exp) <= 20_000
        entries: Any = await client.xrange(stream)
        assert [(entry_id, sorted(fields)) for entry_id, fields in entries] == [
            (b"1-1", [b"d", b"e", b"t"])
        ]
        assert entries[0][1][b"d"] == b"1" and int(entries[0][1][b"t"]) > 1_600_000_000_000
        with pytest.raises(ValueError):
            await broker.publish("bad{name}", "e", b"1")
    finally:
        await client.aclose()
