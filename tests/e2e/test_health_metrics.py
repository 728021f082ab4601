"""``/health``, ``/health/ready`` and ``/metrics`` of ``herald serve --workers 2``.

``/metrics`` on any worker reports the sum over both workers (prometheus multiprocess
mode): the deliveries this test made, per transport, and the messages it published.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import httpx
import pytest

from .helpers import (
    HeraldProcess,
    SSEClient,
    WSClient,
    bearer,
    connect_on_nodes,
    metric,
    metrics,
    pinned_publishers,
    sse_connect,
    token,
    ws_connect,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def _wait_metrics(
    base_url: str, condition: Callable[[Samples], bool], what: str, timeout: float = 5.0
) -> Samples:
    deadline = time.monotonic() + timeout
    samples = await metrics(base_url)
    while not condition(samples):
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never showed {what}")
        await asyncio.sleep(0.1)
        samples = await metrics(base_url)
    return samples


async def test_health_and_readiness(cluster: HeraldProcess) -> None:
    async with httpx.AsyncClient(base_url=cluster.base_url, trust_env=False) as client:
        for _ in range(4):
            health = await client.get("/health")
            assert health.status_code == 200
            assert health.json() == {"status": "ok"}
            ready = await client.get("/health/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"]["broker"] == "ok"


async def test_metrics_count_this_tests_deliveries_on_both_workers(
    cluster: HeraldProcess,
) -> None:
    channel = f"public:metrics-{uuid.uuid4().hex[:8]}"
    user_token = token("metrics")
    count = 40
    baseline = await metrics(cluster.base_url)
    ws_base = metric(baseline, "herald_connections", transport="websocket")
    sse_base = metric(baseline, "herald_connections", transport="sse")

    async def new_ws() -> WSClient:
        client = await ws_connect(cluster.ws_url, user_token)
        await client.subscribe(channel)
        return client

    async def new_sse() -> SSEClient:
        return await sse_connect(cluster.base_url, [channel], user_token)

    ws_clients = await connect_on_nodes(new_ws, 2)
    sse_clients = await connect_on_nodes(new_sse, 2)
    publishers = await pinned_publishers(cluster.base_url, 2)
    try:
        await _wait_metrics(
            cluster.base_url,
            lambda s: (
                metric(s, "herald_connections", transport="websocket") == ws_base + 2
                and metric(s, "herald_connections", transport="sse") == sse_base + 2
            ),
            "two more WebSocket and two more SSE connections",
        )
        # The admin stats endpoint (the dashboard's source) sums both workers too.
        async with httpx.AsyncClient(base_url=cluster.base_url, trust_env=False) as client:
            for _ in range(4):  # whichever worker answers
                response = await client.get(
                    "/api/v1/stats", headers=bearer(token("stats-admin", role="admin"))
                )
                assert response.status_code == 200, response.text
                assert response.json()["connections"] == {
                    "websocket": ws_base + 2,
                    "sse": sse_base + 2,
                }
        before = await metrics(cluster.base_url)
        nodes = list(publishers)
        for n in range(count):
            response = await publishers[nodes[n % 2]].post(
                "/api/v1/publish", json={"channel": channel, "event": "counted", "data": n}
            )
            assert response.status_code == 200, response.text
        for ws in ws_clients.values():
            for n in range(count):
                message = await ws.recv_until(lambda obj: obj.get("op") == "message")
                assert message["data"] == n
        for sse in sse_clients.values():
            for n in range(count):
                assert (await sse.next_named("counted")).json()["data"] == n

        def delta(samples: Samples, name: str, **labels: str) -> float:
            return metric(samples, name, **labels) - metric(before, name, **labels)

        expected = {
            ("herald_messages_delivered_total", "websocket"): 2 * count,
            ("herald_messages_delivered_total", "sse"): 2 * count,
        }
        after = await _wait_metrics(
            cluster.base_url,
            lambda s: all(
                delta(s, name, transport=transport) >= value
                for (name, transport), value in expected.items()
            ),
            f"{2 * count} deliveries per transport",
        )
        await asyncio.sleep(0.3)
        after = await metrics(cluster.base_url)
        for (name, transport), value in expected.items():
            assert delta(after, name, transport=transport) == value, (name, transport)
        assert delta(after, "herald_messages_published_total") == count
    finally:
        for client in [*ws_clients.values(), *sse_clients.values()]:
            await client.aclose()
        for publisher in publishers.values():
            await publisher.aclose()
    await _wait_metrics(
        cluster.base_url,
        lambda s: (
            metric(s, "herald_connections", transport="websocket") == ws_base
            and metric(s, "herald_connections", transport="sse") == sse_base
        ),
        "the connections gone again",
    )
