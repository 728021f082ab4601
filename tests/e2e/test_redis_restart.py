"""redis-server restarted under a running ``herald serve --workers 2``.

The Redis is test-owned (``redis_server_factory``), never the session's. While it is
down, readiness fails and publishes are refused with 503; once it is back, the same
worker processes (same PIDs) deliver to the same, still-connected subscribers within
five seconds, and readiness recovers.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import running_herald
from .helpers import (
    HeraldProcess,
    RedisServer,
    SSEClient,
    WSClient,
    connect_on_nodes,
    metric,
    metrics,
    pinned_publishers,
    sse_connect,
    sse_request,
    token,
    worker_pids,
    ws_connect,
    ws_open,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

RESUME_DEADLINE = 5.0


@pytest.fixture(params=["aof", "no-persistence"])
def own_redis(request: Any, redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    """A redis-server owned by this test: with an append-only file (history survives the
    restart) or without persistence (the restart loses every key)."""
    return redis_server_factory(appendonly=request.param == "aof")


@pytest.fixture
def herald(own_redis: RedisServer) -> Iterator[HeraldProcess]:
    with running_herald(workers=2, redis_url=own_redis.url) as server:
        yield server


Factory = Callable[[], Awaitable["WSClient | SSEClient"]]


class Receiver:
    """One subscriber slot: collects (receive time, n) of its messages in the background.

    When the server ends the connection with ``insufficient_state`` (history could not
    fill the gap, e.g. Redis lost its data), it reconnects as a client is told to;
    any other end of the connection is recorded as an error.
    """

    def __init__(self, name: str, client: WSClient | SSEClient, channel: str, factory: Factory):
        self.name = name
        self.client = client
        self.channel = channel
        self.factory = factory
        self.received: list[tuple[float, int]] = []
        self.reconnects: list[float] = []
        self.error: BaseException | None = None
        self.task = asyncio.ensure_future(self._run())

    async def _next(self) -> dict[str, Any] | None:
        if isinstance(self.client, WSClient):
            try:
                obj = await self.client.recv(timeout=60)
            except ConnectionClosed:
                if self.client.close_code == 4008:
                    return {"op": "bye", "code": "insufficient_state"}
                raise
            return obj
        event = await self.client.next(timeout=60)
        if event is None:
            raise EOFError("SSE stream ended without a disconnect event")
        if event.event == "disconnect":
            bye: dict[str, Any] = event.json()
            return bye
        envelope: dict[str, Any] = event.json()
        return envelope if event.event == "tick" else None

    async def _run(self) -> None:
        try:
            for _ in range(1_000_000):
                obj = await self._next()
                if not obj:
                    continue
                if obj.get("op") == "message" and obj["channel"] == self.channel:
                    self.received.append((time.monotonic(), obj["data"]["n"]))
                elif obj.get("op") == "bye":
                    assert obj["code"] == "insufficient_state", obj
                    self.reconnects.append(time.monotonic())
                    await self.client.aclose()
                    self.client = await self.factory()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # reported by the test
            self.error = exc

    def first_after(self, n: int) -> float | None:
        for when, value in self.received:
            if value > n:
                return when
        return None


async def _ready_status(base_url: str) -> int:
    async with httpx.AsyncClient(base_url=base_url, timeout=10.0, trust_env=False) as client:
        return (await client.get("/health/ready")).status_code


async def _wait_ready_status(base_url: str, status: int, timeout: float) -> None:
    """Wait until /health/ready answers ``status``, then require it three more times on
    fresh connections (any worker may answer each)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        seen.append(await _ready_status(base_url))
        if seen[-1] == status:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"/health/ready never answered {status}: {seen[-10:]}")
    again = [await _ready_status(base_url) for _ in range(3)]
    assert again == [status] * 3, again


async def test_redis_restart_mid_stream_workers_reconnect_and_deliver(
    herald: HeraldProcess, own_redis: RedisServer
) -> None:
    persistent = own_redis.appendonly
    pids = worker_pids(herald)
    assert len(pids) == 2
    channel = f"public:restart-{uuid.uuid4().hex[:8]}"
    user_token = token("restart")
    await _wait_ready_status(herald.base_url, 200, 10)
    before = await metrics(herald.base_url)

    async def new_ws() -> WSClient:
        client = await ws_connect(herald.ws_url, user_token)
        await client.subscribe(channel)
        return client

    async def new_sse() -> SSEClient:
        return await sse_connect(herald.base_url, [channel], user_token)

    ws_clients = await connect_on_nodes(new_ws, 2)
    sse_clients = await connect_on_nodes(new_sse, 2)
    publishers = await pinned_publishers(herald.base_url, 2)
    receivers: list[Receiver] = []
    statuses: list[tuple[int, int]] = []  # (n, HTTP status or 0 for a transport error)
    stop = asyncio.Event()

    async def publish_loop() -> None:
        nodes = list(publishers)
        for n in range(100_000):
            if stop.is_set():
                return
            try:
                response = await publishers[nodes[n % 2]].post(
                    "/api/v1/publish",
                    json={"channel": channel, "event": "tick", "data": {"n": n}},
                )
                statuses.append((n, response.status_code))
            except httpx.HTTPError:
                statuses.append((n, 0))
            await asyncio.sleep(0.03)

    def last_ok() -> int:
        return max((n for n, status in statuses if status == 200), default=-1)

    publisher = asyncio.ensure_future(publish_loop())
    try:
        for node, ws in ws_clients.items():
            receivers.append(Receiver(f"ws@{node}", ws, channel, new_ws))
        for node, sse in sse_clients.items():
            receivers.append(Receiver(f"sse@{node}", sse, channel, new_sse))

        async def all_received_after(n: int, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if all(r.first_after(n) is not None for r in receivers):
                    return
                assert not [r for r in receivers if r.error], [r.error for r in receivers]
                await asyncio.sleep(0.02)
            late = [r.name for r in receivers if r.first_after(n) is None]
            raise AssertionError(f"no delivery after message {n} to {late} in {timeout}s")

        # Deliveries flow before the outage.
        await all_received_after(5, 10)

        own_redis.stop()
        await _wait_ready_status(herald.base_url, 503, 10)
        down_statuses = len(statuses)
        outage_started = time.monotonic()
        # New clients are refused with a temporary code while tokens cannot be checked.
        refused_ws = await ws_open(herald.ws_url, user_token)
        seen, close_code = await refused_ws.wait_closed()
        assert close_code == 4007, seen
        assert [(o["code"], o["reconnect"]) for o in seen if o["op"] == "bye"] == [
            ("unavailable", True)
        ]
        sse_http, sse_response = await sse_request(herald.base_url, [channel], user_token)
        await sse_response.aread()
        await sse_response.aclose()
        await sse_http.aclose()
        assert sse_response.status_code == 503
        assert sse_response.json()["error"]["code"] == "unavailable"
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - outage_started)))
        refused = [status for _, status in statuses[down_statuses:]]
        assert refused and all(status == 503 for status in refused), refused

        own_redis.start()
        back = time.monotonic()
        n_at_restart = last_ok()
        await all_received_after(n_at_restart, RESUME_DEADLINE)
        latest = max(r.first_after(n_at_restart) or back for r in receivers)
        assert latest - back <= RESUME_DEADLINE

        await _wait_ready_status(herald.base_url, 200, RESUME_DEADLINE)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.wait_for(publisher, 5)
        await all_received_after(last_ok() - 1, 5)

        # The same worker processes, and each subscriber saw messages in publish order
        # with no duplicate.
        assert herald.process is not None and herald.process.poll() is None
        assert worker_pids(herald) == pids, "a worker died or was replaced"
        published = [n for n, status in statuses if status == 200]
        ambiguous = {n for n, status in statuses if status == 0}
        for receiver in receivers:
            assert receiver.error is None, (receiver.name, receiver.error)
            numbers = [n for _, n in receiver.received]
            assert numbers == sorted(set(numbers)), f"{receiver.name}: order or duplicates"
            if persistent:
                # History survived: the same connections got every message, the ones
                # published while the pub/sub connection was down included (recovered).
                assert not receiver.reconnects, receiver.name
                missing = sorted(set(published) - set(numbers))
                assert not missing, f"{receiver.name} missed {missing}"
                assert set(numbers) <= set(published) | ambiguous
        if persistent:
            for client in ws_clients.values():
                assert client.close_code is None

        after = await metrics(herald.base_url)
        reconnects = metric(after, "herald_broker_reconnects_total") - metric(
            before, "herald_broker_reconnects_total"
        )
        assert reconnects >= 2, "each worker counts its broker reconnect"
    finally:
        stop.set()
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        for receiver in receivers:
            receiver.task.cancel()
        await asyncio.gather(*(r.task for r in receivers), return_exceptions=True)
        for receiver in receivers:
            await receiver.client.aclose()
        for client in [*ws_clients.values(), *sse_clients.values()]:
            await client.aclose()
        for client in publishers.values():
            await client.aclose()
