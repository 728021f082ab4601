"""Redis comes back without its last writes, same epoch: no client is fooled.

A real loss of the tail: a test-owned redis-server with an append-only file takes three
publications (fsynced), stops appending (``CONFIG SET appendonly no``), takes two more,
and is killed. Restarted, it loads the file: the channel's top is 3 again, in the same
epoch, while the subscriber of ``herald serve --workers 2`` saw offset 5. The worker
notices at its resync: the subscriber is told ``insufficient_state``, and the channel
gets a new epoch, so the offsets 4 and 5 that the next publications reuse are never
mistaken for the lost ones: any position past the lost tail answers ``recovered: false``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from .conftest import running_herald
from .helpers import (
    HeraldProcess,
    RedisServer,
    WSClient,
    publish_fresh,
    token,
    ws_connect,
    ws_open,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


@pytest.fixture
def own_redis(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_server_factory(appendonly=True)


@pytest.fixture
def herald(own_redis: RedisServer) -> Iterator[HeraldProcess]:
    with running_herald(workers=2, redis_url=own_redis.url) as server:
        yield server


async def _publish(herald: HeraldProcess, channel: str, n: int) -> str:
    """Publish; a 503 (a worker still reconnecting to Redis) was not applied: retry it."""
    deadline = time.monotonic() + 15
    while True:
        response = await publish_fresh(herald.base_url, channel, "tick", {"n": n})
        if response.status_code != 503:
            break
        assert time.monotonic() < deadline, "publishing never recovered from the restart"
        await asyncio.sleep(0.2)
    assert response.status_code == 200, response.text
    return str(response.json()["offset"])


async def _subscribed(
    herald: HeraldProcess, credential: str, channel: str, since: str
) -> tuple[WSClient, dict[str, Any]]:
    """Connect and subscribe with ``since``. Right after the restart the worker taking
    the connection may still be reconnecting to Redis: a client retries what the hub
    calls temporary, and so does this (bounded)."""
    deadline = time.monotonic() + 15
    while True:
        client = await ws_open(herald.ws_url, credential)
        first = await client.recv()
        if first["op"] == "connected":
            reply = await client.request({"op": "subscribe", "channel": channel, "since": since})
            if reply["op"] == "ack":
                return client, reply
            first = reply
        await client.aclose()
        assert first.get("code") == "unavailable", first
        assert time.monotonic() < deadline, "the hub never recovered from the restart"
        await asyncio.sleep(0.2)


async def _next_message(client: WSClient) -> dict[str, Any]:
    return await client.recv_until(lambda obj: obj.get("op") == "message", 10)


async def test_a_lost_tail_gives_the_channel_a_new_epoch(
    herald: HeraldProcess, own_redis: RedisServer
) -> None:
    channel = f"public:lossy-{uuid.uuid4().hex[:8]}"
    credential = token("watcher")
    client = await ws_connect(herald.ws_url, credential)
    await client.subscribe(channel)
    offsets = []
    for n in range(3):
        offsets.append(await _publish(herald, channel, n))
        assert (await _next_message(client))["offset"] == offsets[-1]
    admin = Redis.from_url(own_redis.url)
    try:
        await admin.config_set("appendonly", "no")  # what follows is never written to disk
    finally:
        await admin.aclose()
    for n in range(3, 5):
        offsets.append(await _publish(herald, channel, n))
        assert (await _next_message(client))["offset"] == offsets[-1]
    old_epoch = offsets[-1].split(":")[1]
    assert [o.split(":")[0] for o in offsets] == ["1", "2", "3", "4", "5"]

    own_redis.kill()
    own_redis.start()  # loads the AOF: top 3, same epoch

    seen, code = await client.wait_closed(timeout=15)
    byes = [obj for obj in seen if obj.get("op") == "bye"]
    assert [bye["code"] for bye in byes] == ["insufficient_state"] and code == 4008

    fresh, ack = await _subscribed(herald, credential, channel, offsets[-1])
    try:
        assert ack["recovered"] is False
        reused = await _publish(herald, channel, 5)
        number, epoch = reused.split(":")
        assert number == "4" and epoch != old_epoch  # offset 4 again, but a new epoch
        assert (await _next_message(fresh))["offset"] == reused
        for lost in offsets[3:]:  # a client that saw 4 or 5 is not fooled by the new 4
            late, ack = await _subscribed(herald, credential, channel, lost)
            await late.aclose()
            assert ack["recovered"] is False
    finally:
        await fresh.aclose()
        await client.aclose()
