"""Graceful shutdown: SIGTERM to ``herald serve`` says goodbye before closing.

WebSocket clients get ``{"op":"bye","code":"shutdown","reconnect":true}`` and close
code 1001; SSE clients get ``event: disconnect`` with the same payload; then the
server exits. Checked in embedded mode (one worker) and with two workers on Redis
(the signal goes to uvicorn's supervisor, which stops its workers).
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from typing import Any

import pytest

from .conftest import running_herald
from .helpers import (
    RedisServer,
    SSEClient,
    WSClient,
    connect_on_nodes,
    sse_connect,
    token,
    ws_connect,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


@pytest.mark.parametrize("workers", [1, 2], ids=["embedded", "two-workers-redis"])
async def test_sigterm_sends_bye_with_reconnect_then_exits(
    workers: int, redis_server: RedisServer
) -> None:
    channel = f"public:shutdown-{uuid.uuid4().hex[:8]}"
    user_token = token("leaving")
    redis_url = redis_server.url if workers > 1 else None
    with running_herald(workers=workers, redis_url=redis_url) as herald:

        async def new_ws() -> WSClient:
            client = await ws_connect(herald.ws_url, user_token)
            await client.subscribe(channel)
            return client

        async def new_sse() -> SSEClient:
            return await sse_connect(herald.base_url, [channel], user_token)

        ws_clients = await connect_on_nodes(new_ws, workers)
        sse_clients = await connect_on_nodes(new_sse, workers)
        clients: list[Any] = [*ws_clients.values(), *sse_clients.values()]
        try:
            herald.signal(signal.SIGTERM)
            started = time.monotonic()
            ws_results = await asyncio.gather(
                *(ws.wait_closed(timeout=10) for ws in ws_clients.values())
            )
            for (seen, code), node in zip(ws_results, ws_clients, strict=True):
                byes = [obj for obj in seen if obj.get("op") == "bye"]
                assert len(byes) == 1, (node, seen)
                assert byes[0]["code"] == "shutdown"
                assert byes[0]["reconnect"] is True
                assert byes[0]["close_code"] == 1001
                assert code == 1001, (node, code)
            for node, sse in sse_clients.items():
                event = await sse.next_named("disconnect", timeout=10)
                payload = event.json()
                assert payload["code"] == "shutdown", (node, payload)
                assert payload["reconnect"] is True
            assert time.monotonic() - started < 10
            assert herald.process is not None
            code = await asyncio.to_thread(herald.process.wait, 20)
            # A lone uvicorn server re-raises the signal it handled once it has shut down
            # gracefully (so it "dies of SIGTERM", as process managers expect); the
            # multi-worker supervisor exits 0.
            assert code in ((0, -signal.SIGTERM) if workers == 1 else (0,)), herald.log()
        finally:
            for client in clients:
                await client.aclose()
