"""Subscribers that resume, as a careful client does, across any number of connections.

:class:`WSResumer` resubscribes every channel with ``since`` = the last offset it
processed on that channel; :class:`SSEResumer` reconnects with ``Last-Event-ID`` = the
last ``id:`` it saw. Both keep everything they received, per channel, across
connections, so a test can compare it with what was published: none lost, none twice,
in order. Each connection is read by one background task; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

import orjson
from websockets.exceptions import ConnectionClosed

from tests.e2e.helpers import (
    HeraldProcess,
    SSEClient,
    SSEEvent,
    WSClient,
    sse_request,
    token,
    ws_connect,
)

from .helpers import disconnect_user

Received = tuple[str, Any]  # (offset token, data)


def seq(offset: str) -> int:
    return int(offset.split(":", 1)[0])


class _Resumer:
    kind = ""

    def __init__(self, herald: HeraldProcess, user: str, channels: list[str]) -> None:
        self.herald = herald
        self.user = user
        self.credential = token(user)
        self.channels = sorted(channels)
        self.got: dict[str, list[Received]] = {ch: [] for ch in self.channels}
        self.nodes: list[str] = []
        self.recovered: list[tuple[str, bool]] = []  # (channel, flag) of every resume
        self.byes: list[str] = []
        self.problems: list[str] = []
        self.sessions = 0
        self.task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.user}"

    @property
    def connected(self) -> bool:
        return self.task is not None and not self.task.done()

    def count(self) -> int:
        return sum(len(v) for v in self.got.values())

    def _message(self, envelope: dict[str, Any]) -> None:
        channel = envelope["channel"]
        if channel not in self.got:
            self.problems.append(f"message of a foreign channel {channel!r}")
            return
        self.got[channel].append((envelope["offset"], envelope["data"]))

    async def wait_ended(self, timeout: float = 10.0) -> None:
        if self.task is not None:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)

    async def server_disconnect(self, timeout: float = 10.0) -> None:
        """Have the server close this subscriber (force_reconnect) and wait for it."""
        await disconnect_user(self.herald.base_url, self.user)
        await self.wait_ended(timeout)


class WSResumer(_Resumer):
    kind = "ws"

    def __init__(self, herald: HeraldProcess, user: str, channels: list[str]) -> None:
        super().__init__(herald, user, channels)
        self.last: dict[str, str | None] = {ch: None for ch in self.channels}
        self.client: WSClient | None = None
        self._acks: dict[str, dict[str, Any]] = {}

    @property
    def node(self) -> str:
        return self.nodes[-1]

    async def open(self, *, avoid: str | None = None, attempts: int = 20) -> WSClient:
        """Connect, not yet subscribed; preferably to another worker than ``avoid`` (the
        kernel picks the worker: after ``attempts`` tries, take what came)."""
        for attempt in range(attempts):
            client = await ws_connect(self.herald.ws_url, self.credential)
            if avoid is None or client.node != avoid or attempt == attempts - 1:
                return client
            await client.aclose()
            await asyncio.sleep(0.01 * attempt)
        raise AssertionError("unreachable")

    async def connect(
        self, *, avoid: str | None = None, client: WSClient | None = None, timeout: float = 10.0
    ) -> None:
        """Connect and subscribe every channel, with ``since`` where an offset is known;
        returns once every subscription is acknowledged (messages may already flow)."""
        client = client or await self.open(avoid=avoid)
        self.client = client
        self.nodes.append(client.node)
        self.sessions += 1
        self._acks = {}
        sent: dict[str, str | None] = {}
        for index, channel in enumerate(self.channels, start=1):
            frame: dict[str, Any] = {"op": "subscribe", "channel": channel, "id": index}
            since = self.last[channel]
            if since is not None:
                frame["since"] = since
            sent[channel] = since
            await client.send_raw(orjson.dumps(frame).decode())
        client.next_id = len(self.channels) + 1
        self.task = asyncio.ensure_future(self._read(client, sent))
        async with asyncio.timeout(timeout):
            while len(self._acks) < len(self.channels):
                if self.task.done():
                    raise ConnectionError(f"{self.name}: closed before every ack: {self.byes}")
                await asyncio.sleep(0.01)

    def _ack(self, ack: dict[str, Any], sent: dict[str, str | None]) -> None:
        channel = ack["channel"]
        self._acks[channel] = ack
        if sent[channel] is None:
            self.last[channel] = ack["offset"]
            return
        recovered = bool(ack.get("recovered"))
        self.recovered.append((channel, recovered))
        if not recovered:  # a real client refetches its state and goes on from the top
            self.last[channel] = ack["offset"]

    async def _read(self, client: WSClient, sent: dict[str, str | None]) -> None:
        for _ in range(10_000_000):
            try:
                obj = await client.recv(timeout=120)
            except (ConnectionClosed, TimeoutError):
                return
            op = obj.get("op")
            if op == "message":
                self._message(obj)
                self.last[obj["channel"]] = obj["offset"]
            elif op == "ack":
                self._ack(obj, sent)
            elif op == "bye":
                self.byes.append(obj["code"])
            elif op == "error":
                self.problems.append(f"error {obj}")

    async def close(self, how: str = "close") -> None:
        """End the connection from the client side: ``close`` politely, ``abort`` (TCP
        reset, as when a phone loses its network), or ``server`` (force_reconnect)."""
        client = self.client
        if client is None:
            return
        if how == "server":
            await self.server_disconnect()
        elif how == "abort":
            client.ws.transport.abort()
        await client.aclose()
        with contextlib.suppress(BaseException):
            await self.wait_ended()
        self.client = None


class SSEResumer(_Resumer):
    kind = "sse"

    def __init__(
        self, herald: HeraldProcess, user: str, channels: list[str], event: str = "m"
    ) -> None:
        super().__init__(herald, user, channels)
        self.event = event
        self.last_id: str | None = None
        self.sse: SSEClient | None = None
        self.connected_events: list[dict[str, Any]] = []

    @property
    def node(self) -> str:
        return self.nodes[-1]

    async def connect(self, *, avoid: str | None = None, attempts: int = 20) -> None:
        """Open ``/sse`` (with ``Last-Event-ID`` once an id was seen), preferably on another
        worker than ``avoid`` (after ``attempts`` tries, take what came); returns after
        the ``connected`` event."""
        for attempt in range(attempts):
            sse = await self._open()
            if avoid is None or sse.node != avoid or attempt == attempts - 1:
                break
            # Landed on the worker to avoid: this connection read nothing; drop it.
            await sse.aclose()
            await asyncio.sleep(0.01 * attempt)
        self.sse = sse
        self.nodes.append(sse.node)
        self.sessions += 1
        assert sse.connected is not None
        self.connected_events.append(sse.connected)
        self.task = asyncio.ensure_future(self._read(sse))

    async def _open(self) -> SSEClient:
        headers = {"Last-Event-ID": self.last_id} if self.last_id else None
        client, response = await sse_request(
            self.herald.base_url, self.channels, self.credential, headers=headers
        )
        if response.status_code != 200:
            body = await response.aread()
            await response.aclose()
            await client.aclose()
            raise ConnectionError(f"{self.name}: SSE refused: {response.status_code} {body!r}")
        sse = SSEClient(client, response)
        sse.task = asyncio.ensure_future(sse._read())
        try:
            first = await sse.next(10)
            assert first is not None and first.event == "connected", first
            sse.connected = first.json()
        except BaseException:
            await sse.aclose()
            raise
        assert sse.connected is not None
        if self.last_id:
            for channel in self.channels:
                flag = sse.connected["channels"][channel].get("recovered")
                self.recovered.append((channel, flag is True))
        self.last_id = first.id
        return sse

    async def _read(self, sse: SSEClient) -> None:
        for _ in range(10_000_000):
            try:
                event: SSEEvent | None = await sse.next(120)
            except TimeoutError:
                return
            if event is None:
                return
            if event.event == "disconnect":
                self.byes.append(event.json()["code"])
            elif event.event == self.event:
                self._message(event.json())
                if event.id:
                    self.last_id = event.id
                else:
                    self.problems.append("message without id")
            elif event.id:
                self.last_id = event.id

    async def close(self, how: str = "close") -> None:
        """End the stream: ``close`` from the client, or ``server`` (force_reconnect)."""
        sse = self.sse
        if sse is None:
            return
        if how == "server":
            await self.server_disconnect()
        await sse.aclose()
        with contextlib.suppress(BaseException):
            await self.wait_ended()
        self.sse = None


def check_exact(name: str, got: list[Received], published: list[Received]) -> list[str]:
    """Differences between what a subscriber got on a channel and what was published."""
    if got == published:
        return []
    got_offsets = [offset for offset, _ in got]
    want = [offset for offset, _ in published]
    dupes = sorted((o for o, n in Counter(got_offsets).items() if n > 1), key=seq)
    missing = sorted(set(want) - set(got_offsets), key=seq)
    extra = sorted(set(got_offsets) - set(want), key=seq)
    out_of_order = got_offsets != sorted(got_offsets, key=seq)
    return [
        f"{name}: got {len(got)} of {len(published)}; missing {missing[:10]} "
        f"({len(missing)}), duplicates {dupes[:10]} ({len(dupes)}), unexpected {extra[:10]}, "
        f"out of order: {out_of_order}"
    ]
