"""Resume on another worker: history lives in Redis, not in a worker.

An SSE client that reconnects with ``Last-Event-ID`` to the *other* worker gets exactly
what it missed on every channel of its connection (no loss, no duplicate); a
WebSocket client that subscribes there with ``since`` likewise.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from .helpers import (
    HeraldProcess,
    SSEClient,
    WSClient,
    pinned_publishers,
    sse_connect,
    token,
    ws_connect,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


async def _on_other_node(factory: Any, node: str, attempts: int = 40) -> Any:
    for _ in range(attempts):
        client = await factory()
        if client.node != node:
            return client
        await client.aclose()
    raise AssertionError(f"every connection landed on {node}")


async def test_sse_last_event_id_resumes_every_channel_on_the_other_worker(
    cluster: HeraldProcess,
) -> None:
    user = f"resume-{uuid.uuid4().hex[:8]}"
    channels = [f"user:{user}", f"public:resume-{user}"]
    credential = token(user)
    publishers = await pinned_publishers(cluster.base_url, 2)
    nodes = list(publishers)
    first: SSEClient | None = None
    second: SSEClient | None = None

    async def publish(n: int) -> None:
        response = await publishers[nodes[n % 2]].post(
            "/api/v1/publish",
            json={"channel": channels[n % 2], "event": "step", "data": {"n": n}},
        )
        assert response.status_code == 200, response.text

    try:
        first = await sse_connect(cluster.base_url, channels, credential)
        for n in range(10):
            await publish(n)
        cursor = None
        for n in range(6):
            event = await first.next_named("step")
            assert event.json()["data"] == {"n": n}
            cursor = event.id
        assert cursor
        gone_from = first.node
        await first.aclose()
        first = None
        for n in range(10, 20):
            await publish(n)

        async def reconnect() -> SSEClient:
            return await sse_connect(
                cluster.base_url, channels, credential, headers={"Last-Event-ID": cursor}
            )

        second = await _on_other_node(reconnect, gone_from)
        assert second.connected is not None
        for channel in channels:
            assert second.connected["channels"][channel]["recovered"] is True
        got: dict[str, list[int]] = {channel: [] for channel in channels}
        for _ in range(14):
            envelope = (await second.next_named("step")).json()
            got[envelope["channel"]].append(envelope["data"]["n"])
        # Order is per channel (channels are replayed one after the other).
        assert got == {channels[0]: list(range(6, 20, 2)), channels[1]: list(range(7, 20, 2))}
        await publish(20)
        assert (await second.next_named("step")).json()["data"] == {"n": 20}
    finally:
        for client in (first, second):
            if client is not None:
                await client.aclose()
        for publisher in publishers.values():
            await publisher.aclose()


async def test_ws_subscribe_since_recovers_on_the_other_worker(cluster: HeraldProcess) -> None:
    user = f"since-{uuid.uuid4().hex[:8]}"
    channel = f"user:{user}"
    credential = token(user)
    publishers = await pinned_publishers(cluster.base_url, 2)
    nodes = list(publishers)
    first: WSClient | None = None
    second: WSClient | None = None
    try:
        first = await ws_connect(cluster.ws_url, credential)
        await first.subscribe(channel)
        offsets = []
        for n in range(8):
            response = await publishers[nodes[n % 2]].post(
                "/api/v1/publish", json={"channel": channel, "event": "step", "data": n}
            )
            assert response.status_code == 200
            offsets.append(response.json()["offset"])
        for n in range(3):
            message = await first.recv_until(lambda obj: obj.get("op") == "message")
            assert message["data"] == n
        gone_from = first.node
        await first.aclose()
        first = None

        async def reconnect() -> WSClient:
            return await ws_connect(cluster.ws_url, credential)

        second = await _on_other_node(reconnect, gone_from)
        ack = await second.subscribe(channel, since=offsets[2])
        assert ack["recovered"] is True
        replayed = []
        for _ in range(5):
            message = await second.recv_until(lambda obj: obj.get("op") == "message")
            replayed.append((message["data"], message["offset"]))
        assert replayed == [(n, offsets[n]) for n in range(3, 8)]
    finally:
        for client in (first, second):
            if client is not None:
                await client.aclose()
        for publisher in publishers.values():
            await publisher.aclose()
