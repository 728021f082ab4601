"""``GET /api/v1/channels/{channel}/history`` on the Redis backend, and what a resume
is told when history no longer holds its position.

One ``herald serve --workers 2`` on a test-owned redis-server, with a default history
of 1000 messages and per-namespace overrides: ``public`` keeps 20 messages, ``brief``
keeps them 2 seconds. Pages are read alternately from both workers.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.e2e.conftest import running_herald
from tests.e2e.helpers import (
    SERVICE_HEADERS,
    SERVICE_KEY,
    HeraldProcess,
    RedisServer,
    bearer,
    pinned_publishers,
    sse_connect,
    token,
    ws_connect,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

PUBLIC_SIZE = 20
BRIEF_TTL = 2


@pytest.fixture(scope="module")
def herald(redis_server: RedisServer) -> Iterator[HeraldProcess]:
    if not redis_server.running:
        redis_server.start()
    env = {
        "HERALD_HISTORY_SIZE": "1000",
        "HERALD_NAMESPACES": orjson.dumps(
            {"public": {"history_size": PUBLIC_SIZE}, "brief": {"history_ttl": BRIEF_TTL}}
        ).decode(),
    }
    with running_herald(workers=2, redis_url=redis_server.url, env=env) as server:
        yield server


@pytest.fixture
async def workers(herald: HeraldProcess) -> AsyncIterator[list[httpx.AsyncClient]]:
    """One keep-alive client per worker (service key)."""
    clients = await pinned_publishers(herald.base_url, 2)
    try:
        yield [clients[node] for node in sorted(clients)]
    finally:
        for client in clients.values():
            await client.aclose()


async def _publish(client: httpx.AsyncClient, channel: str, count: int) -> list[str]:
    """Publish ``count`` messages (data = 0..count-1) in batches; returns their offsets."""
    offsets: list[str] = []
    for start in range(0, count, 100):
        batch = [
            {"channel": channel, "event": "h", "data": {"i": i}}
            for i in range(start, min(count, start + 100))
        ]
        response = await client.post("/api/v1/publish/batch", json={"messages": batch})
        assert response.status_code == 200, response.text
        offsets += [r["offset"] for r in response.json()["results"]]
    return offsets


async def _history(
    client: httpx.AsyncClient, channel: str, status: int = 200, **params: Any
) -> dict[str, Any]:
    response = await client.get(f"/api/v1/channels/{channel}/history", params=params)
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_since_and_limit_page_through_history_on_both_workers(
    workers: list[httpx.AsyncClient],
) -> None:
    channel = f"user:hist-{uuid.uuid4().hex[:8]}"
    empty = await _history(workers[0], channel)
    assert empty["messages"] == [] and empty["recovered"] is True
    offsets = await _publish(workers[1], channel, 250)
    assert [int(o.split(":")[0]) for o in offsets] == list(range(1, 251))
    top = offsets[-1]

    first = await _history(workers[0], channel, limit=100)
    assert first["channel"] == channel and first["offset"] == top and first["recovered"]
    assert [m["offset"] for m in first["messages"]] == offsets[:100]
    assert first["messages"][0]["data"] == {"i": 0} and first["messages"][0]["event"] == "h"
    assert [m["seq"] for m in first["messages"]] == list(range(1, 101))
    assert all(isinstance(m["ts"], int) for m in first["messages"])

    pages: list[list[str]] = []
    since = first["messages"][-1]["offset"]
    for page in range(10):
        body = await _history(workers[page % 2], channel, since=since, limit=100)
        assert body["recovered"] is True and body["offset"] == top
        if not body["messages"]:
            break
        pages.append([m["offset"] for m in body["messages"]])
        since = pages[-1][-1]
    assert [len(p) for p in pages] == [100, 50]
    assert [o for p in pages for o in p] == offsets[100:]
    data = (await _history(workers[1], channel, since=offsets[199], limit=3))["messages"]
    assert [m["data"] for m in data] == [{"i": 200}, {"i": 201}, {"i": 202}]

    at_top = await _history(workers[1], channel, since=top)
    assert at_top == {"channel": channel, "offset": top, "recovered": True, "messages": []}
    everything = await _history(workers[0], channel, limit=1000)
    assert [m["offset"] for m in everything["messages"]] == offsets
    default_limit = await _history(workers[0], channel)
    assert len(default_limit["messages"]) == 100


async def test_offsets_history_no_longer_holds_say_recovered_false(
    workers: list[httpx.AsyncClient],
) -> None:
    channel = f"public:short-{uuid.uuid4().hex[:8]}"
    offsets = await _publish(workers[0], channel, 50)
    epoch = offsets[0].split(":")[1]
    # ``public`` keeps the last 20 (offsets 31..50).
    kept = await _history(workers[1], channel, limit=1000)
    assert [m["offset"] for m in kept["messages"]] == offsets[-PUBLIC_SIZE:]
    assert kept["recovered"] is True
    for too_old in (f"0:{epoch}", offsets[0], offsets[28]):
        body = await _history(workers[1], channel, since=too_old)
        assert body == {
            "channel": channel,
            "offset": offsets[-1],
            "recovered": False,
            "messages": [],
        }
    oldest_ok = await _history(workers[0], channel, since=offsets[29])  # 30: next is 31
    assert oldest_ok["recovered"] is True
    assert [m["offset"] for m in oldest_ok["messages"]] == offsets[30:]
    for foreign in (f"10:{'0' * len(epoch)}", f"60:{epoch}"):  # other epoch; beyond the top
        body = await _history(workers[0], channel, since=foreign)
        assert body["recovered"] is False and body["messages"] == [], foreign
    # The default size applies outside the namespace.
    other = f"user:long-{uuid.uuid4().hex[:8]}"
    long_offsets = await _publish(workers[0], other, 50)
    body = await _history(workers[1], other, since=long_offsets[0])
    assert body["recovered"] is True and len(body["messages"]) == 49


async def test_history_older_than_the_namespace_ttl_is_gone(
    workers: list[httpx.AsyncClient],
) -> None:
    channel = f"brief:ttl-{uuid.uuid4().hex[:8]}"
    offsets = await _publish(workers[0], channel, 5)
    fresh = await _history(workers[1], channel, since=offsets[0])
    assert fresh["recovered"] is True and len(fresh["messages"]) == 4
    await asyncio.sleep(BRIEF_TTL + 0.5)
    stale = await _history(workers[1], channel, since=offsets[0])
    assert stale["recovered"] is False and stale["messages"] == []
    assert (await _history(workers[0], channel))["messages"] == []
    # Offsets keep counting after the history expired.
    later = await _publish(workers[1], channel, 1)
    assert later[0].split(":") == ["6", offsets[0].split(":")[1]]


async def test_who_may_read_history(herald: HeraldProcess) -> None:
    """Reading history needs the right to subscribe to the channel (or a service key)."""
    uid = uuid.uuid4().hex[:8]
    owner, other = f"owner-{uid}", f"other-{uid}"
    private, room = f"user:{owner}", f"room:r-{uid}"
    cases = [
        (private, token(owner), 200),
        (private, token("admin-" + uid, role="admin"), 200),
        (private, SERVICE_KEY, 200),
        (private, token(other), 403),
        (private, token(other, channels=[private]), 403),  # user channels are never granted
        (room, token(other, channels=[room]), 200),  # an explicit grant
        (room, token(other, channels=["room:*"]), 200),
        (room, token(owner), 403),
        (room, token(other, channels=["room:x"]), 403),
    ]
    async with httpx.AsyncClient(base_url=herald.base_url, timeout=10, trust_env=False) as http:
        for channel in (private, room):
            published = await http.post(
                "/api/v1/publish",
                json={"channel": channel, "event": "h", "data": 1},
                headers=SERVICE_HEADERS,
            )
            assert published.status_code == 200, published.text
        for channel, credential, status in cases:
            response = await http.get(
                f"/api/v1/channels/{channel}/history", headers=bearer(credential)
            )
            assert response.status_code == status, (channel, credential, response.text)
            if status == 403:
                assert response.json()["error"]["code"] == "forbidden"
            else:
                assert [m["data"] for m in response.json()["messages"]] == [1]
        path = f"/api/v1/channels/{private}/history"
        anonymous = await http.get(path)
        assert anonymous.status_code == 401
        bad = await http.get("/api/v1/channels/bad{name}/history", headers=SERVICE_HEADERS)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_channel"
        for since in ("nonsense", "1:", "-1:abc"):
            response = await http.get(path, params={"since": since}, headers=SERVICE_HEADERS)
            assert response.status_code == 400, (since, response.text)
            assert response.json()["error"]["code"] == "bad_request"
        for limit in ("0", "1001", "x"):
            response = await http.get(path, params={"limit": limit}, headers=SERVICE_HEADERS)
            assert response.status_code == 422, (limit, response.text)


async def test_resume_from_a_position_history_lost_is_told_on_both_transports(
    herald: HeraldProcess, workers: list[httpx.AsyncClient]
) -> None:
    """WebSocket ack and SSE ``connected`` say ``recovered: false`` (nothing replayed) and
    then deliver live, rather than silently skipping what was lost."""
    channel = f"public:lost-{uuid.uuid4().hex[:8]}"
    offsets = await _publish(workers[0], channel, 40)  # history keeps 21..40
    credential = token("late-" + uuid.uuid4().hex[:6])
    ws = await ws_connect(herald.ws_url, credential)
    sse = None
    try:
        ack = await ws.subscribe(channel, since=offsets[4])
        assert ack["recovered"] is False and ack["offset"] == offsets[-1]
        tag = _cursor_tag([channel])
        sse = await sse_connect(
            herald.base_url, [channel], credential, headers={"Last-Event-ID": f"{tag}.{offsets[4]}"}
        )
        assert sse.connected is not None
        assert sse.connected["channels"][channel] == {"offset": offsets[-1], "recovered": False}
        live = await _publish(workers[1], channel, 1)
        message = await ws.recv_until(lambda obj: obj.get("op") == "message")
        assert message["offset"] == live[0]  # nothing replayed, straight to live
        event = await sse.next_named("h")
        assert event.json()["offset"] == live[0]
    finally:
        await ws.aclose()
        if sse is not None:
            await sse.aclose()


def _cursor_tag(channels: list[str]) -> str:
    from hub.protocol import channel_set_tag

    return channel_set_tag(sorted(channels))
