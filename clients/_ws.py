"""One WebSocket connection of :class:`~clients.HeraldClient`, from open to close.

Three tasks share the connection once it is authenticated:

* the reader: splits server frames into objects (one per line), delivers messages,
  matches ``ack``/``error`` replies to requests, remembers ``bye``; it ends when the
  socket closes, and its result decides what the client does next;
* the syncer: keeps the server's subscriptions equal to the channels subscriptions
  want (``subscribe`` with ``since`` = the last offset processed, ``unsubscribe``);
* the refresher: sends ``{"op":"refresh"}`` with a token from the provider shortly
  before the current one expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from ._errors import ServerError, error_from_code, error_from_response
from ._models import Offset
from ._outcome import BACKOFF, TERMINAL, Outcome, classify_close
from ._transport import HandshakeRejected, TransportClosed, WebSocketConnection
from ._wire import SUBPROTOCOL, message_from, split_frame

if TYPE_CHECKING:
    from .client import HeraldClient

logger = logging.getLogger("herald.client")

REFRESH_REPLY_TIMEOUT = 10.0


async def run_ws_connection(client: HeraldClient) -> Outcome:
    """Open, authenticate (``Authorization`` header), serve, and report how it ended."""
    token = await client._get_token()
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with asyncio.timeout(client.connect_timeout):
            conn = await client._ws_connector(client.endpoints.websocket, headers, [SUBPROTOCOL])
    except HandshakeRejected as exc:
        error = error_from_response(exc.status, exc.body, exc.headers)
        if exc.status in (401, 403):
            return Outcome(TERMINAL, error=error, reason=error.code)
        return Outcome(BACKOFF, reason=f"handshake refused with HTTP {exc.status}")
    try:
        return await _WSSession(client, conn).run()
    finally:
        await conn.close()


class _WSSession:
    def __init__(self, client: HeraldClient, conn: WebSocketConnection) -> None:
        self.client = client
        self.router = client._router
        self.conn = conn
        self.next_id = 1
        # request id -> (kind, channel, since)
        self.pending: dict[int, tuple[str, str, Offset | None]] = {}
        self.on_server: set[str] = set()  # channels subscribed (or being subscribed)
        self.refresh_reply: asyncio.Future[float | None] | None = None
        self.bye: dict[str, Any] | None = None
        self.error_frame: dict[str, Any] | None = None
        self.connected: dict[str, Any] | None = None

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    async def _send(self, frame: dict[str, Any]) -> None:
        await self.conn.send(json.dumps(frame, separators=(",", ":")))

    async def run(self) -> Outcome:
        backlog: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(self.client.connect_timeout):
                while self.connected is None:
                    backlog = self._handshake(split_frame(await self.conn.recv()))
        except TransportClosed as exc:
            return classify_close(exc.code, self.bye, error_frame=self.error_frame)
        except TimeoutError:
            return Outcome(BACKOFF, reason="no 'connected' frame in time")
        welcome = self.connected
        expires_at = welcome.get("expires_at")
        self.client._set_connected(
            str(welcome.get("node") or ""),
            float(expires_at) if isinstance(expires_at, (int, float)) else None,
        )
        reader = asyncio.create_task(self._read_loop(backlog), name="herald-ws-reader")
        helpers: list[asyncio.Task[None]] = [
            asyncio.create_task(self._sync_loop(), name="herald-ws-sync"),
            asyncio.create_task(self._refresh_loop(), name="herald-ws-refresh"),
        ]
        try:
            while not reader.done():
                tasks: list[asyncio.Task[Any]] = [reader, *helpers]
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for helper in helpers:
                    if helper.done() and not helper.cancelled():
                        helper.result()  # re-raise a helper's unexpected failure
            return reader.result()
        finally:
            for task in (reader, *helpers):
                task.cancel()
            await asyncio.gather(reader, *helpers, return_exceptions=True)

    def _handshake(self, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Consume objects up to ``connected``; return the ones after it."""
        for index, obj in enumerate(objects):
            op = obj.get("op")
            if op == "connected":
                self.connected = obj
                return objects[index + 1 :]
            if op == "error":
                self.error_frame = obj
            elif op == "bye":
                self.bye = obj
        return []

    # -- reader -----------------------------------------------------------------------------

    async def _read_loop(self, backlog: list[dict[str, Any]]) -> Outcome:
        try:
            for obj in backlog:
                await self._handle(obj)
            while True:
                for obj in split_frame(await self.conn.recv()):
                    await self._handle(obj)
        except TransportClosed as exc:
            return classify_close(exc.code, self.bye, connected=True)

    async def _handle(self, obj: dict[str, Any]) -> None:
        op = obj.get("op")
        if op == "message":
            await self.router.deliver(message_from(obj))
        elif op == "ack":
            await self._on_reply(obj, None)
        elif op == "error":
            code = str(obj.get("code") or "error")
            error = error_from_code(code, str(obj.get("message") or ""))
            await self._on_reply(obj, error)
        elif op == "bye":
            self.bye = obj
        # ping, pong and ops this client does not know are ignored (forward-compatible).

    async def _on_reply(self, obj: dict[str, Any], error: ServerError | None) -> None:
        request_id = obj.get("id")
        request = self.pending.pop(request_id, None) if isinstance(request_id, int) else None
        if request is None:
            if error is not None:
                logger.warning("hub error: %s", error)
            return
        kind, channel, since = request
        if kind == "subscribe":
            if error is None:
                recovery = self.router.subscribed(
                    channel, str(obj.get("offset") or ""), obj.get("recovered"), since
                )
                if recovery is not None:
                    await self.router.recover(recovery)
            elif error.code != "already_subscribed":
                self.on_server.discard(channel)
                self.router.fail(error, [channel])
        elif kind == "refresh" and self.refresh_reply is not None:
            if not self.refresh_reply.done():
                if error is not None:
                    self.refresh_reply.set_exception(error)
                else:
                    expires = obj.get("expires_at")
                    value = float(expires) if isinstance(expires, (int, float)) else None
                    self.refresh_reply.set_result(value)

    # -- syncer -----------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        changed = self.router.changed
        with contextlib.suppress(TransportClosed):  # the reader reports the close
            while True:
                changed.clear()
                wanted = set(self.router.wanted())
                for channel in sorted(wanted - self.on_server):
                    since = self.router.last(channel)
                    request_id = self._id()
                    self.pending[request_id] = ("subscribe", channel, since)
                    self.on_server.add(channel)
                    frame: dict[str, Any] = {"op": "subscribe", "channel": channel}
                    if since is not None:
                        frame["since"] = str(since)
                    frame["id"] = request_id
                    await self._send(frame)
                for channel in sorted(self.on_server - wanted):
                    self.on_server.discard(channel)
                    request_id = self._id()
                    self.pending[request_id] = ("unsubscribe", channel, None)
                    await self._send({"op": "unsubscribe", "channel": channel, "id": request_id})
                await changed.wait()

    # -- refresher --------------------------------------------------------------------------

    async def _refresh_loop(self) -> None:
        client = self.client
        if not client.can_refresh:
            return
        with contextlib.suppress(TransportClosed):
            while True:
                deadline = client._token_deadline()
                if deadline is None:
                    return
                await asyncio.sleep(max(deadline - time.time(), 0.0))
                before = client.expires_at
                try:
                    token = await client._get_token()
                except Exception as exc:
                    # The hub closes with token_expired later; the reconnect asks again.
                    logger.warning("token provider failed during refresh: %s", exc)
                    return
                request_id = self._id()
                self.pending[request_id] = ("refresh", "", None)
                self.refresh_reply = asyncio.get_running_loop().create_future()
                await self._send({"op": "refresh", "token": token, "id": request_id})
                try:
                    async with asyncio.timeout(REFRESH_REPLY_TIMEOUT):
                        expires_at = await self.refresh_reply
                except (TimeoutError, ServerError) as exc:
                    logger.warning("token refresh failed: %s", exc)
                    return
                if expires_at is None or (before is not None and expires_at <= before):
                    logger.warning("token provider returned a token that expires no later")
                    return
                client.expires_at = expires_at
                logger.debug("token refreshed; expires at %.0f", expires_at)
