"""The hub app under uvicorn inside the bench's own process (memory broker, stock GC),
for the census tools (``bench.cycles``, ``bench.memory``) that inspect its heap."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator

from .common import SECRET

FAST_HTTP = "hub.transports.fasthttp:FastHttpProtocol"
FAST_WS = "hub.transports.fastws:FastWebSocketProtocol"


@contextlib.asynccontextmanager
async def serving(*, http: str = FAST_HTTP, ws: str = FAST_WS) -> AsyncIterator[int]:
    """Serve the hub on a free loopback port (yielded) for the duration of the block."""
    import uvicorn

    os.environ.update(
        HERALD_SECRET_KEY=SECRET,
        HERALD_DATA_DIR=tempfile.mkdtemp(prefix="herald-inprocess-"),
        HERALD_GC="default",
        HERALD_LOG_LEVEL="warning",
    )
    os.environ.pop("HERALD_REDIS_URL", None)
    from hub.app import create_app

    config = uvicorn.Config(
        create_app,
        factory=True,
        port=0,
        host="127.0.0.1",
        http=http,
        ws=ws,
        loop="none",
        log_level="warning",
        ws_per_message_deflate=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task
