"""Property: whatever the reconnects, every subscriber ends with exactly what was published.

Real processes: ``herald serve --workers 2`` on a test-owned redis-server. 10,000
messages go out over six channels in batches (``POST /api/v1/publish/batch``) through
both workers at once. Meanwhile WebSocket and SSE subscribers (each its own
user, on two or three channels, starting on both workers) disconnect at random moments
(seeded) — politely, by a TCP abort, or by the server (``force_reconnect``) — and
reconnect, often to the other worker: WebSocket resubscribes every channel with
``since`` = the last offset it processed there, SSE reconnects with ``Last-Event-ID`` =
the last ``id:`` it saw. At the end each subscriber holds, per channel, exactly the
published sequence: none lost, none twice, in order; every resume said
``recovered: true``.

``HERALD_TEST_SEED`` replays another schedule (the seed is in every failure message).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import running_herald
from tests.e2e.helpers import HeraldProcess, RedisServer, pinned_publishers

from .helpers import wait_until
from .subscribers import Received, SSEResumer, WSResumer, check_exact, seq

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

SEED = int(os.environ.get("HERALD_TEST_SEED", "20240604"))
MESSAGES = 10_000
CHANNELS = 6
BATCH = 100
WS_SUBSCRIBERS = 4
SSE_SUBSCRIBERS = 4
WS_ENDINGS = ("close", "abort", "server")
SSE_ENDINGS = ("close", "server")


@pytest.fixture
def herald(redis_server: RedisServer) -> Iterator[HeraldProcess]:
    if not redis_server.running:
        redis_server.start()
    env = {"HERALD_HISTORY_SIZE": "20000", "HERALD_PUBLISH_RATE_BURST": "10000"}
    with running_herald(workers=2, redis_url=redis_server.url, env=env) as server:
        yield server


async def test_random_reconnects_on_both_transports_lose_nothing_and_duplicate_nothing(
    herald: HeraldProcess,
) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    uid = uuid.uuid4().hex[:8]
    channels = [f"public:prop-{uid}-{i}" for i in range(CHANNELS)]
    subscribers: list[WSResumer | SSEResumer] = []
    for i in range(WS_SUBSCRIBERS):
        picked = rng.sample(channels, rng.choice((2, 3)))
        subscribers.append(WSResumer(herald, f"prop-ws{i}-{uid}", picked))
    for i in range(SSE_SUBSCRIBERS):
        picked = rng.sample(channels, rng.choice((2, 3)))
        subscribers.append(SSEResumer(herald, f"prop-sse{i}-{uid}", picked))
    publishers = await pinned_publishers(herald.base_url, 2)
    nodes = sorted(publishers)
    published: dict[str, list[Received]] = {ch: [] for ch in channels}
    publishing_done = asyncio.Event()
    endings: list[str] = []
    failures: list[BaseException] = []

    async def drive(index: int, sub: WSResumer | SSEResumer) -> None:
        own = random.Random(SEED * 1000 + index)
        endings_of = WS_ENDINGS if isinstance(sub, WSResumer) else SSE_ENDINGS
        for _ in range(10_000):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(publishing_done.wait(), own.uniform(0.05, 1.2))
            if publishing_done.is_set():
                return
            if sub.connected:
                how = own.choice(endings_of)
                endings.append(how)
                await sub.close(how)
            await asyncio.sleep(own.uniform(0.0, 0.4))
            # Half of the reconnects go to the other worker on purpose.
            await sub.connect(avoid=sub.node if own.random() < 0.5 else None)

    async def driven(index: int, sub: WSResumer | SSEResumer) -> None:
        try:
            await drive(index, sub)
        except Exception as exc:
            failures.append(exc)
            raise

    drivers: list[asyncio.Task[None]] = []
    try:
        # Everyone subscribed before the first publication, alternately on each worker.
        for index, sub in enumerate(subscribers):
            await sub.connect(avoid=nodes[(index + 1) % 2])
        assert {s.node for s in subscribers if isinstance(s, WSResumer)} == set(nodes)
        assert {s.node for s in subscribers if isinstance(s, SSEResumer)} == set(nodes)
        drivers = [
            asyncio.ensure_future(driven(index, sub)) for index, sub in enumerate(subscribers)
        ]

        async def publish_through(node: str, batches: range) -> None:
            """Publish ``batches`` through one worker; the other does the same meanwhile."""
            own = random.Random(f"{SEED}-{batches.start}")
            for batch in batches:
                messages: list[dict[str, Any]] = []
                for i in range(BATCH):
                    n = batch * BATCH + i
                    channel = own.choice(channels)
                    messages.append({"channel": channel, "event": "m", "data": {"n": n}})
                response = await publishers[node].post(
                    "/api/v1/publish/batch", json={"messages": messages}
                )
                assert response.status_code == 200, response.text
                assert response.headers["x-herald-node"] == node
                for message, result in zip(messages, response.json()["results"], strict=True):
                    assert result["channel"] == message["channel"]
                    published[message["channel"]].append((result["offset"], message["data"]))
                assert not failures, failures
                await asyncio.sleep(own.uniform(0.0, 0.2))

        half = MESSAGES // BATCH // 2
        await asyncio.gather(
            publish_through(nodes[0], range(half)),
            publish_through(nodes[1], range(half, 2 * half)),
        )
        publish_seconds = time.monotonic() - started
        publishing_done.set()
        await asyncio.wait_for(asyncio.gather(*drivers), 30)

        assert sum(len(v) for v in published.values()) == MESSAGES
        for ch in channels:  # publish order is offset order; offsets grow by exactly one
            published[ch].sort(key=lambda item: seq(item[0]))
            assert [seq(o) for o, _ in published[ch]] == list(range(1, len(published[ch]) + 1))

        def complete() -> bool:
            for sub in subscribers:
                if not sub.connected:  # e.g. closed as a slow consumer: resume
                    return False
                if any(len(sub.got[ch]) < len(published[ch]) for ch in sub.channels):
                    return False
            return True

        async def settle() -> bool:
            for sub in subscribers:
                if not sub.connected:
                    await sub.close()
                    await sub.connect()
            return complete()

        await wait_until(settle, 30, interval=0.1, must=False)
        await asyncio.sleep(0.5)  # anything delivered twice would arrive now

        problems = [
            line
            for sub in subscribers
            for ch in sub.channels
            for line in check_exact(f"{sub.name} {ch}", sub.got[ch], published[ch])
        ]
        for sub in subscribers:
            problems += [f"{sub.name}: {p}" for p in sub.problems]
            not_recovered = [ch for ch, flag in sub.recovered if not flag]
            if not_recovered:
                problems.append(f"{sub.name}: recovered false for {not_recovered}")
            unexpected = set(sub.byes) - {"force_reconnect", "slow_consumer"}
            if unexpected:
                problems.append(f"{sub.name}: unexpected goodbyes {sorted(unexpected)}")
        assert not problems, (f"seed {SEED}", problems)

        # The schedule really exercised resumption, on both workers and both transports.
        sessions = {sub.name: sub.sessions for sub in subscribers}
        assert all(count >= 3 for count in sessions.values()), (f"seed {SEED}", sessions)
        for kind in (WSResumer, SSEResumer):
            used = {node for s in subscribers if isinstance(s, kind) for node in s.nodes}
            assert set(nodes) <= used, (kind.__name__, used)
        assert {"close", "server"} <= set(endings), endings
        assert publish_seconds < 60, publish_seconds
    finally:
        publishing_done.set()
        for task in drivers:
            task.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)
        for sub in subscribers:
            with contextlib.suppress(Exception):
                await sub.close()
        for client in publishers.values():
            await client.aclose()
