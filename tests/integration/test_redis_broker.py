"""RedisBroker against real redis-server processes that tests stop, kill and restart.

The behaviour shared with the memory backend is in tests/contract; this file covers
what only a networked backend has: outages, reconnection, persistence, health checks.
Each test that disturbs Redis owns its server (``redis_server_factory``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from hub.broker import BrokerConfig, BrokerUnavailable, PublishRequest
from hub.broker.redis import RedisBroker
from hub.protocol import Publication, StreamPosition

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

RECOVERY_TIMEOUT = 5.0  # a restarted Redis must be delivering again within this


@pytest.fixture
async def make(
    unique_prefix: str, recording_handler: type[Any]
) -> AsyncIterator[Callable[..., Any]]:
    """``await make(url, **broker_options)`` -> started ``(broker, handler)``; closed at the end."""
    brokers: list[RedisBroker] = []

    async def factory(url: str, *, start: bool = True, **options: Any) -> tuple[RedisBroker, Any]:
        history = {k: options.pop(k) for k in ("history_size", "history_ttl") if k in options}
        config = BrokerConfig(url=url, prefix=unique_prefix, **history)
        broker = RedisBroker(config, **options)
        brokers.append(broker)
        handler = recording_handler()
        if start:
            await broker.start(handler)
        return broker, handler

    try:
        yield factory
    finally:
        for broker in brokers:
            await broker.aclose()


@pytest.fixture
async def admin() -> AsyncIterator[Callable[[str], Redis]]:
    clients: list[Redis] = []

    def connect(url: str) -> Redis:
        client = Redis.from_url(url)
        clients.append(client)
        return client

    try:
        yield connect
    finally:
        for client in clients:
            await client.aclose()


async def delivered(handler: Any, pub: Publication, timeout: float = RECOVERY_TIMEOUT) -> None:
    await handler.wait_for(lambda: pub in handler.publications, timeout, f"offset {pub.offset}")


async def assert_fails_fast(call: Any, limit: float = 2.0) -> None:
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await call
    assert time.monotonic() - started < limit


# -- Redis restarts -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_restart_without_persistence_reconnects_resubscribes_and_starts_a_new_epoch(
    how: str, redis_server_factory: Callable[..., Any], make: Any
) -> None:
    server = redis_server_factory()
    broker, handler = await make(server.url)
    await broker.subscribe(["live", "other"])
    before = await broker.publish("live", "e", b"1")
    await delivered(handler, before)

    getattr(server, how)()
    await handler.wait_for(lambda: handler.states == [False], RECOVERY_TIMEOUT, "state False")
    assert broker.connected is False
    await assert_fails_fast(broker.publish("live", "e", b"lost"))
    await assert_fails_fast(broker.publish_batch([PublishRequest("live", "e", b"lost")]))
    await assert_fails_fast(broker.history("live"))
    await assert_fails_fast(broker.send_control({"type": "x"}))
    await assert_fails_fast(broker.presence_update({"live": {"c": "u"}}, 30))
    await assert_fails_fast(broker.rate_limit("k", rate=1, burst=1))
    started = time.monotonic()
    assert await broker.check_delivery(0.5) is False
    assert time.monotonic() - started < 1.0

    server.start()
    await handler.wait_for(
        lambda: handler.states == [False, True], RECOVERY_TIMEOUT, "state True after restart"
    )
    assert broker.connected is True
    assert await broker.check_delivery(2.0) is True
    after = await broker.publish("live", "e", b"2")
    assert after.offset == 1 and after.epoch != before.epoch  # history was lost
    await delivered(handler, after)
    other = await broker.publish("other", "e", b"3")
    await delivered(handler, other)
    lost = await broker.history("live", since=before.position)
    assert (lost.recovered, lost.publications) == (False, [])


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_restart_with_aof_keeps_the_epoch_offsets_and_history(
    how: str, redis_server_factory: Callable[..., Any], make: Any
) -> None:
    server = redis_server_factory(appendonly=True)
    broker, handler = await make(server.url)
    await broker.subscribe(["durable"])
    before = [await broker.publish("durable", "e", str(n).encode()) for n in range(3)]

    getattr(server, how)()
    await handler.wait_for(lambda: handler.states == [False], RECOVERY_TIMEOUT, "state False")
    server.start()
    await handler.wait_for(lambda: handler.states == [False, True], RECOVERY_TIMEOUT, "True")

    after = await broker.publish("durable", "e", b"3")
    assert after.position == StreamPosition(4, before[0].epoch)
    await delivered(handler, after)
    history = await broker.history("durable", since=before[0].position)
    assert history.recovered is True
    assert history.publications == [*before[1:], after]


async def test_subscribe_while_disconnected_raises_but_is_restored_on_reconnect(
    redis_server_factory: Callable[..., Any], make: Any
) -> None:
    server = redis_server_factory()
    broker, handler = await make(server.url)
    await broker.subscribe(["dropped"])
    server.stop()
    await handler.wait_for(lambda: handler.states == [False], RECOVERY_TIMEOUT, "state False")

    await assert_fails_fast(broker.subscribe(["later"]))
    await broker.unsubscribe(["dropped"])  # never raises for a lost connection

    server.start()
    await handler.wait_for(lambda: handler.states == [False, True], RECOVERY_TIMEOUT, "True")
    publisher, _ = await make(server.url)
    await publisher.publish("dropped", "e", b"x")
    later = await publisher.publish("later", "e", b"y")
    await delivered(handler, later)
    assert handler.on("dropped") == []


async def test_outage_longer_than_several_backoffs_still_recovers(
    redis_server_factory: Callable[..., Any], make: Any
) -> None:
    server = redis_server_factory()
    broker, handler = await make(server.url, reconnect_backoff=(0.05, 0.3))
    await broker.subscribe(["patient"])
    server.stop()
    await handler.wait_for(lambda: handler.states == [False], RECOVERY_TIMEOUT, "state False")
    await asyncio.sleep(1.5)  # many failed reconnect attempts; the reader must survive them
    assert handler.states == [False]
    server.start()
    await handler.wait_for(lambda: handler.states == [False, True], RECOVERY_TIMEOUT, "True")
    pub = await broker.publish("patient", "e", b"1")
    await delivered(handler, pub)


async def test_a_killed_pubsub_connection_is_replaced(
    redis_server: Any, make: Any, admin: Callable[[str], Redis]
) -> None:
    broker, handler = await make(redis_server.url)
    await broker.subscribe(["victim"])
    client = admin(redis_server.url)
    killed = await client.client_kill_filter(_type="pubsub", skipme=True)
    assert killed >= 1
    await handler.wait_for(lambda: handler.states == [False, True], RECOVERY_TIMEOUT, "reconnect")
    pub = await broker.publish("victim", "e", b"1")
    await delivered(handler, pub)


async def test_health_check_detects_a_connection_that_stopped_answering(
    redis_server_factory: Callable[..., Any], make: Any, admin: Callable[[str], Redis]
) -> None:
    server = redis_server_factory()
    broker, handler = await make(server.url, health_check_interval=0.2, health_check_timeout=0.5)
    await broker.subscribe(["quiet"])
    await asyncio.sleep(1.0)  # idle periods answered by PING alone: no reconnect
    assert handler.states == []

    # Redis holds every command (our PING too) for 3 s: the socket stays open but deaf.
    await admin(server.url).client_pause(3000, all=True)
    started = time.monotonic()
    await handler.wait_for(lambda: handler.states == [False], 2.7, "the health check to fire")
    assert time.monotonic() - started < 2.7  # found dead before the pause ended
    await handler.wait_for(lambda: handler.states == [False, True], RECOVERY_TIMEOUT, "True")
    pub = await broker.publish("quiet", "e", b"1")
    await delivered(handler, pub)


async def test_a_connection_that_stopped_delivering_is_replaced_by_the_readiness_canary(
    redis_server: Any, make: Any
) -> None:
    from hub.broker.redis import CANARIES_LOST_BEFORE_RECONNECT

    broker, handler = await make(redis_server.url)
    await broker.subscribe(["live"])
    assert await broker.check_delivery(1.0) is True
    # The pub/sub connection keeps answering PINGs but loses a subscription (as behind a
    # proxy that dropped it): Redis takes every canary, none comes back.
    broker._ops.append((b"unsubscribe", broker._canary_key, None))
    broker._kick_flush()
    await asyncio.sleep(0.2)
    for _ in range(CANARIES_LOST_BEFORE_RECONNECT - 1):
        assert await broker.check_delivery(0.3) is False
        assert handler.states == []  # a slow canary or two is not enough
    assert await broker.check_delivery(0.3) is False
    await handler.wait_for(lambda: handler.states == [False, True], RECOVERY_TIMEOUT, "reconnect")
    assert await broker.check_delivery(1.0) is True  # every subscription restored
    pub = await broker.publish("live", "e", b"1")
    await delivered(handler, pub)


# -- robustness ---------------------------------------------------------------------------


async def test_a_failing_handler_does_not_stop_the_reader(
    redis_url: str, make: Any, recording_handler: type[Any]
) -> None:
    class Exploding(recording_handler):  # type: ignore[misc]
        def on_publication(self, publication: Publication) -> None:
            if publication.data == b"boom":
                raise RuntimeError("handler bug")
            super().on_publication(publication)

        def on_control(self, command: dict[str, Any]) -> None:
            if command.get("boom"):
                raise RuntimeError("handler bug")
            super().on_control(command)

    broker, _ = await make(redis_url, start=False)
    handler = Exploding()
    await broker.start(handler)
    await broker.subscribe(["fragile"])
    await broker.publish("fragile", "e", b"boom")
    await broker.send_control({"boom": True})
    ok = await broker.publish("fragile", "e", b"ok")
    await broker.send_control({"fine": True})
    await delivered(handler, ok)
    await handler.wait_for(lambda: handler.controls == [{"fine": True}], 5.0, "control")
    assert handler.on("fragile") == [ok]
    assert handler.states == [] and broker.connected


async def test_scripts_work_after_the_script_cache_is_flushed(
    redis_url: str, make: Any, admin: Callable[[str], Redis]
) -> None:
    broker, handler = await make(redis_url)
    await broker.subscribe(["flush"])
    first = await broker.publish("flush", "e", b"1")
    client = admin(redis_url)

    await client.script_flush()
    second = await broker.publish("flush", "e", b"2")
    await client.script_flush()
    batch = await broker.publish_batch([PublishRequest("flush", "e", b"3")])
    await client.script_flush()
    history = await broker.history("flush")
    await client.script_flush()
    assert (await broker.rate_limit("flush", rate=1, burst=2)).allowed
    await client.script_flush()
    assert (await broker.position("flush")).offset == 3
    await client.script_flush()
    await broker.presence_update({"flush": {"c": "u"}}, 30)
    await client.script_flush()
    assert await broker.presence("flush") == {"c": "u"}

    assert history.publications == [first, second, batch[0]]
    await handler.wait_for(lambda: len(handler.on("flush")) == 3, 5.0, "three publications")


async def test_a_lost_meta_hash_starts_a_new_epoch_with_fresh_history(
    redis_url: str, make: Any, admin: Callable[[str], Redis], unique_prefix: str
) -> None:
    broker, _ = await make(redis_url)
    old = [await broker.publish("evicted", "e", str(n).encode()) for n in range(3)]
    await admin(redis_url).delete(f"{unique_prefix}:meta:{{evicted}}")  # e.g. evicted

    new = await broker.publish("evicted", "e", b"new")
    assert new.offset == 1 and new.epoch != old[0].epoch
    assert (await broker.history("evicted")).publications == [new]
    stale = await broker.history("evicted", since=old[-1].position)
    assert (stale.recovered, stale.publications) == (False, [])


async def test_concurrent_subscribes_share_one_subscribe_command(
    redis_server_factory: Callable[..., Any], make: Any, admin: Callable[[str], Redis]
) -> None:
    server = redis_server_factory()
    broker, handler = await make(server.url)
    client = admin(server.url)
    await client.config_resetstat()

    await asyncio.gather(*(broker.subscribe([f"c:{n}"]) for n in range(50)))
    stats = await client.info("commandstats")
    assert stats["cmdstat_subscribe"]["calls"] == 1
    pub = await broker.publish("c:49", "e", b"1")
    await delivered(handler, pub)


# -- start, close, secrets ----------------------------------------------------------------


async def test_start_fails_fast_when_redis_is_unreachable(make: Any) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    broker, handler = await make(f"redis://:hunter2-secret@127.0.0.1:{port}/0", start=False)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as raised:
        await broker.start(handler)
    assert time.monotonic() - started < 3.0
    assert "hunter2-secret" not in str(raised.value)
    assert broker.connected is False


async def test_passwords_work_and_never_appear_in_errors_or_logs(
    redis_server_factory: Callable[..., Any], make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="herald.broker")
    server = redis_server_factory(extra_args=["--requirepass", "right-pass-123"])
    good_url = f"redis://:right-pass-123@127.0.0.1:{server.port}/0"
    broker, handler = await make(good_url)
    await broker.subscribe(["auth"])
    pub = await broker.publish("auth", "e", b"secret-payload-xyz")
    await delivered(handler, pub)

    bad, bad_handler = await make(f"redis://:wrong-pass-456@127.0.0.1:{server.port}/0", start=False)
    with pytest.raises(BrokerUnavailable) as raised:
        await bad.start(bad_handler)
    server.stop()
    await handler.wait_for(lambda: handler.states == [False], RECOVERY_TIMEOUT, "state False")
    with pytest.raises(BrokerUnavailable):
        await broker.publish("auth", "e", b"secret-payload-xyz")
    server.start()
    await handler.wait_for(lambda: handler.states == [False, True], RECOVERY_TIMEOUT, "True")

    for secret in ("wrong-pass-456", "right-pass-123"):
        assert secret not in str(raised.value)
        assert secret not in caplog.text
    assert "secret-payload-xyz" not in caplog.text
    assert "connection lost" in caplog.text  # the outage itself is logged


async def test_aclose_is_idempotent_and_leaves_no_tasks(redis_url: str, make: Any) -> None:
    broker, handler = await make(redis_url)
    await broker.subscribe(["bye"])
    await broker.aclose()
    await broker.aclose()
    assert broker.connected is False
    names = [t.get_name() for t in asyncio.all_tasks()]
    assert not [n for n in names if n.startswith("herald-redis")]
    with pytest.raises(BrokerUnavailable):
        await broker.subscribe(["bye"])
    assert handler.states == []


async def test_history_read_trims_expired_entries_in_redis(
    redis_url: str, make: Any, admin: Callable[[str], Redis], unique_prefix: str
) -> None:
    broker, _ = await make(redis_url, history_ttl=1)
    for n in range(20):
        await broker.publish("aging", "e", str(n).encode())
    await asyncio.sleep(1.1)
    fresh = await broker.publish("aging", "e", b"fresh")

    assert (await broker.history("aging")).publications == [fresh]
    stream = f"{unique_prefix}:stream:{{aging}}"
    assert await admin(redis_url).xlen(stream) == 1  # the expired prefix was trimmed
