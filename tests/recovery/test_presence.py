"""Presence across two workers (``herald serve --workers 2``, real Redis).

``public`` has presence and join/leave events on (``HERALD_NAMESPACES``), with a 3 s
presence TTL and a 1 s heartbeat. ``GET /api/v1/channels/{channel}/presence`` answers
the same on both workers, within one heartbeat interval of a join, of a leave
(unsubscribe or disconnect), and — after ``kill -9`` of a worker holding subscribers —
within the TTL plus one heartbeat interval (its entries expire: nobody is left to remove
them). Subscribers of the channel receive ``presence.join`` / ``presence.leave``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.e2e.conftest import running_herald
from tests.e2e.helpers import (
    SERVICE_HEADERS,
    HeraldProcess,
    RedisServer,
    SSEClient,
    WSClient,
    pinned_publishers,
    sse_connect,
    token,
    ws_connect,
)

from .helpers import kill_worker, node_pids, wait_until, wait_worker_replaced

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

HEARTBEAT = 1.0
PRESENCE_TTL = 3
Users = dict[str, int]


@pytest.fixture(scope="module")
def herald(redis_server: RedisServer) -> Iterator[HeraldProcess]:
    if not redis_server.running:
        redis_server.start()
    env = {
        "HERALD_NAMESPACES": orjson.dumps(
            {"public": {"presence": True, "join_leave": True}}
        ).decode(),
        "HERALD_PRESENCE_TTL": str(PRESENCE_TTL),
        "HERALD_HEARTBEAT_INTERVAL": str(HEARTBEAT),
    }
    with running_herald(workers=2, redis_url=redis_server.url, env=env) as server:
        yield server


async def _presence(client: httpx.AsyncClient, channel: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/channels/{channel}/presence")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["connections"] == sum(body["users"].values()), body
    return body


async def _presence_everywhere(
    readers: dict[str, httpx.AsyncClient], channel: str
) -> dict[str, Users]:
    return {node: (await _presence(c, channel))["users"] for node, c in readers.items()}


async def _converges(
    readers: dict[str, httpx.AsyncClient], channel: str, want: Users, within: float
) -> float:
    """Seconds until every worker reports ``want`` (fails after ``within``)."""
    seen: list[dict[str, Users]] = []

    async def check() -> bool:
        seen.append(await _presence_everywhere(readers, channel))
        return all(users == want for users in seen[-1].values())

    try:
        return await wait_until(check, within, interval=0.02)
    except AssertionError:
        raise AssertionError(f"presence never became {want} in {within}s: {seen[-3:]}") from None


class Observer:
    """A WebSocket subscriber that records the channel's presence events."""

    def __init__(self, client: WSClient, channel: str) -> None:
        self.client = client
        self.channel = channel
        self.events: list[tuple[str, str, str]] = []  # (event, user, client id)
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        for _ in range(1_000_000):
            obj = await self.client.recv(timeout=60)
            if obj.get("op") == "message" and obj["channel"] == self.channel:
                data = obj["data"]
                self.events.append((obj["event"], data["user"], data["client"]))

    async def expect(self, event: str, user: str, client: str, within: float = HEARTBEAT) -> None:
        """Wait for ``event`` about ``user``'s connection ``client``."""
        wanted = (event, user, client)
        try:
            await wait_until(lambda: wanted in self.events, within, interval=0.02)
        except AssertionError:
            raise AssertionError(f"no {wanted} within {within}s: {self.events}") from None
        self.events.remove(wanted)

    async def aclose(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.aclose()


def client_id(client: WSClient | SSEClient) -> str:
    """The presence client id of a connection: ``<node>-<connection id>``."""
    assert client.connected is not None
    return f"{client.node}-{client.connected['connection']}"


async def _ws_on(herald: HeraldProcess, user: str, node: str, attempts: int = 40) -> WSClient:
    for _ in range(attempts):
        client = await ws_connect(herald.ws_url, token(user))
        if client.node == node:
            return client
        await client.aclose()
    raise AssertionError(f"no WebSocket landed on {node}")


async def _sse_on(
    herald: HeraldProcess, user: str, channel: str, node: str, attempts: int = 40
) -> SSEClient:
    for _ in range(attempts):
        client = await sse_connect(herald.base_url, [channel], token(user))
        if client.node == node:
            return client
        await client.aclose()
    raise AssertionError(f"no SSE stream landed on {node}")


async def test_presence_is_right_on_both_workers_after_join_leave_and_kill_9(
    herald: HeraldProcess,
) -> None:
    uid = uuid.uuid4().hex[:8]
    channel = f"public:presence-{uid}"
    obs, u1, u3, u4 = (f"{name}-{uid}" for name in ("obs", "u1", "u3", "u4"))
    pids = await node_pids(herald)
    readers = await pinned_publishers(herald.base_url, 2)
    node_a, node_b = sorted(readers)
    opened: list[WSClient | SSEClient] = []
    observer: Observer | None = None
    try:
        assert await _presence_everywhere(readers, channel) == {node_a: {}, node_b: {}}
        # The observer on worker A, everyone else on B first: events cross workers.
        obs_ws = await _ws_on(herald, obs, node_a)
        await obs_ws.subscribe(channel)
        observer = Observer(obs_ws, channel)
        await _converges(readers, channel, {obs: 1}, HEARTBEAT)

        # Join on B (WebSocket), then a second connection of the same user on A (SSE).
        u1_ws = await _ws_on(herald, u1, node_b)
        opened.append(u1_ws)
        await u1_ws.subscribe(channel)
        await _converges(readers, channel, {obs: 1, u1: 1}, HEARTBEAT)
        await observer.expect("presence.join", u1, client_id(u1_ws))
        u1_sse = await _sse_on(herald, u1, channel, node_a)
        opened.append(u1_sse)
        await _converges(readers, channel, {obs: 1, u1: 2}, HEARTBEAT)
        await observer.expect("presence.join", u1, client_id(u1_sse))

        # Leave by unsubscribing, then by closing the stream.
        ack = await u1_ws.request({"op": "unsubscribe", "channel": channel})
        assert ack["op"] == "ack", ack
        await _converges(readers, channel, {obs: 1, u1: 1}, HEARTBEAT)
        await observer.expect("presence.leave", u1, client_id(u1_ws))
        await u1_sse.aclose()
        await _converges(readers, channel, {obs: 1}, HEARTBEAT)
        await observer.expect("presence.leave", u1, client_id(u1_sse))

        # kill -9 of worker B while it holds two subscribers.
        u3_ws = await _ws_on(herald, u3, node_b)
        opened.append(u3_ws)
        await u3_ws.subscribe(channel)
        u4_sse = await _sse_on(herald, u4, channel, node_b)
        opened.append(u4_sse)
        await _converges(readers, channel, {obs: 1, u3: 1, u4: 1}, HEARTBEAT)
        await readers.pop(node_b).aclose()
        kill_worker(herald, pids[node_b])
        took = await _converges(readers, channel, {obs: 1}, PRESENCE_TTL + HEARTBEAT)
        assert took > HEARTBEAT, f"entries of the dead worker vanished after {took:.2f}s?"

        # The replacement worker agrees, and the observer on A was never disturbed.
        await wait_worker_replaced(herald, pids[node_b])
        for reader in readers.values():
            await reader.aclose()
        readers = await pinned_publishers(herald.base_url, 2)
        await _converges(readers, channel, {obs: 1}, HEARTBEAT)
        assert not observer.task.done()
        assert ("presence.leave", obs, client_id(obs_ws)) not in observer.events
    finally:
        if observer is not None:
            await observer.aclose()
        for connection in opened:
            await connection.aclose()
        for reader in readers.values():
            await reader.aclose()


async def test_subscribe_and_unsubscribe_in_quick_succession_leave_no_ghost(
    herald: HeraldProcess,
) -> None:
    """Join and leave writes of one client must reach Redis in order: a leave overtaken
    by its join would leave a ghost for a whole TTL (and announce leave before join)."""
    uid = uuid.uuid4().hex[:8]
    channel = f"public:flap-{uid}"
    obs, flapper = f"obs-{uid}", f"flap-{uid}"
    readers = await pinned_publishers(herald.base_url, 2)
    observer: Observer | None = None
    client: WSClient | None = None
    try:
        obs_ws = await ws_connect(herald.ws_url, token(obs))
        await obs_ws.subscribe(channel)
        observer = Observer(obs_ws, channel)
        client = await ws_connect(herald.ws_url, token(flapper))
        rounds = 30
        frames = []
        for i in range(rounds):
            frames.append({"op": "subscribe", "channel": channel, "id": 2 * i + 1})
            frames.append({"op": "unsubscribe", "channel": channel, "id": 2 * i + 2})
        for frame in frames:  # back to back, no waiting for the acks
            await client.send_raw(orjson.dumps(frame).decode())
        acks = 0
        for _ in range(10 * rounds):
            obj = await client.recv(timeout=10)
            if obj.get("op") == "ack":
                acks += 1
            if obj.get("op") == "error":
                raise AssertionError(obj)
            if acks == 2 * rounds:
                break
        await _converges(readers, channel, {obs: 1}, HEARTBEAT)

        def all_announced() -> bool:
            return len([e for e in observer.events if e[1] == flapper]) >= 2 * rounds

        await wait_until(all_announced, 5, must=False)
        mine = [e[0] for e in observer.events if e[1] == flapper]
        assert mine == ["presence.join", "presence.leave"] * rounds, mine
        await asyncio.sleep(PRESENCE_TTL / 3 + 0.5)  # a refresh must not resurrect it
        assert await _presence_everywhere(readers, channel) == {n: {obs: 1} for n in readers}
    finally:
        if observer is not None:
            await observer.aclose()
        if client is not None:
            await client.aclose()
        for reader in readers.values():
            await reader.aclose()


async def test_presence_needs_the_right_to_subscribe_and_an_enabled_namespace(
    herald: HeraldProcess,
) -> None:
    uid = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(base_url=herald.base_url, timeout=10, trust_env=False) as http:
        other = await http.get(
            f"/api/v1/channels/user:someone-{uid}/presence",
            headers={"Authorization": f"Bearer {token('intruder-' + uid)}"},
        )
        assert other.status_code == 403, other.text
        assert other.json()["error"]["code"] == "forbidden"
        anonymous = await http.get(f"/api/v1/channels/public:x-{uid}/presence")
        assert anonymous.status_code == 401, anonymous.text
        disabled = await http.get(
            f"/api/v1/channels/user:u-{uid}/presence", headers=SERVICE_HEADERS
        )
        assert disabled.status_code == 400, disabled.text
        user = await http.get(
            f"/api/v1/channels/public:x-{uid}/presence",
            headers={"Authorization": f"Bearer {token('reader-' + uid)}"},
        )
        assert user.status_code == 200, user.text
        assert user.json() == {"channel": f"public:x-{uid}", "connections": 0, "users": {}}
