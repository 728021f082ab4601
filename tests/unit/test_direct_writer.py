"""hub.transports.direct.DirectWriter: the drain shared by the raw WebSocket and SSE paths.

A transport double records what the drain hands it and reports a chosen number of
unread bytes, so each rule of the drain is checked on its own: one write per batch,
the slow-consumer cut *before* a batch that would pass the byte limit (so a cut client
never holds more than the limit), a write to a gone client, and the goodbye said once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from hub import errors
from hub.connection import Connection, Outbound
from hub.errors import Disconnect
from hub.hub import Hub
from hub.protocol import EncodedMessage, Publication, encode_message
from hub.settings import Settings
from hub.transports.direct import DirectWriter

from .conftest import running_hub, user

MAX_BYTES = 1000
FRAMING = b"f" * 64  # per item, as WebSocket headers or SSE fields add to each message


class RecordingWriter(DirectWriter):
    """Encodes each item behind some framing; records writes and goodbyes."""

    __slots__ = ("alive", "buffered", "goodbyes", "writes")

    def __init__(self, hub: Hub, conn: Connection) -> None:
        super().__init__(hub, conn, "websocket")
        self.writes: list[bytes] = []
        self.goodbyes: list[str] = []
        self.buffered = 0
        self.alive = True

    def _encode(self, batch: list[Outbound]) -> tuple[bytes, int]:
        parts = [item.envelope if isinstance(item, EncodedMessage) else item for item in batch]
        count = sum(isinstance(item, EncodedMessage) for item in batch)
        return b"".join(FRAMING + part for part in parts), count

    def _write(self, data: bytes) -> bool:
        if self.alive:
            self.writes.append(data)
        return self.alive

    def _buffered(self) -> int:
        return self.buffered

    def _say_goodbye(self, disconnect: Disconnect) -> None:
        self.goodbyes.append(disconnect.reason)


def message(n: int, size: int = 100) -> EncodedMessage:
    data = b'"' + b"x" * (size - 2) + b'"'
    return encode_message(Publication("public:a", n, "e0", "msg", data, 1_700_000_000_000))


@pytest.fixture
async def hub(settings_factory: Callable[..., Settings]) -> AsyncIterator[Hub]:
    async with running_hub(settings_factory()) as running:
        yield running


def attach(hub: Hub) -> tuple[Connection, RecordingWriter]:
    conn = Connection(user("7"), "websocket", max_messages=100, max_bytes=MAX_BYTES)
    writer = RecordingWriter(hub, conn)
    return conn, writer


def sample(hub: Hub, name: str, **labels: str) -> float:
    hub.metrics.flush()
    value = hub.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def slow_consumers(hub: Hub) -> float:
    return sample(hub, "herald_slow_consumer_disconnects_total")


def delivered(hub: Hub) -> float:
    return sample(hub, "herald_messages_delivered_total", transport="websocket")


async def test_a_batch_is_one_write_and_counts_its_deliveries(hub: Hub) -> None:
    conn, writer = attach(hub)
    before = delivered(hub)
    conn.enqueue_message(message(1))
    conn.enqueue_control(b"ctl")
    conn.enqueue_message(message(2))
    writer.drain()
    assert len(writer.writes) == 1
    assert writer.writes[0].count(FRAMING) == 3
    assert delivered(hub) - before == 2  # the control frame is not a delivery
    assert conn.closed is None


async def test_a_batch_that_fits_beside_unread_bytes_is_written(hub: Hub) -> None:
    conn, writer = attach(hub)
    writer.buffered = MAX_BYTES - 400
    conn.enqueue_message(message(1, size=100))
    writer.drain()
    assert len(writer.writes) == 1
    assert conn.closed is None


async def test_a_batch_that_would_pass_the_limit_is_not_written_and_cuts(hub: Hub) -> None:
    conn, writer = attach(hub)
    before = slow_consumers(hub)
    writer.buffered = MAX_BYTES - 50
    conn.enqueue_message(message(1, size=100))
    writer.drain()
    assert writer.writes == []  # the client keeps at most the limit, not limit + batch
    assert conn.closed is not None and conn.closed.reason == errors.SLOW_CONSUMER.reason
    assert writer.goodbyes == [errors.SLOW_CONSUMER.reason]
    assert slow_consumers(hub) - before == 1
    conn.enqueue_message(message(2))
    writer.drain()
    assert writer.writes == [] and len(writer.goodbyes) == 1  # nothing after the end


async def test_a_large_batch_to_a_client_that_took_everything_is_written(hub: Hub) -> None:
    # Framing can make a batch a little larger than the outbox accounted; with nothing
    # unread the kernel takes what it can and the next batch decides.
    conn, writer = attach(hub)
    for n in range(3):
        conn.enqueue_message(message(n, size=200))
    assert conn.closed is None
    writer.buffered = 0
    writer.drain()
    assert len(writer.writes) == 1 and len(writer.writes[0]) > MAX_BYTES
    assert conn.closed is None


async def test_a_gone_client_is_closed_without_a_goodbye(hub: Hub) -> None:
    conn, writer = attach(hub)
    writer.alive = False
    conn.enqueue_message(message(1))
    writer.drain()
    assert conn.closed is not None and conn.closed.reason == errors.CLIENT_GONE.reason
    assert writer.goodbyes == []


async def test_a_server_close_says_goodbye_once(hub: Hub) -> None:
    conn, writer = attach(hub)
    conn.enqueue_message(message(1))
    hub.close_connection(conn, errors.SHUTDOWN)
    writer.drain()
    writer.drain()
    assert writer.writes == []  # what was queued is dropped with the close
    assert writer.goodbyes == [errors.SHUTDOWN.reason]


async def test_a_client_close_gets_no_goodbye(hub: Hub) -> None:
    conn, writer = attach(hub)
    conn.close(errors.CLIENT_CLOSED)
    writer.drain()
    assert writer.goodbyes == []
