"""Closed connections leave no reference cycles on herald's raw write paths.

Why it matters: the GC policy freezes connections (hub/gc_tuning.py); a frozen object
that dies in a cycle is only freed by a thaw, a full collection that pauses the worker.
Connections whose protocol breaks its cycles say so (``Connection.leaves_cycles``) and
never cause a thaw, so this must stay true. The portable path (plain uvicorn) is the
control: there the same census finds uvicorn's and websockets' cycles, which shows the
census can fail.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import LiveServer, wait_until
from .test_sse import issue, sse
from .test_websocket import open_client

# Server-side objects of one connection, by module and type name (the test's own
# clients, in this process too, have cycles of their own).
SERVER_TYPES = {
    "hub.connection.Connection",
    "hub.transports.fastws.FastWebSocketProtocol",
    "hub.transports.fastws.RawFrameWriter",
    "hub.transports.fasthttp.FastHttpProtocol",
    "hub.transports.fasthttp.RawBodyWriter",
    "hub.transports.websocket.WebSocketSession",
    "hub.transports.websocket.RawWebSocketWriter",
    "hub.transports.sse.RawSSEWriter",
    "uvicorn.protocols.websockets.websockets_sansio_impl.WebSocketsSansIOProtocol",
    "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol",
    "uvicorn.protocols.http.httptools_impl.RequestResponseCycle",
    "websockets.server.ServerProtocol",
}


async def _open_and_close_every_way(server: LiveServer) -> None:
    hub = server.hub
    # WebSocket closed by the client, and by the server
    client = await open_client(server, issue(server, "1"))
    await client.ws.close()
    client = await open_client(server, issue(server, "2"))
    await hub.disconnect_user("2")
    await client.expect("bye")
    await client.closed()
    # SSE closed by the client, and by the server
    async with sse(server, ["user:3"], token=issue(server, "3")) as stream:
        await stream.expect("connected")
    async with sse(server, ["user:4"], token=issue(server, "4")) as stream:
        await stream.expect("connected")
        await hub.disconnect_user("4")
        await stream.expect("disconnect")
    await wait_until(lambda: len(hub.registry) == 0, timeout=5)
    await asyncio.sleep(0.3)  # let the transports finish closing


async def _server_objects_left_in_cycles(server: LiveServer) -> set[str]:
    await _open_and_close_every_way(server)  # warm-up: lazily built state is not counted
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await _open_and_close_every_way(server)
        gc.collect()
        return {f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage} & SERVER_TYPES
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def test_closed_connections_leave_no_cycles_on_the_raw_paths(
    live: Callable[..., Any],
) -> None:
    server: LiveServer = await live()
    left = await _server_objects_left_in_cycles(server)
    if server.raw_paths:
        assert left == set(), f"closed connections left cycles: {sorted(left)}"
    else:
        # the control: the census does see the portable path's cycles
        assert "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol" in left, sorted(left)


@pytest.fixture(autouse=True)
def _no_gc_debug_leak() -> Any:
    yield
    gc.set_debug(0)
