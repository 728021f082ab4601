"""A scripted fake hub behind the client's WebSocket seam (no network).

Each connection the client opens is handed to the test's ``script`` coroutine as a
:class:`FakeSocket`; the script plays the server: ``push`` frames (several objects in
one frame, like the hub's coalescing writer), ``expect`` client frames, ``close`` with a
code. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from clients import HandshakeRejected, TransportClosed

WAIT = 5.0


def connected_frame(node: str = "n1", expires_at: float | None = None, **extra: Any) -> dict:
    return {
        "op": "connected",
        "id": None,
        "connection": 1,
        "node": node,
        "subject": "42",
        "heartbeat": 25.0,
        "expires_at": expires_at,
        **extra,
    }


def message(channel: str, seq: int, data: Any = None, *, epoch: str = "e1", event: str = "n"):
    return {
        "op": "message",
        "channel": channel,
        "offset": f"{seq}:{epoch}",
        "event": event,
        "data": data if data is not None else {"seq": seq},
        "ts": 1_700_000_000_000 + seq,
    }


class FakeSocket:
    """The server side of one fake WebSocket."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        self.headers = dict(headers)
        self.inbox: asyncio.Queue[str | TransportClosed] = asyncio.Queue()
        self.from_client: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []
        self.closed_by_client = False

    # -- the client's side (the WebSocketConnection protocol) ------------------------------

    async def send(self, text: str) -> None:
        if self.closed_by_client:
            raise TransportClosed(1006, "closed")
        obj = json.loads(text)
        self.sent.append(obj)
        self.from_client.put_nowait(obj)

    async def recv(self) -> str:
        item = await self.inbox.get()
        if isinstance(item, TransportClosed):
            self.inbox.put_nowait(item)  # stays closed
            raise item
        return item

    async def close(self) -> None:
        self.closed_by_client = True
        self.inbox.put_nowait(TransportClosed(1000, "client closed"))

    # -- the script's side -------------------------------------------------------------------

    def push(self, *objects: dict[str, Any]) -> None:
        """One server frame holding ``objects``, one JSON object per line."""
        self.inbox.put_nowait("\n".join(json.dumps(o) for o in objects))

    def close_with(self, code: int, bye: dict[str, Any] | None = None) -> None:
        if bye is not None:
            self.push(bye)
        self.inbox.put_nowait(TransportClosed(code, ""))

    async def expect(self, op: str, timeout: float = WAIT) -> dict[str, Any]:
        """The next client frame with ``op`` (others are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                obj = await self.from_client.get()
                if obj.get("op") == op:
                    return obj

    def ack(self, request: dict[str, Any], **fields: Any) -> dict[str, Any]:
        return {"op": "ack", "id": request.get("id"), **fields}


Script = Callable[[FakeSocket, int], Coroutine[Any, Any, None]]


class FakeConnector:
    """A :class:`clients.WebSocketConnector` running ``script(socket, attempt)`` per connect.

    ``refuse`` maps attempt numbers to an HTTP status for a refused handshake.
    """

    def __init__(self, script: Script, *, refuse: dict[int, int] | None = None) -> None:
        self.script = script
        self.refuse = refuse or {}
        self.sockets: list[FakeSocket] = []
        self.urls: list[str] = []
        self.attempts = 0
        self.tasks: list[asyncio.Task[None]] = []

    async def __call__(
        self, url: str, headers: Mapping[str, str], subprotocols: Sequence[str]
    ) -> FakeSocket:
        attempt = self.attempts
        self.attempts += 1
        self.urls.append(url)
        assert "herald.v1" in subprotocols
        status = self.refuse.get(attempt)
        if status is not None:
            body = json.dumps({"error": {"code": "forbidden", "message": "origin"}}).encode()
            raise HandshakeRejected(status, body)
        sock = FakeSocket(headers)
        self.sockets.append(sock)
        self.tasks.append(asyncio.create_task(self.script(sock, attempt)))
        return sock

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for task in self.tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
