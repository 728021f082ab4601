"""Heartbeats on both transports, and half-open WebSocket connections reaped.

The server runs with a one-second heartbeat interval and timeout. An idle WebSocket
client gets ``{"op":"ping"}`` frames and stays connected as long as its library
answers protocol pings; an SSE client gets ``: ping`` comments; a raw TCP client that
completed the handshake but never answers a protocol ping is cut within
interval + timeout.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from .conftest import running_herald
from .helpers import (
    HeraldProcess,
    metric,
    metrics,
    publish_fresh,
    raw_ws_handshake,
    sse_connect,
    token,
    ws_connect,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

INTERVAL = 1.0
TIMEOUT = 1.0


@pytest.fixture(scope="module")
def herald() -> Iterator[HeraldProcess]:
    env = {
        "HERALD_HEARTBEAT_INTERVAL": str(INTERVAL),
        "HERALD_HEARTBEAT_TIMEOUT": str(TIMEOUT),
    }
    with running_herald(env=env) as server:
        yield server


async def test_idle_ws_client_gets_ping_frames_and_stays_connected(herald: HeraldProcess) -> None:
    channel = f"public:idle-{uuid.uuid4().hex[:8]}"
    client = await ws_connect(herald.ws_url, token("idle"))
    try:
        assert client.connected is not None
        assert client.connected["heartbeat"] == INTERVAL
        await client.subscribe(channel)
        pings = 0
        started = time.monotonic()
        # Longer than interval + timeout: a client that answers protocol pings stays.
        while time.monotonic() - started < INTERVAL + TIMEOUT + 1.5:
            obj = await client.recv(timeout=INTERVAL + 2)
            assert obj == {"op": "ping"}, obj
            pings += 1
        assert pings >= 2
        response = await publish_fresh(herald.base_url, channel, "still", 1)
        assert response.status_code == 200
        message = await client.recv_until(lambda obj: obj.get("op") == "message")
        assert message["event"] == "still"
        assert client.close_code is None
    finally:
        await client.aclose()


async def test_idle_sse_client_gets_ping_comments(herald: HeraldProcess) -> None:
    channel = f"public:idle-{uuid.uuid4().hex[:8]}"
    sse = await sse_connect(herald.base_url, [channel], token("idle"))
    try:
        assert sse.retry is not None and sse.retry > 0, "retry: is set"
        assert sse.response.headers["cache-control"] == "no-cache"
        assert sse.response.headers["x-accel-buffering"] == "no"
        for _ in range(int((INTERVAL * 3 + 1) / 0.05)):
            if len(sse.comments) >= 2:
                break
            await asyncio.sleep(0.05)
        assert len(sse.comments) >= 2, sse.comments
        assert all(comment.startswith(": ping") for comment in sse.comments), sse.comments
        response = await publish_fresh(herald.base_url, channel, "still", 1)
        assert response.status_code == 200
        assert (await sse.next_named("still")).json()["data"] == 1
    finally:
        await sse.aclose()


def _read_until_eof(sock: socket.socket, deadline: float) -> float | None:
    """Read (never answer) until the server closes; returns when, or None on deadline."""
    for _ in range(100_000):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return None
        except ConnectionResetError:
            return time.monotonic()
        if not chunk:
            return time.monotonic()
    return None


async def test_half_open_ws_client_is_reaped(herald: HeraldProcess) -> None:
    base = metric(await metrics(herald.base_url), "herald_connections", transport="websocket")
    sock, _ = raw_ws_handshake(herald.port, token("half-open"))
    try:
        opened = time.monotonic()
        samples = await metrics(herald.base_url)
        assert metric(samples, "herald_connections", transport="websocket") == base + 1
        # Reading but never answering: to the server this peer is gone.
        limit = INTERVAL + TIMEOUT + 2.0
        closed_at = await asyncio.to_thread(_read_until_eof, sock, opened + limit)
        assert closed_at is not None, f"half-open connection still open after {limit} s"
        assert closed_at - opened >= INTERVAL, "not reaped before a ping could be answered"
    finally:
        sock.close()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        samples = await metrics(herald.base_url)
        if metric(samples, "herald_connections", transport="websocket") == base:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the reaped connection is still counted")
