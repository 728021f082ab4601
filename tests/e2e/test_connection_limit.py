"""The per-user connection limit holds across workers.

Two workers on a test-owned Redis, ``HERALD_MAX_CONNECTIONS_PER_USER=3``. A user holds
three connections spread over both workers, so neither worker alone holds three: every
further WebSocket is told ``bye connection_limit`` and every SSE request gets 429,
whichever worker takes it. Once one connection closes, the user can connect again.
Other users are not affected.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import orjson
import pytest

from .conftest import running_herald
from .helpers import HeraldProcess, RedisServer, WSClient, sse_request, token, ws_connect, ws_open

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

LIMIT = 3


@pytest.fixture(scope="module")
def herald(redis_server: RedisServer) -> Iterator[HeraldProcess]:
    env = {"HERALD_MAX_CONNECTIONS_PER_USER": str(LIMIT)}
    with running_herald(workers=2, redis_url=redis_server.url, env=env) as server:
        yield server


async def _refused(herald: HeraldProcess, credential: str) -> dict[str, object]:
    """Open a WebSocket that must be refused; returns its ``bye``."""
    client = await ws_open(herald.ws_url, credential)
    try:
        first = await client.recv()
        assert first["op"] != "connected", "a connection over the limit was accepted"
        rest, code = await client.wait_closed()
    finally:
        await client.aclose()
    seen = [first, *rest]
    byes = [obj for obj in seen if obj.get("op") == "bye"]
    assert len(byes) == 1 and code == 4006, (seen, code)
    return byes[0]


async def _connect_retrying(herald: HeraldProcess, credential: str) -> WSClient:
    """Connect; a slot freed by a connection that just closed on the *other* worker may
    take a moment to be released, so retry briefly."""
    deadline = time.monotonic() + 5
    while True:
        client = await ws_open(herald.ws_url, credential)
        first = await client.recv()
        if first["op"] == "connected":
            client.connected = first
            return client
        await client.aclose()
        assert first == {**first, "op": "bye", "code": "connection_limit"}, first
        assert time.monotonic() < deadline, "the freed slot was never released"
        await asyncio.sleep(0.1)


async def test_the_limit_counts_connections_on_every_worker(herald: HeraldProcess) -> None:
    user = f"limited-{uuid.uuid4().hex[:8]}"
    credential = token(user)
    held: list[WSClient] = [await ws_connect(herald.ws_url, credential)]
    try:
        for _ in range(40):  # the second one on the other worker
            candidate = await _connect_retrying(herald, credential)
            if candidate.node != held[0].node:
                held.append(candidate)
                break
            await candidate.aclose()
        assert len(held) == 2, "never reached the second worker"
        held.append(await _connect_retrying(herald, credential))
        assert {client.node for client in held} == {held[0].node, held[1].node}
        # Neither worker holds three: under a per-worker limit, both would accept more.
        for _ in range(6):
            bye = await _refused(herald, credential)
            assert bye["code"] == "connection_limit" and bye["reconnect"] is True
        for _ in range(2):
            client, response = await sse_request(herald.base_url, [f"user:{user}"], credential)
            try:
                assert response.status_code == 429
                body = orjson.loads(await response.aread())
                assert body["error"]["code"] == "connection_limit"
            finally:
                await response.aclose()
                await client.aclose()
        # Everyone else connects as usual, and the limited user's connections still work.
        other = await ws_connect(herald.ws_url, token(f"other-{uuid.uuid4().hex[:8]}"))
        await other.aclose()
        for client in held:
            assert (await client.request({"op": "ping"}))["op"] == "pong"

        # One closes: the user may connect again (on whichever worker).
        await held.pop(1).aclose()
        held.append(await _connect_retrying(herald, credential))
        await _refused(herald, credential)
    finally:
        for client in held:
            await client.aclose()
