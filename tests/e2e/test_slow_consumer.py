"""A subscriber that stops reading is cut with ``slow_consumer``; the others never wait.

Two workers on Redis with a small outbox. A reading subscriber and a non-reading one
(tiny socket receive buffer, a client library that stops reading its socket once one
message is queued) sit on the same worker. Large messages are published until the
slow one's socket buffers and outbox are full: it is disconnected (the metric says
so, and when it finally reads it finds the connection closed), while the reading
subscriber received every message, in order, on its original connection.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import running_herald
from .helpers import (
    HeraldProcess,
    RedisServer,
    WSClient,
    metric,
    metrics,
    pinned_publishers,
    token,
    ws_connect,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

OUTBOX_MESSAGES = 64
OUTBOX_BYTES = 2 * 1024 * 1024
MESSAGE_BYTES = 32 * 1024
BATCH = 16  # well inside the outbox: a reading subscriber always has room
MAX_BATCHES = 80  # 40 MB at most, far more than loopback socket buffers hold


@pytest.fixture(scope="module")
def herald(redis_server: RedisServer) -> Iterator[HeraldProcess]:
    env = {
        "HERALD_OUTBOX_MAX_MESSAGES": str(OUTBOX_MESSAGES),
        "HERALD_OUTBOX_MAX_BYTES": str(OUTBOX_BYTES),
        "HERALD_SEND_TIMEOUT": "30",  # the outbox limit, not the send timeout, must act
    }
    with running_herald(workers=2, redis_url=redis_server.url, env=env) as server:
        yield server


def _small_buffer_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def test_slow_consumer_is_disconnected_and_reader_keeps_receiving(
    herald: HeraldProcess,
) -> None:
    channel = f"public:slow-{uuid.uuid4().hex[:8]}"
    fast = await ws_connect(herald.ws_url, token("fast"), max_size=None)
    slow: WSClient | None = None
    others: list[WSClient] = []
    publishers = await pinned_publishers(herald.base_url, 2)
    try:
        for _ in range(30):
            candidate = await ws_connect(
                herald.ws_url,
                token("slow"),
                sock=_small_buffer_socket(herald.port),
                max_size=None,
                max_queue=1,
                ping_interval=None,
            )
            if candidate.node == fast.node:
                slow = candidate
                break
            others.append(candidate)
        assert slow is not None, "no connection landed on the fast subscriber's worker"
        for client in others:
            await client.aclose()
        await fast.subscribe(channel)
        await slow.subscribe(channel)
        before = await metrics(herald.base_url)

        payload = "x" * MESSAGE_BYTES
        publishers_list = list(publishers.values())
        received = 0
        cut = False
        for b in range(MAX_BATCHES):
            messages = [
                {"channel": channel, "event": "big", "data": {"n": n, "pad": payload}}
                for n in range(b * BATCH, (b + 1) * BATCH)
            ]
            response = await publishers_list[b % 2].post(
                "/api/v1/publish/batch", json={"messages": messages}
            )
            assert response.status_code == 200, response.text
            # Pace the publisher by the *reading* subscriber only.
            for _ in range(BATCH):
                message = await fast.recv_until(lambda obj: obj.get("op") == "message", 10)
                assert message["data"]["n"] == received, "the reader lost or reordered"
                received += 1
            samples = await metrics(herald.base_url)
            if metric(samples, "herald_slow_consumer_disconnects_total") > metric(
                before, "herald_slow_consumer_disconnects_total"
            ):
                cut = True
                break
        assert cut, f"no slow_consumer disconnect after {received} messages"
        published = received

        # The reader is unaffected: still on its first connection, still receiving.
        response = await publishers_list[0].post(
            "/api/v1/publish", json={"channel": channel, "event": "after", "data": "ok"}
        )
        assert response.status_code == 200
        after = await fast.recv_until(lambda obj: obj.get("op") == "message")
        assert after["event"] == "after"
        assert fast.close_code is None

        samples = await metrics(herald.base_url)
        delta = metric(samples, "herald_slow_consumer_disconnects_total") - metric(
            before, "herald_slow_consumer_disconnects_total"
        )
        assert delta == 1, "exactly one subscriber (the slow one) was cut"

        # When the slow client finally reads, it finds an end: what its buffers held,
        # perhaps the bye, then the close.
        numbers: list[int] = []
        byes = []
        try:
            for _ in range(published + 10):
                obj = await slow.recv(timeout=10)
                if obj.get("op") == "message":
                    assert obj["event"] == "big", "a message published after the cut came"
                    numbers.append(obj["data"]["n"])
                elif obj.get("op") == "bye":
                    byes.append(obj)
        except ConnectionClosed:
            pass
        else:
            raise AssertionError("the slow consumer's connection was not closed")
        assert numbers == list(range(len(numbers))), "whatever it got was in order"
        assert len(numbers) < published, "it was cut before it could get everything"
        if byes:
            assert [bye["code"] for bye in byes] == ["slow_consumer"]
            assert byes[0]["reconnect"] is True
        assert slow.close_code in (4001, 1006, None), slow.close_code
    finally:
        for client in [fast, *others, *([slow] if slow else [])]:
            await client.aclose()
        for publisher in publishers.values():
            await publisher.aclose()
