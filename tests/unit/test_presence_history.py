"""Presence tracking, join/leave events, per-namespace history and the channel HTTP API
(memory broker, in-process)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import websockets

from hub.broker import BrokerConfig
from hub.broker.memory import MemoryBroker
from hub.settings import Settings

from .conftest import SERVICE_KEY, json_lines, running_hub, user, wait_until

KEY = {"Authorization": f"Bearer {SERVICE_KEY}"}
PRESENCE_NS = {"public": {"presence": True, "join_leave": True, "history_size": 3}}


async def test_presence_counts_connections_per_user_and_forgets_leavers(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(namespaces=PRESENCE_NS, presence_ttl=30)
    async with running_hub(settings) as hub:
        a1 = await hub.open_connection(user("a"), "websocket")
        a2 = await hub.open_connection(user("a"), "sse")
        b = await hub.open_connection(user("b"), "websocket")
        for conn in (a1, a2, b):
            await hub.subscribe(conn, "public:room")
        await wait_until(lambda: len(hub.broker._presence.get("public:room", {})) == 3)  # type: ignore[attr-defined]
        snapshot = await hub.presence.snapshot("public:room")
        assert snapshot == {"channel": "public:room", "connections": 3, "users": {"a": 2, "b": 1}}

        await hub.unsubscribe(a1, "public:room")
        hub.release_connection(b)
        await wait_until(lambda: len(hub.broker._presence.get("public:room", {})) == 1)  # type: ignore[attr-defined]
        assert (await hub.presence.snapshot("public:room"))["users"] == {"a": 1}


async def test_join_and_leave_are_published_on_the_channel_when_enabled(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(namespaces=PRESENCE_NS, history_size=100)
    async with running_hub(settings) as hub:
        watcher = await hub.open_connection(user("w"), "websocket")
        await hub.subscribe(watcher, "public:room")
        joiner = await hub.open_connection(user("j"), "websocket")
        await hub.subscribe(joiner, "public:room")
        await hub.unsubscribe(joiner, "public:room")

        async def events() -> list[str]:
            history = await hub.broker.history("public:room")
            return [pub.event for pub in history.publications]

        deadline = asyncio.get_running_loop().time() + 2
        while await events() != ["presence.join", "presence.join", "presence.leave"]:
            assert asyncio.get_running_loop().time() < deadline, await events()
            await asyncio.sleep(0.01)
        last = (await hub.broker.history("public:room")).publications[-1]
        assert orjson.loads(last.data)["user"] == "j"


async def test_no_presence_and_no_events_where_not_enabled(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(namespaces=PRESENCE_NS)
    async with running_hub(settings) as hub:
        conn = await hub.open_connection(user("42"), "websocket")
        await hub.subscribe(conn, "user:42")
        await asyncio.sleep(0.05)
        assert await hub.broker.presence("user:42") == {}
        assert (await hub.broker.history("user:42")).publications == []


async def test_presence_entries_expire_without_refresh() -> None:
    broker = MemoryBroker(BrokerConfig())
    await broker.presence_update({"public:x": {"c1": "u1"}}, ttl=1)
    assert await broker.presence("public:x") == {"c1": "u1"}
    await asyncio.sleep(1.1)
    assert await broker.presence("public:x") == {}


async def test_namespace_history_size_overrides_the_default() -> None:
    broker = MemoryBroker(BrokerConfig(history_size=10, history_overrides={"public": (2, 3600)}))
    await broker.start(_Null())
    for n in range(5):
        await broker.publish("public:x", "e", str(n).encode())
        await broker.publish("user:1", "e", str(n).encode())
    assert [p.data for p in (await broker.history("public:x")).publications] == [b"3", b"4"]
    assert len((await broker.history("user:1")).publications) == 5


class _Null:
    def on_publication(self, publication: Any) -> None: ...
    def on_control(self, command: Any) -> None: ...
    def on_broker_state(self, connected: bool) -> None: ...


# -- HTTP ----------------------------------------------------------------------------------


@pytest.fixture
async def server(live: Callable[..., Any]) -> Any:
    return await live(namespaces=PRESENCE_NS, history_size=100)


async def _http(server: Any, path: str, headers: dict[str, str]) -> Any:
    import httpx

    async with httpx.AsyncClient(base_url=server.http_url) as client:
        return await client.get(path, headers=headers)


async def test_history_endpoint_pages_after_since_and_reports_loss(server: Any) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=server.http_url) as client:
        offsets = []
        for n in range(5):
            r = await client.post(
                "/api/v1/publish",
                json={"channel": "user:7", "event": "n", "data": {"n": n}},
                headers=KEY,
            )
            offsets.append(r.json()["offset"])
        token = server.hub.authenticator.tokens.issue("7")
        auth = {"Authorization": f"Bearer {token}"}
        r = await client.get(
            "/api/v1/channels/user:7/history",
            params={"since": offsets[1], "limit": 2},
            headers=auth,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["recovered"] is True and body["offset"] == offsets[-1]
        assert [m["data"] for m in body["messages"]] == [{"n": 2}, {"n": 3}]

        # public:* keeps 3: an offset older than that is reported as lost
        for n in range(5):
            await client.post(
                "/api/v1/publish",
                json={"channel": "public:a", "event": "n", "data": n},
                headers=KEY,
            )
        r = await client.get(
            "/api/v1/channels/public:a/history", params={"since": "1:" + "x"}, headers=auth
        )
        assert (
            r.status_code == 200 and r.json()["recovered"] is False and r.json()["messages"] == []
        )

        other = {"Authorization": f"Bearer {server.hub.authenticator.tokens.issue('8')}"}
        r = await client.get("/api/v1/channels/user:7/history", headers=other)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = await client.get(
            "/api/v1/channels/user:7/history", params={"since": "junk"}, headers=auth
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
        r = await client.get("/api/v1/channels/bad%20name/history", headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_channel"
        r = await client.get("/api/v1/channels/user:7/history")
        assert r.status_code == 401


async def test_presence_endpoint_sees_live_websocket_subscribers(server: Any) -> None:
    tokens = server.hub.authenticator.tokens
    headers = {"Authorization": f"Bearer {tokens.issue('5')}"}
    async with websockets.connect(server.ws_url, additional_headers=headers) as ws:
        await ws.recv()  # connected
        await ws.send(
            orjson.dumps({"op": "subscribe", "channel": "public:lobby", "id": 1}).decode()
        )
        frames = json_lines(await ws.recv())
        assert frames[0]["op"] == "ack"
        await wait_until(lambda: bool(server.hub.broker._presence.get("public:lobby")))
        r = await _http(server, "/api/v1/channels/public:lobby/presence", headers)
        assert r.status_code == 200, r.text
        assert r.json() == {"channel": "public:lobby", "connections": 1, "users": {"5": 1}}
    await wait_until(lambda: not server.hub.broker._presence.get("public:lobby"))
    r = await _http(server, "/api/v1/channels/user:5/presence", headers)
    assert r.status_code == 400  # presence not enabled for user:*
