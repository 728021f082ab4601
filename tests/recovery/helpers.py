"""Helpers of the recovery tests (on top of ``tests/e2e/helpers.py``).

Which worker holds a connection: the server side of a loopback TCP connection is found
in ``/proc/net/tcp`` by the client's port, and its socket inode among the open files of
the server's worker processes. Only PIDs of servers the test started are ever looked at
(and only those are ever killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.helpers import (
    SERVICE_HEADERS,
    HeraldProcess,
    SSEClient,
    WSClient,
    bearer,
    token,
    ws_connect,
)

ADMIN = token("recovery-admin", role="admin")


# -- which worker holds a connection --------------------------------------------------------


def client_port(client: WSClient | SSEClient | httpx.Response) -> int:
    """The local (client) TCP port of a WebSocket, an SSE stream or a streaming response."""
    if isinstance(client, WSClient):
        return int(client.ws.transport.get_extra_info("sockname")[1])
    response = client.response if isinstance(client, SSEClient) else client
    stream = response.extensions["network_stream"]
    return int(stream.get_extra_info("client_addr")[1])


def _server_socket_inodes(server_port: int, peer_port: int) -> set[str]:
    """Inodes of sockets whose local port is ``server_port`` and peer port ``peer_port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if (
                int(local.rsplit(":", 1)[1], 16) == server_port
                and int(remote.rsplit(":", 1)[1], 16) == peer_port
            ):
                inodes.add(inode)
    return inodes


def pid_holding(herald: HeraldProcess, port: int) -> int:
    """The worker PID of ``herald`` that holds the server side of the connection whose
    client port is ``port``."""
    wanted = {f"socket:[{inode}]" for inode in _server_socket_inodes(herald.port, port)}
    assert wanted, f"no server socket for client port {port}"
    for pid in herald.worker_pids():
        fd_dir = Path(f"/proc/{pid}/fd")
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        return pid
    raise AssertionError(f"no worker of {herald.worker_pids()} holds client port {port}")


async def node_pids(herald: HeraldProcess, attempts: int = 60) -> dict[str, int]:
    """Map every worker's node id (as sent in ``connected``) to its PID."""
    found: dict[str, int] = {}
    for _ in range(attempts):
        client = await ws_connect(herald.ws_url, token("node-probe"))
        try:
            found[client.node] = pid_holding(herald, client_port(client))
        finally:
            await client.aclose()
        if len(found) >= herald.workers:
            return found
    raise AssertionError(f"only found workers {found} in {attempts} connections")


def kill_worker(herald: HeraldProcess, pid: int) -> None:
    """SIGKILL one worker of a server this test started (never anything else)."""
    assert pid in herald.worker_pids(), f"{pid} is not a worker of this test's server"
    os.kill(pid, signal.SIGKILL)


async def wait_worker_replaced(herald: HeraldProcess, killed: int, timeout: float = 20.0) -> None:
    """Wait until uvicorn replaced the killed worker and /health answers again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = herald.worker_pids()
        if killed not in pids and len(pids) >= herald.workers:
            try:
                async with httpx.AsyncClient(timeout=1.0, trust_env=False) as http:
                    if (await http.get(f"{herald.base_url}/health")).status_code == 200:
                        return
            except httpx.HTTPError:
                pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"worker {killed} was not replaced: {herald.worker_pids()}")


# -- HTTP -------------------------------------------------------------------------------------


def http_client(base_url: str, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, timeout=10.0, trust_env=False, **kwargs)


async def publish_retrying(
    base_url: str, channel: str, event: str, data: Any, attempts: int = 100
) -> dict[str, Any]:
    """Publish on a fresh connection; retry only when the connection could not be
    opened (nothing was published then), e.g. while a killed worker's socket goes away."""
    for _ in range(attempts):
        async with http_client(base_url) as client:
            try:
                response = await client.post(
                    "/api/v1/publish",
                    json={"channel": channel, "event": event, "data": data},
                    headers=SERVICE_HEADERS,
                )
            except httpx.ConnectError:
                await asyncio.sleep(0.05)
                continue
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result
    raise AssertionError(f"could not publish to {channel}")


async def full_history(base_url: str, channel: str, page: int = 1000) -> list[dict[str, Any]]:
    """Every message history holds for ``channel``, paging with ``since``."""
    messages: list[dict[str, Any]] = []
    since: str | None = None
    async with http_client(base_url, headers=SERVICE_HEADERS) as client:
        for _ in range(1000):
            params: dict[str, Any] = {"limit": page}
            if since is not None:
                params["since"] = since
            response = await client.get(f"/api/v1/channels/{channel}/history", params=params)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["recovered"] is True, body
            messages += body["messages"]
            if not body["messages"]:
                return messages
            since = body["messages"][-1]["offset"]
    raise AssertionError("history paging did not end")


async def disconnect_user(base_url: str, user: str) -> None:
    """Close ``user``'s connections on every worker (force_reconnect, no revocation)."""
    async with http_client(base_url) as client:
        response = await client.post(
            f"/api/v1/connections/users/{user}/disconnect",
            params={"revoke": "false"},
            headers=bearer(ADMIN),
        )
    assert response.status_code == 200, response.text


async def wait_until(
    check: Callable[[], Awaitable[bool] | bool],
    timeout: float,
    interval: float = 0.05,
    *,
    must: bool = True,
) -> float:
    """Poll ``check`` (plain or async) until it holds; returns the seconds it took. After
    ``timeout`` it fails, or with ``must=False`` returns ``-1`` (the caller reports)."""
    started = time.monotonic()
    for _ in range(int(timeout / interval) + 2):
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            break
        await asyncio.sleep(interval)
    if not must:
        return -1.0
    raise AssertionError(f"condition not met within {timeout}s")
