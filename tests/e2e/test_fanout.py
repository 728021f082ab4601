"""Fan-out across workers: ``herald serve --workers 2`` on a real redis-server.

WebSocket and SSE subscribers held by *both* workers receive every message published
through the HTTP publish API, whichever worker took the publish, in publish order and
exactly once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import pytest

from .helpers import (
    HeraldProcess,
    SSEClient,
    WSClient,
    connect_on_nodes,
    pinned_publishers,
    publish_fresh,
    sse_connect,
    token,
    ws_connect,
    ws_connect_first_frame,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

SINGLE = 1000
BATCHES = 5
BATCH_SIZE = 100
TOTAL = SINGLE + BATCHES * BATCH_SIZE


async def _collect_ws(client: WSClient, channel: str, count: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len(got) < count:
        obj = await client.recv(timeout=20)
        if obj.get("op") == "message" and obj["channel"] == channel:
            got.append(obj)
    return got


async def _collect_sse(client: SSEClient, channel: str, count: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len(got) < count:
        event = await client.next(timeout=20)
        assert event is not None, "SSE stream ended early"
        if event.event == "connected":
            continue
        assert event.id, "every SSE event carries an id"
        envelope = event.json()
        assert envelope["event"] == event.event
        if envelope["channel"] == channel:
            got.append(envelope)
    return got


def _assert_complete_in_order(
    name: str, got: list[dict[str, Any]], offsets: list[str], expected_count: int
) -> None:
    numbers = [message["data"]["n"] for message in got]
    duplicates = [n for n, times in Counter(numbers).items() if times > 1]
    assert not duplicates, f"{name}: duplicates {duplicates[:10]}"
    missing = sorted(set(range(expected_count)) - set(numbers))
    assert not missing, f"{name}: missing {missing[:10]} ({len(missing)} in all)"
    assert numbers == list(range(expected_count)), f"{name}: out of order"
    assert [message["offset"] for message in got] == offsets, f"{name}: offsets differ"


async def test_fanout_two_workers_ws_and_sse_receive_everything_in_order(
    cluster: HeraldProcess,
) -> None:
    channel = f"public:fanout-{uuid.uuid4().hex[:8]}"
    user_token = token("fan")

    async def new_ws() -> WSClient:
        return await ws_connect(cluster.ws_url, user_token)

    async def new_sse() -> SSEClient:
        return await sse_connect(cluster.base_url, [channel], user_token)

    ws_clients = await connect_on_nodes(new_ws, 2)
    sse_clients = await connect_on_nodes(new_sse, 2)
    first_frame = await ws_connect_first_frame(cluster.ws_url, user_token)
    publishers = await pinned_publishers(cluster.base_url, 2)
    everyone: list[Any] = [*ws_clients.values(), *sse_clients.values(), first_frame]
    tasks: dict[str, asyncio.Task[list[dict[str, Any]]]] = {}
    try:
        for client in [*ws_clients.values(), first_frame]:
            await client.subscribe(channel)
        assert set(ws_clients) == set(sse_clients) == set(publishers), "two workers"

        for node, client in ws_clients.items():
            tasks[f"ws@{node}"] = asyncio.ensure_future(_collect_ws(client, channel, TOTAL))
        for node, client in sse_clients.items():
            tasks[f"sse@{node}"] = asyncio.ensure_future(_collect_sse(client, channel, TOTAL))
        tasks["ws-first-frame"] = asyncio.ensure_future(_collect_ws(first_frame, channel, TOTAL))

        nodes = list(publishers)
        offsets: list[str] = []
        took: Counter[str] = Counter()
        for n in range(SINGLE):
            node = nodes[n % 2]
            response = await publishers[node].post(
                "/api/v1/publish",
                json={"channel": channel, "event": "tick", "data": {"n": n}},
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-herald-node"] == node
            took[node] += 1
            body = response.json()
            assert body["channel"] == channel
            offsets.append(body["offset"])

        for b in range(BATCHES):
            node = nodes[b % 2]
            first = SINGLE + b * BATCH_SIZE
            messages = [
                {"channel": channel, "event": "batch", "data": {"n": n}}
                for n in range(first, first + BATCH_SIZE)
            ]
            response = await publishers[node].post(
                "/api/v1/publish/batch", json={"messages": messages}
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-herald-node"] == node
            results = response.json()["results"]
            assert len(results) == BATCH_SIZE
            offsets.extend(result["offset"] for result in results)

        assert all(took[node] == SINGLE // 2 for node in nodes), took
        seqs = [int(offset.split(":")[0]) for offset in offsets]
        assert seqs == list(range(seqs[0], seqs[0] + TOTAL)), "offsets grow by one"
        assert len({offset.split(":", 1)[1] for offset in offsets}) == 1, "one epoch"

        done, pending = await asyncio.wait(tasks.values(), timeout=30)
        assert not pending, [name for name, task in tasks.items() if task in pending]
        for name, task in tasks.items():
            _assert_complete_in_order(name, task.result(), offsets, TOTAL)

        # Nothing more arrives than was published (exactly once, also after the end).
        marker = await publish_fresh(cluster.base_url, channel, "end", {"n": TOTAL})
        assert marker.status_code == 200
        for client in [*ws_clients.values(), first_frame]:
            message = await client.recv_until(lambda obj: obj.get("op") == "message")
            assert message["data"] == {"n": TOTAL}, message
        for client in sse_clients.values():
            event = await client.next_named("end")
            assert event.json()["data"] == {"n": TOTAL}
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for client in everyone:
            await client.aclose()
        for publisher in publishers.values():
            await publisher.aclose()


async def test_fresh_connections_reach_both_workers_and_every_subscriber(
    cluster: HeraldProcess,
) -> None:
    """Publishes on fresh TCP connections: both workers take some; all are delivered."""
    channel = f"user:fresh-{uuid.uuid4().hex[:8]}"
    user = channel.split(":", 1)[1]

    async def new_ws() -> WSClient:
        return await ws_connect(cluster.ws_url, token(user))

    ws_clients = await connect_on_nodes(new_ws, 2)
    try:
        for client in ws_clients.values():
            await client.subscribe(channel)
        took: Counter[str] = Counter()
        count = 0
        # Which worker accepts a fresh connection is the kernel's choice, and it may
        # favour one for a while: publish at least 60, and on until both took some
        # (bounded: a worker that never accepts is a failure).
        while count < 60 or (len(took) < 2 and count < 400):
            response = await publish_fresh(cluster.base_url, channel, "fresh", {"n": count})
            assert response.status_code == 200, response.text
            took[response.headers["x-herald-node"]] += 1
            count += 1
        assert len(took) == 2, f"all {count} fresh publishes went to one worker: {took}"
        for node, client in ws_clients.items():
            got = await _collect_ws(client, channel, count)
            assert [m["data"]["n"] for m in got] == list(range(count)), node
    finally:
        for client in ws_clients.values():
            await client.aclose()


async def test_subscribers_joining_mid_stream_cost_existing_subscribers_nothing(
    cluster: HeraldProcess,
) -> None:
    """While messages flow, new subscribers keep joining the same channel on the same
    worker (with and without ``since``): the first subscriber still receives every
    message exactly once, and each newcomer gets a gapless, duplicate-free stream that
    starts right after its ``since`` (or after the offset its ack reported)."""
    channel = f"public:join-{uuid.uuid4().hex[:8]}"
    user_token = token("joiner")
    first = await ws_connect(cluster.ws_url, user_token)
    await first.subscribe(channel)
    publishers = await pinned_publishers(cluster.base_url, 2)
    joiners: list[tuple[WSClient, int]] = []  # (client, first offset it must receive)
    offsets: list[str] = []
    total = 400
    stop = asyncio.Event()

    def seq(offset: str) -> int:
        return int(offset.split(":")[0])

    async def publish_all() -> None:
        nodes = list(publishers)
        for n in range(total):
            response = await publishers[nodes[n % 2]].post(
                "/api/v1/publish", json={"channel": channel, "event": "tick", "data": {"n": n}}
            )
            assert response.status_code == 200, response.text
            offsets.append(response.json()["offset"])

    async def join_repeatedly() -> None:
        for i in range(200):
            if stop.is_set() or len(joiners) >= 24:
                return
            await asyncio.sleep(0.02)
            client = await ws_connect(cluster.ws_url, token(f"joiner-{i}"))
            if client.node != first.node:
                await client.aclose()
                continue
            if i % 2 and len(offsets) > 5:
                since = offsets[-5]
                ack = await client.subscribe(channel, since=since)
                assert ack["recovered"] is True, ack
                joiners.append((client, seq(since) + 1))
            else:
                ack = await client.subscribe(channel)
                joiners.append((client, seq(ack["offset"]) + 1))

    got: list[dict[str, Any]] = []

    async def collect() -> None:
        for _ in range(100_000):
            obj = await first.recv(timeout=60)
            if obj.get("op") == "message":
                got.append(obj)

    publisher_task = asyncio.ensure_future(publish_all())
    collector = asyncio.ensure_future(collect())
    joiner_task = asyncio.ensure_future(join_repeatedly())
    try:
        await asyncio.wait_for(publisher_task, 60)
        stop.set()
        await asyncio.wait_for(joiner_task, 10)
        for _ in range(100):
            if len(got) >= total:
                break
            await asyncio.sleep(0.05)
        _assert_complete_in_order("first subscriber", got, offsets, total)
        assert len(joiners) >= 3, "too few joiners landed on the first subscriber's worker"
        last = seq(offsets[-1])
        for index, (client, start) in enumerate(joiners):
            seen: list[int] = []
            for _ in range(total + 10):
                if seen and seen[-1] >= last:
                    break
                obj = await client.recv(timeout=10)
                if obj.get("op") == "message":
                    seen.append(seq(obj["offset"]))
            if start > last:
                continue
            assert seen == list(range(start, last + 1)), f"joiner {index} from {start}: {seen}"
    finally:
        stop.set()
        for task in (publisher_task, collector, joiner_task):
            task.cancel()
        await asyncio.gather(publisher_task, collector, joiner_task, return_exceptions=True)
        await asyncio.gather(*(client.aclose() for client, _ in joiners))
        await first.aclose()
        for publisher in publishers.values():
            await publisher.aclose()
