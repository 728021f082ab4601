"""``kill -9`` of the worker holding a subscriber (``herald serve --workers 2``, real Redis).

A WebSocket and an SSE subscriber, both on the same worker and each on two channels,
lose their connection when that worker is SIGKILLed mid-stream while a publisher keeps
publishing. They reconnect (landing on the other worker: the killed one is gone) and
resume — WebSocket with ``since``, SSE with ``Last-Event-ID`` — and end with exactly the
channels' sequences as history holds them: none lost, none twice, in order. uvicorn
replaces the killed worker.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import running_herald
from tests.e2e.helpers import SERVICE_HEADERS, HeraldProcess, RedisServer, metric, metrics

from .helpers import (
    client_port,
    full_history,
    kill_worker,
    pid_holding,
    wait_until,
    wait_worker_replaced,
)
from .subscribers import SSEResumer, WSResumer, check_exact

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture
def herald(redis_server: RedisServer) -> Iterator[HeraldProcess]:
    if not redis_server.running:
        redis_server.start()
    with running_herald(workers=2, redis_url=redis_server.url) as server:
        yield server


async def test_kill_9_of_the_worker_holding_subscribers_resumes_without_loss(
    herald: HeraldProcess,
) -> None:
    uid = uuid.uuid4().hex[:8]
    channels = [f"user:kill-{uid}", f"public:kill-{uid}"]
    ws = WSResumer(herald, f"kill-{uid}", channels)
    sse = SSEResumer(herald, f"kill-{uid}", channels)
    stop = asyncio.Event()
    accepted: list[str] = []  # offsets of publishes that were acknowledged
    ambiguous = 0

    async def publish_loop() -> None:
        nonlocal ambiguous
        for n in range(100_000):
            if stop.is_set():
                return
            async with httpx.AsyncClient(
                base_url=herald.base_url, timeout=5.0, trust_env=False
            ) as client:
                try:
                    response = await client.post(
                        "/api/v1/publish",
                        json={"channel": channels[n % 2], "event": "m", "data": {"n": n}},
                        headers=SERVICE_HEADERS,
                    )
                except httpx.ConnectError:
                    continue  # not sent: nothing published
                except httpx.HTTPError:
                    ambiguous += 1  # the worker died mid-request: may or may not be published
                    continue
            assert response.status_code == 200, response.text
            accepted.append(response.json()["offset"])
            await asyncio.sleep(0.01)

    publisher: asyncio.Task[None] | None = None
    try:
        await ws.connect()
        pid = pid_holding(herald, client_port(ws.client))  # type: ignore[arg-type]
        for _ in range(40):  # put the SSE subscriber on the same worker
            await sse.connect()
            if sse.node == ws.node:
                break
            await sse.close()
        assert sse.node == ws.node, "SSE never landed on the WebSocket's worker"
        assert sse.sse is not None
        assert pid_holding(herald, client_port(sse.sse)) == pid
        killed_node = ws.node

        publisher = asyncio.ensure_future(publish_loop())

        await wait_until(lambda: ws.count() >= 20 and sse.count() >= 20, 10)
        kill_worker(herald, pid)
        await ws.wait_ended(10)
        await sse.wait_ended(10)
        assert ws.client is not None
        await ws.client.aclose()
        await sse.close()
        before = len(accepted)
        await wait_until(lambda: len(accepted) >= before + 10, 10)  # missed meanwhile

        ws.recovered.clear()  # (placing the SSE stream may already have resumed it)
        sse.recovered.clear()
        await ws.connect(avoid=killed_node)
        await sse.connect(avoid=killed_node)
        assert killed_node not in (ws.node, sse.node)
        assert ws.recovered == [(ch, True) for ch in ws.channels]
        assert sse.recovered == [(ch, True) for ch in sse.channels]
        after = len(accepted)
        await wait_until(lambda: len(accepted) >= after + 20, 10)
        stop.set()
        await asyncio.wait_for(publisher, 10)

        published = {ch: await full_history(herald.base_url, ch) for ch in channels}
        expected = {ch: [(m["offset"], m["data"]) for m in published[ch]] for ch in channels}
        for ch in channels:  # history is gapless from offset 1 and holds every accepted one
            assert [int(o.split(":")[0]) for o, _ in expected[ch]] == list(
                range(1, len(expected[ch]) + 1)
            )
        assert set(accepted) <= {o for ch in channels for o, _ in expected[ch]}

        await wait_until(
            lambda: all(len(s.got[ch]) >= len(expected[ch]) for s in (ws, sse) for ch in channels),
            15,
            must=False,
        )
        await asyncio.sleep(0.5)  # anything sent twice would arrive now
        problems = [
            line
            for sub in (ws, sse)
            for ch in channels
            for line in check_exact(f"{sub.name} {ch}", sub.got[ch], expected[ch])
        ]
        assert not problems, problems
        assert not ws.problems and not sse.problems, (ws.problems, sse.problems)
        assert len(accepted) + ambiguous >= 40
        await wait_worker_replaced(herald, pid)

        # Metrics forget the dead worker's live gauges: one connection per transport.
        async def gauges() -> list[float]:
            samples = await metrics(herald.base_url)
            return [
                metric(samples, "herald_connections", transport="websocket"),
                metric(samples, "herald_connections", transport="sse"),
                metric(samples, "herald_subscriptions"),
            ]

        seen: list[list[float]] = []

        async def right() -> bool:
            seen.append(await gauges())
            return seen[-1] == [1, 1, 4]

        assert await wait_until(right, 5, must=False) >= 0, seen[-3:]
    finally:
        stop.set()
        if publisher is not None:
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
        await ws.close()
        await sse.close()
