"""``kill -9`` of redis-server with ``appendonly yes`` and ``appendfsync everysec`` (the
setting docs/operations.md recommends) under ``herald serve --workers 2``.

The Redis process crashes mid-stream (no clean shutdown, no final fsync) and is started
again from its append-only file. Nothing that a publisher saw acknowledged is lost
(every write reached the kernel before its reply), offsets continue in the same epoch,
and the subscribers — still on their original connections, WebSocket and SSE on both
workers — receive every message exactly once, in order: what the pub/sub connection
missed while Redis was down is read back from history by each worker's resync.
(A graceful restart, and a restart without persistence, are tested in
tests/e2e/test_redis_restart.py.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.e2e.conftest import running_herald
from tests.e2e.helpers import HeraldProcess, RedisServer, pinned_publishers

from .helpers import full_history, wait_until
from .subscribers import SSEResumer, WSResumer, check_exact, seq

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CHANNELS = 8


@pytest.fixture
def crashing_redis(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_server_factory(appendonly=True, extra_args=["--appendfsync", "everysec"])


@pytest.fixture
def herald(crashing_redis: RedisServer) -> Iterator[HeraldProcess]:
    env = {"HERALD_HEARTBEAT_INTERVAL": "2"}  # keeps idle SSE readers alive
    with running_herald(workers=2, redis_url=crashing_redis.url, env=env) as server:
        yield server


async def test_redis_kill_9_with_aof_everysec_loses_nothing_acknowledged(
    herald: HeraldProcess, crashing_redis: RedisServer
) -> None:
    uid = uuid.uuid4().hex[:8]
    # Several channels: each worker's resync after the outage reads them one by one while
    # live messages flow again.
    channels = [f"public:crash-{uid}-{i}" for i in range(CHANNELS)]
    publishers = await pinned_publishers(herald.base_url, 2)
    nodes = sorted(publishers)
    subscribers: list[WSResumer | SSEResumer] = []
    for index in range(2):
        ws = WSResumer(herald, f"crash-ws{index}-{uid}", channels)
        await ws.connect(avoid=nodes[1 - index])
        sse = SSEResumer(herald, f"crash-sse{index}-{uid}", channels)
        await sse.connect(avoid=nodes[1 - index])
        subscribers += [ws, sse]
    accepted: list[str] = []
    refused = 0
    ambiguous = 0
    stop = asyncio.Event()

    async def publish_loop() -> None:
        nonlocal refused, ambiguous
        for n in range(100_000):
            if stop.is_set():
                return
            try:
                response = await publishers[nodes[n % 2]].post(
                    "/api/v1/publish",
                    json={"channel": channels[n % CHANNELS], "event": "m", "data": {"n": n}},
                )
            except httpx.HTTPError:
                ambiguous += 1
                continue
            if response.status_code == 503:
                refused += 1  # Redis down: refused, so not published
            else:
                assert response.status_code == 200, response.text
                accepted.append(response.json()["offset"])
            await asyncio.sleep(0.005)

    publisher = asyncio.ensure_future(publish_loop())
    try:
        await wait_until(lambda: len(accepted) >= 200, 15)
        crashing_redis.kill()
        await wait_until(lambda: refused >= 5, 10)
        # Down long enough for the workers' reconnect backoff to grow: they come back
        # after publishing resumed, so each has a gap its resync must fill from history.
        await asyncio.sleep(1.5)
        crashing_redis.start()
        back = len(accepted)
        await wait_until(lambda: len(accepted) >= back + 300, 20)
        stop.set()
        await asyncio.wait_for(publisher, 10)

        history = {ch: await full_history(herald.base_url, ch) for ch in channels}
        for ch in channels:
            offsets = [m["offset"] for m in history[ch]]
            assert [seq(o) for o in offsets] == list(range(1, len(offsets) + 1)), ch
            assert len({o.split(":")[1] for o in offsets}) == 1, "the epoch survived"
        kept = {m["offset"] for ch in channels for m in history[ch]}
        lost = [offset for offset in accepted if offset not in kept]
        assert not lost, f"acknowledged but lost: {lost[:10]} ({len(lost)})"
        expected = {ch: [(m["offset"], m["data"]) for m in history[ch]] for ch in channels}
        await wait_until(
            lambda: all(
                len(sub.got[ch]) >= len(expected[ch]) for sub in subscribers for ch in channels
            ),
            15,
            must=False,
        )
        await asyncio.sleep(0.5)
        problems = [
            line
            for sub in subscribers
            for ch in channels
            for line in check_exact(f"{sub.name} {ch}", sub.got[ch], expected[ch])
        ]
        for sub in subscribers:  # the same connections throughout: nothing to resume
            if sub.sessions != 1 or sub.byes or not sub.connected or sub.problems:
                problems.append(f"{sub.name}: {sub.sessions} sessions, {sub.byes} {sub.problems}")
        assert not problems, problems
    finally:
        stop.set()
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        for sub in subscribers:
            await sub.close()
        for client in publishers.values():
            await client.aclose()
