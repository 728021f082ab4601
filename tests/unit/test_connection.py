"""hub.connection and hub.registry: bounded outbox, one writer, recovery, fan-out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import pytest

from hub import errors
from hub.connection import Connection
from hub.protocol import EncodedMessage, Publication, StreamPosition, encode_message
from hub.registry import Registry

from .conftest import service, user

EPOCH = "e0"


def pub(offset: int, channel: str = "public:a", data: bytes = b"1") -> Publication:
    return Publication(channel, offset, EPOCH, "msg", data, 1_700_000_000_000 + offset)


def msg(offset: int, channel: str = "public:a", data: bytes = b"1") -> EncodedMessage:
    return encode_message(pub(offset, channel, data))


def conn(
    max_messages: int = 8,
    max_bytes: int = 1 << 20,
    on_overflow: Callable[[Connection, int], None] | None = None,
) -> Connection:
    return Connection(
        user("42"),
        "websocket",
        max_messages=max_messages,
        max_bytes=max_bytes,
        on_overflow=on_overflow,
    )


def offsets(batch: Sequence[object] | None) -> list[int]:
    assert batch is not None
    return [item.publication.offset for item in batch if isinstance(item, EncodedMessage)]


async def first_item(c: Connection) -> object:
    batch = await c.next_batch(1.0)
    assert batch
    return batch[0]


# -- outbox ------------------------------------------------------------------------------------


async def test_next_batch_drains_everything_in_one_list_in_order() -> None:
    c = conn()
    c.enqueue_control(b'{"op":"pong"}')
    for n in range(1, 6):
        c.enqueue_message(msg(n))
    batch = await c.next_batch(1.0)
    assert batch is not None and batch[0] == b'{"op":"pong"}'
    assert offsets(batch) == [1, 2, 3, 4, 5]
    assert c.outbox_size == 0


async def test_next_batch_returns_empty_list_on_timeout() -> None:
    c = conn()
    started = time.monotonic()
    assert await c.next_batch(0.05) == []
    assert time.monotonic() - started < 1.0
    assert c.closed is None


async def test_next_batch_wakes_up_when_a_message_arrives() -> None:
    c = conn()
    waiter = asyncio.ensure_future(c.next_batch(5.0))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    c.enqueue_message(msg(1))
    assert offsets(await asyncio.wait_for(waiter, 1.0)) == [1]


async def test_next_batch_returns_none_after_close_even_with_queued_items() -> None:
    c = conn()
    c.enqueue_message(msg(1))
    c.close(errors.SHUTDOWN)
    assert await c.next_batch(1.0) is None
    assert c.closed is errors.SHUTDOWN


async def test_close_wakes_a_waiting_writer() -> None:
    c = conn()
    waiter = asyncio.ensure_future(c.next_batch(5.0))
    await asyncio.sleep(0.01)
    c.close(errors.SHUTDOWN)
    assert await asyncio.wait_for(waiter, 1.0) is None
    await asyncio.wait_for(c.wait_closed(), 1.0)


async def test_close_is_idempotent_and_first_reason_wins() -> None:
    c = conn()
    c.close(errors.SHUTDOWN)
    c.close(errors.SLOW_CONSUMER)
    assert c.closed is errors.SHUTDOWN


async def test_closed_connection_ignores_new_messages() -> None:
    c = conn()
    c.close(errors.SHUTDOWN)
    c.enqueue_message(msg(1))
    c.enqueue_control(b"{}")
    assert c.outbox_size == 0


async def test_outbox_overflow_by_count_closes_slow_consumer() -> None:
    overflowed: list[tuple[Connection, int]] = []
    c = conn(max_messages=3, on_overflow=lambda c, n: overflowed.append((c, n)))
    for n in range(1, 4):
        c.enqueue_message(msg(n))
    assert c.closed is None  # exactly at the limit is fine
    c.enqueue_message(msg(4))
    assert c.closed is errors.SLOW_CONSUMER
    assert overflowed == [(c, 4)]  # the four queued messages were dropped
    assert c.outbox_size == 0  # the outbox is dropped at once
    assert await c.next_batch(1.0) is None


async def test_outbox_overflow_by_bytes_closes_slow_consumer() -> None:
    overflowed: list[tuple[Connection, int]] = []
    big = b'"' + b"x" * 500 + b'"'
    c = conn(max_messages=1000, max_bytes=2000, on_overflow=lambda c, n: overflowed.append((c, n)))
    c.enqueue_message(msg(1, data=big))
    c.enqueue_message(msg(2, data=big))
    assert c.closed is None
    c.enqueue_message(msg(3, data=big))
    c.enqueue_message(msg(4, data=big))
    assert c.closed is errors.SLOW_CONSUMER
    assert overflowed == [(c, 4)]


async def test_control_frames_count_towards_the_limit() -> None:
    c = conn(max_messages=2)
    c.enqueue_control(b"{}")
    c.enqueue_control(b"{}")
    c.enqueue_control(b"{}")
    assert c.closed is errors.SLOW_CONSUMER


async def test_draining_frees_room_in_the_outbox() -> None:
    c = conn(max_messages=2, max_bytes=4096)
    for round_ in range(5):
        c.enqueue_message(msg(2 * round_ + 1))
        c.enqueue_message(msg(2 * round_ + 2))
        assert len(offsets(await c.next_batch(1.0))) == 2
    assert c.closed is None


async def test_overflow_of_one_connection_leaves_the_others_alone() -> None:
    registry = Registry()
    slow = conn(max_messages=2)
    fast = conn(max_messages=2)
    for c in (slow, fast):
        registry.add(c)
        registry.subscribe(c, "public:a")
    received: list[int] = []
    for n in range(1, 7):
        registry.fanout(pub(n))
        received += offsets(await fast.next_batch(1.0))
    assert slow.closed is errors.SLOW_CONSUMER
    assert fast.closed is None
    assert received == [1, 2, 3, 4, 5, 6]


# -- recovery -----------------------------------------------------------------------------------


async def test_recovery_replays_then_buffered_live_without_gap_or_duplicate() -> None:
    c = conn(max_messages=100)
    c.begin_recovery("public:a")
    # Live messages arrive while history is being read; 4 and 5 are in the replay too.
    for n in (4, 5, 6, 7):
        c.enqueue_message(msg(n))
    assert c.outbox_size == 0  # buffered, not queued
    c.enqueue_message(msg(1, channel="public:b"))  # other channels are not held back
    replay = [pub(n) for n in (3, 4, 5)]
    last = c.finish_recovery("public:a", replay, StreamPosition(2, EPOCH), head=b'{"op":"ack"}')
    assert last == StreamPosition(7, EPOCH)
    batch = await c.next_batch(1.0)
    assert batch is not None
    assert batch[1] == b'{"op":"ack"}'  # the reply comes before any replayed message
    a = [i.publication.offset for i in batch[2:] if isinstance(i, EncodedMessage)]
    assert a == [3, 4, 5, 6, 7]
    c.enqueue_message(msg(8))
    assert offsets(await c.next_batch(1.0)) == [8]


async def test_recovery_without_replay_skips_messages_at_or_below_the_top() -> None:
    c = conn()
    c.begin_recovery("public:a")
    c.enqueue_message(msg(10))
    c.enqueue_message(msg(11))
    last = c.finish_recovery("public:a", [], StreamPosition(10, EPOCH))
    assert last == StreamPosition(11, EPOCH)
    assert offsets(await c.next_batch(1.0)) == [11]


async def test_recovery_with_nothing_new_returns_the_start_position() -> None:
    c = conn()
    c.begin_recovery("public:a")
    after = StreamPosition(5, EPOCH)
    assert c.finish_recovery("public:a", [], after, head=b"{}") == after
    assert await c.next_batch(1.0) == [b"{}"]


async def test_recovery_keeps_messages_of_a_new_epoch() -> None:
    c = conn()
    c.begin_recovery("public:a")
    fresh = encode_message(Publication("public:a", 1, "e1", "msg", b"1", 0))
    c.enqueue_message(fresh)
    c.finish_recovery("public:a", [], StreamPosition(9, EPOCH))
    assert await c.next_batch(1.0) == [fresh]


async def test_recovery_on_a_closed_connection_queues_nothing() -> None:
    c = conn()
    c.begin_recovery("public:a")
    c.close(errors.SHUTDOWN)
    after = StreamPosition(1, EPOCH)
    assert c.finish_recovery("public:a", [pub(2)], after, head=b"{}") == after
    assert c.outbox_size == 0


async def test_abort_recovery_releases_the_channel() -> None:
    c = conn()
    c.begin_recovery("public:a")
    c.enqueue_message(msg(1))
    c.abort_recovery("public:a")
    c.enqueue_message(msg(2))
    assert offsets(await c.next_batch(1.0)) == [2]


# -- token expiry ------------------------------------------------------------------------------


async def test_expiry_closes_with_token_expired() -> None:
    c = conn()
    c.schedule_expiry(time.time() + 0.05, time.time())
    await asyncio.wait_for(c.wait_closed(), 2.0)
    assert c.closed is errors.TOKEN_EXPIRED_DISCONNECT


async def test_rescheduled_expiry_replaces_the_old_one() -> None:
    c = conn()
    c.schedule_expiry(time.time() + 0.05, time.time())
    c.schedule_expiry(time.time() + 60, time.time())
    await asyncio.sleep(0.15)
    assert c.closed is None
    c.schedule_expiry(None, time.time())
    c.close(errors.SHUTDOWN)


async def test_close_cancels_the_expiry_timer() -> None:
    c = conn()
    c.schedule_expiry(time.time() + 0.05, time.time())
    c.close(errors.SHUTDOWN)
    await asyncio.sleep(0.1)
    assert c.closed is errors.SHUTDOWN


# -- registry -----------------------------------------------------------------------------------


async def test_registry_reports_first_and_last_subscriber() -> None:
    registry = Registry()
    a, b = conn(), conn()
    registry.add(a)
    registry.add(b)
    assert registry.subscribe(a, "public:x") is True
    assert registry.subscribe(b, "public:x") is False
    assert registry.has_subscribers("public:x")
    assert registry.subscription_count == 2 and registry.channel_count == 1
    assert registry.unsubscribe(a, "public:x") is False
    assert registry.unsubscribe(b, "public:x") is True
    assert not registry.has_subscribers("public:x")
    assert registry.unsubscribe(b, "public:x") is False  # unknown channel: not "emptied"
    assert registry.channel_count == 0


async def test_registry_remove_returns_emptied_channels_only() -> None:
    registry = Registry()
    a, b = conn(), conn()
    for c in (a, b):
        registry.add(c)
    registry.subscribe(a, "public:x")
    registry.subscribe(a, "public:y")
    registry.subscribe(b, "public:y")
    assert registry.remove(a) == ["public:x"]
    assert len(registry) == 1
    assert registry.user_connections("42") == [b]
    assert registry.remove(b) == ["public:y"]
    assert registry.user_connection_count("42") == 0


async def test_registry_tracks_users_but_not_services() -> None:
    registry = Registry()
    svc = Connection(service(), "sse", max_messages=8, max_bytes=4096)
    registry.add(svc)
    registry.add(conn())
    assert registry.user_connection_count("42") == 1
    assert registry.user_connection_count("svc") == 0
    assert len(registry) == 2


async def test_fanout_encodes_once_and_shares_the_object() -> None:
    registry = Registry()
    conns = [conn() for _ in range(5)]
    for c in conns:
        registry.add(c)
        registry.subscribe(c, "public:x")
    bystander = conn()
    registry.add(bystander)
    registry.subscribe(bystander, "public:other")
    assert registry.fanout(pub(1, channel="public:x")) == 5
    items = [await first_item(c) for c in conns]
    assert isinstance(items[0], EncodedMessage)
    assert all(item is items[0] for item in items)
    assert bystander.outbox_size == 0
    assert registry.fanout(pub(1, channel="public:nobody")) == 0


# -- drains run by the flusher (the raw write paths) --------------------------------------------


class RecordingDrain:
    """A drain that takes the outbox like the raw writers do and records every call."""

    def __init__(self, c: Connection) -> None:
        self.conn = c
        self.calls: list[list[int] | None] = []

    def __call__(self) -> None:
        batch = self.conn.take_batch()
        self.calls.append(None if batch is None else offsets(batch))


async def next_iteration() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_a_burst_queued_in_one_iteration_is_drained_once() -> None:
    from hub.flusher import Flusher

    c = conn()
    drain = RecordingDrain(c)
    c.attach_drain(drain, Flusher())
    for n in range(1, 5):
        c.enqueue_message(msg(n))
    assert drain.calls == []  # nothing is written inside the fan-out loop itself
    await next_iteration()
    assert drain.calls == [[1, 2, 3, 4]]
    c.enqueue_message(msg(5))
    await next_iteration()
    assert drain.calls == [[1, 2, 3, 4], [5]]


async def test_what_was_queued_before_attaching_is_flushed() -> None:
    from hub.flusher import Flusher

    c = conn()
    c.enqueue_message(msg(1))
    drain = RecordingDrain(c)
    c.attach_drain(drain, Flusher())
    await next_iteration()
    assert drain.calls == [[1]]


async def test_close_runs_the_drain_which_sees_the_end() -> None:
    from hub.flusher import Flusher

    c = conn()
    drain = RecordingDrain(c)
    c.attach_drain(drain, Flusher())
    c.enqueue_message(msg(1))
    c.close(errors.SHUTDOWN)
    await next_iteration()
    assert drain.calls == [None]  # closed: the queued message is dropped, goodbye is due


async def test_detached_drain_is_not_called_again() -> None:
    from hub.flusher import Flusher

    c = conn()
    drain = RecordingDrain(c)
    c.attach_drain(drain, Flusher())
    c.detach_drain()
    c.enqueue_message(msg(1))
    await next_iteration()
    assert drain.calls == []


async def test_one_failing_drain_does_not_stall_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from hub.flusher import Flusher

    flusher = Flusher()
    broken, healthy = conn(), conn()

    def explode() -> None:
        raise RuntimeError("boom")

    drain = RecordingDrain(healthy)
    broken.attach_drain(explode, flusher)
    healthy.attach_drain(drain, flusher)
    broken.enqueue_message(msg(1))
    healthy.enqueue_message(msg(1))
    with caplog.at_level("ERROR", logger="herald.flusher"):
        await next_iteration()
    assert drain.calls == [[1]]
    assert "boom" in caplog.text
    # and the broken connection is still scheduled again next time (not stuck as pending)
    calls: list[int] = []
    broken.attach_drain(lambda: calls.append(1), flusher)
    broken.enqueue_message(msg(2))
    await next_iteration()
    assert calls == [1]
