"""WebSocket ``/ws``: origin check -> auth -> accept -> one reader, one writer -> close.

Flow (see docs/protocol.md):

* ``Origin`` is checked against the allow-list before anything else (Starlette's CORS
  middleware ignores WebSocket scopes, so this is ours). A refused origin gets HTTP 403.
* Auth by ``Authorization: Bearer`` header (non-browser clients) or by a first frame
  ``{"op":"auth","token":...}`` within ``auth_timeout``. Failure: a ``bye`` frame and
  close code 4501 (4502 on timeout), so browsers can see why.
* The reader handles request frames in order; every frame with an ``id`` is answered
  with ``ack`` or ``error``. Replies go through the same outbox as messages, so the
  single writer keeps their order.
* The writer drains the whole outbox into one text frame (one JSON object per line)
  and on close sends ``bye`` then the close code of the :class:`~hub.errors.Disconnect`.
  Under ``herald serve`` it is a drain run by the worker's flusher, writing pre-framed
  bytes (:class:`RawWebSocketWriter`); elsewhere, a task sending ASGI messages. The
  hub's sweep queues ``{"op":"ping"}`` when a connection was idle for a heartbeat
  interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from starlette.types import Receive, Scope, Send

from .. import errors, protocol
from ..auth import Principal, bearer_credential
from ..connection import Connection, Outbound
from ..errors import Disconnect, HubError
from .direct import DirectWriter
from .fastws import EXTENSION, RawFrameWriter
from .origin import origin_allowed

if TYPE_CHECKING:
    from ..hub import Hub, SubscribeResult

logger = logging.getLogger("herald.ws")

GOODBYE_TIMEOUT = 1.0


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class WebSocketSession:
    """One WebSocket connection, from handshake to close."""

    def __init__(self, hub: Hub, scope: Scope, receive: Receive, send: Send) -> None:
        self.hub = hub
        self.settings = hub.settings
        self.scope = scope
        self._receive = receive
        self._send = send
        self.conn: Connection | None = None

    async def _close_before_accept(self) -> None:
        await self._send({"type": "websocket.close", "code": 1008, "reason": "forbidden origin"})

    async def _accept(self) -> None:
        offered = self.scope.get("subprotocols") or []
        subprotocol = protocol.SUBPROTOCOL if protocol.SUBPROTOCOL in offered else None
        await self._send({"type": "websocket.accept", "subprotocol": subprotocol})

    async def _goodbye(self, disconnect: Disconnect, frames: list[bytes] | None = None) -> None:
        payload = protocol.join_frames([*(frames or []), protocol.encode_bye(disconnect)])
        with contextlib.suppress(Exception):
            async with asyncio.timeout(GOODBYE_TIMEOUT):
                await self._send({"type": "websocket.send", "text": payload.decode()})
                await self._send(
                    {
                        "type": "websocket.close",
                        "code": disconnect.code,
                        "reason": disconnect.reason,
                    }
                )

    async def run(self) -> None:
        first = await self._receive()
        if first["type"] != "websocket.connect":
            return
        origin = _header(self.scope, b"origin")
        host = _header(self.scope, b"host")
        if not origin_allowed(origin, host, self.settings.allowed_origins):
            logger.info("websocket refused: origin %r not allowed", origin)
            await self._close_before_accept()
            return
        await self._accept()
        try:
            principal, auth_id = await self._authenticate()
        except _Refused as refused:
            self.hub.metrics.disconnects.labels(refused.disconnect.reason).inc()
            await self._goodbye(refused.disconnect, refused.frames)
            return
        try:
            self.conn = await self.hub.open_connection(principal, "websocket")
        except errors.Refused as refused_conn:
            self.hub.metrics.disconnects.labels(refused_conn.disconnect.reason).inc()
            await self._goodbye(refused_conn.disconnect)
            return
        conn = self.conn
        try:
            conn.enqueue_control(
                protocol.encode_welcome(
                    auth_id,
                    connection=conn.id,
                    node=self.hub.node_id,
                    subject=principal.subject,
                    heartbeat=self.settings.heartbeat_interval,
                    expires_at=principal.expires_at,
                )
            )
            # A server-side close wakes the writer, which says goodbye; the client's
            # close (or uvicorn's close timeout, or an abort) then ends the reader.
            # The request headers (the bearer token among them) were read; nothing
            # needs them again, and they would stay as long as the connection.
            self.scope["headers"] = []
            writer = self._start_writer(conn)
            try:
                await self._read_loop(conn)
            finally:
                await self._stop_writer(conn, writer)
        finally:
            self.hub.release_connection(conn)

    async def _authenticate(self) -> tuple[Principal, int | None]:
        credential = bearer_credential(_header(self.scope, b"authorization"))
        if credential is not None:
            try:
                return await self.hub.authenticator.authenticate(credential), None
            except HubError as exc:
                raise _Refused(_auth_disconnect(exc), exc) from None
        try:
            async with asyncio.timeout(self.settings.auth_timeout):
                message = await self._receive()
        except TimeoutError:
            raise _Refused(errors.AUTH_TIMEOUT) from None
        if message["type"] == "websocket.disconnect":
            raise _Refused(errors.AUTH_TIMEOUT)
        raw = message.get("text") or message.get("bytes") or b""
        request_id = None
        try:
            obj = protocol.parse_json_frame(raw)
            request_id = protocol.frame_id(obj)
            frame = protocol.decode_client_frame(
                obj, max_message_bytes=self.settings.max_message_bytes
            )
            if not isinstance(frame, protocol.AuthFrame):
                raise HubError(errors.UNAUTHORIZED, 'the first frame must be {"op":"auth"}')
            return await self.hub.authenticator.authenticate(frame.token), frame.id
        except HubError as exc:
            raise _Refused(_auth_disconnect(exc), exc, request_id) from None

    def _start_writer(self, conn: Connection) -> RawWebSocketWriter | asyncio.Task[None]:
        """The raw path's drain (run by the flusher: no task), or one writer task on the
        portable path. With the reader, one or two tasks per connection, no more."""
        conn.heartbeat = protocol.PING_FRAME
        raw = self.scope.get("extensions", {}).get(EXTENSION)
        if raw is not None:
            writer = RawWebSocketWriter(self.hub, conn, raw)
            conn.attach_drain(writer.drain, self.hub.flusher)
            return writer
        task = conn.writer_task = asyncio.ensure_future(self._write_asgi(conn))
        return task

    async def _stop_writer(
        self, conn: Connection, writer: RawWebSocketWriter | asyncio.Task[None]
    ) -> None:
        """The reader ended first (client closed, oversized frame) or was cancelled: say
        goodbye where one is due, then stop the writer."""
        conn.close(conn.closed or errors.CLIENT_CLOSED)
        if isinstance(writer, RawWebSocketWriter):
            writer.drain()
            conn.detach_drain()
            return
        try:
            if not writer.done():
                await asyncio.wait({writer}, timeout=GOODBYE_TIMEOUT)
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            conn.writer_task = None

    # -- reader ----------------------------------------------------------------------------

    async def _read_loop(self, conn: Connection) -> None:
        max_frame = self.settings.max_frame_bytes
        while conn.closed is None:
            message = await self._receive()
            if message["type"] == "websocket.disconnect":
                conn.close(errors.CLIENT_CLOSED)
                return
            text = message.get("text")
            if text is None:
                self._reply_error(
                    conn, None, HubError(errors.BAD_REQUEST, "binary frames are not supported")
                )
                continue
            if len(text) > max_frame:
                self.hub.close_connection(conn, errors.MESSAGE_TOO_BIG)
                return
            await self._handle_frame(conn, text)

    def _reply_error(self, conn: Connection, request_id: int | None, error: HubError) -> None:
        self.hub.metrics.errors.labels(error.code).inc()
        conn.enqueue_control(protocol.encode_error(request_id, error))

    async def _handle_frame(self, conn: Connection, text: str) -> None:
        request_id: int | None = None
        try:
            obj = protocol.parse_json_frame(text)
            request_id = protocol.frame_id(obj)
            frame = protocol.decode_client_frame(
                obj, max_message_bytes=self.settings.max_message_bytes
            )
            reply = await self._dispatch(conn, frame)
        except HubError as exc:
            self._reply_error(conn, request_id, exc)
            return
        except Exception:
            logger.exception("error handling a frame on connection %s", conn.id)
            self._reply_error(conn, request_id, HubError(errors.INTERNAL, "internal error"))
            return
        if reply is not None:
            conn.enqueue_control(reply)

    async def _dispatch(self, conn: Connection, frame: protocol.ClientFrame) -> bytes | None:
        hub = self.hub
        if isinstance(frame, protocol.SubscribeFrame):
            request_id = frame.id

            def ack(result: SubscribeResult) -> bytes:
                fields: dict[str, object] = {
                    "channel": result.channel,
                    "offset": result.position.token(),
                }
                if result.recovered is not None:
                    fields["recovered"] = result.recovered
                return protocol.encode_ack(request_id, **fields)

            await hub.subscribe(conn, frame.channel, frame.since, ack)
            return None
        if isinstance(frame, protocol.UnsubscribeFrame):
            channel = await hub.unsubscribe(conn, frame.channel)
            return protocol.encode_ack(frame.id, channel=channel)
        if isinstance(frame, protocol.PublishFrame):
            pub = await hub.publish_as(conn.principal, frame.channel, frame.event, frame.data)
            return protocol.encode_ack(frame.id, channel=pub.channel, offset=pub.position.token())
        if isinstance(frame, protocol.PingFrame):
            return protocol.encode_pong(frame.id)
        if isinstance(frame, protocol.PongFrame):
            return None
        if isinstance(frame, protocol.RefreshFrame):
            principal = await hub.refresh(conn, frame.token)
            return protocol.encode_ack(frame.id, expires_at=principal.expires_at)
        if isinstance(frame, protocol.AuthFrame):
            raise HubError(errors.ALREADY_AUTHENTICATED, "connection is already authenticated")
        raise HubError(errors.UNKNOWN_OP, "unknown op")

    # -- writer ----------------------------------------------------------------------------

    async def _write_asgi(self, conn: Connection) -> None:
        """The portable path (servers without the raw-frames extension): ASGI sends. A
        send stuck longer than ``send_timeout`` is cut by the hub's sweep."""
        send = self._send
        delivered = self.hub.metrics.delivered.labels("websocket")
        while True:
            batch = await conn.next_batch()
            if batch is None:
                break
            count = 0
            parts = []
            for item in batch:
                if isinstance(item, bytes):
                    parts.append(item.decode())
                else:
                    parts.append(item.text)
                    count += 1
            text = parts[0] if len(parts) == 1 else "\n".join(parts)
            conn.send_started = time.monotonic()
            try:
                await send({"type": "websocket.send", "text": text})
            except Exception:  # the client went away mid-write
                conn.close(errors.CLIENT_GONE)
                return
            finally:
                conn.send_started = 0.0
            conn.last_write = time.monotonic()
            if count:
                delivered.inc(count)
        disconnect = conn.closed
        if disconnect is not None and not disconnect.by_client:
            await self._goodbye(disconnect)


class RawWebSocketWriter(DirectWriter):
    """The fast path: already-framed bytes straight to the transport (a message's frame
    is shared by every subscriber; several queued items become one text frame)."""

    __slots__ = ("_raw",)

    def __init__(self, hub: Hub, conn: Connection, raw: RawFrameWriter) -> None:
        super().__init__(hub, conn, "websocket")
        self._raw = raw

    def _encode(self, batch: list[Outbound]) -> tuple[bytes, int]:
        if len(batch) == 1:
            item = batch[0]
            if isinstance(item, bytes):
                return protocol.ws_text_frame(item), 0
            return item.frame, 1
        parts = []
        count = 0
        for item in batch:
            if isinstance(item, bytes):
                parts.append(item)
            else:
                parts.append(item.envelope)
                count += 1
        return protocol.ws_text_frame(b"\n".join(parts)), count

    def _write(self, data: bytes) -> bool:
        return self._raw.write(data)

    def _buffered(self) -> int:
        return self._raw.buffered()

    def _say_goodbye(self, disconnect: Disconnect) -> None:
        """The ``bye`` frame, then the close code; the transport closes once flushed."""
        raw = self._raw
        raw.write(protocol.ws_text_frame(protocol.encode_bye(disconnect)))
        raw.close(disconnect.code, disconnect.reason, abort_after=self._hub.settings.send_timeout)


def _auth_disconnect(error: HubError) -> Disconnect:
    """Failed auth is terminal (4501), unless the broker was down: then retry (4007)."""
    if error.code == errors.UNAVAILABLE:
        return errors.BROKER_UNAVAILABLE
    return errors.UNAUTHORIZED_DISCONNECT


class _Refused(Exception):
    def __init__(
        self,
        disconnect: Disconnect,
        error: HubError | None = None,
        request_id: int | None = None,
    ) -> None:
        super().__init__(disconnect.reason)
        self.frames: list[bytes] = []
        if error is not None:
            self.disconnect = disconnect.with_message(error.message)
            self.frames.append(protocol.encode_error(request_id, error))
        else:
            self.disconnect = disconnect


def websocket_endpoint(
    hub: Hub, scope: Scope, receive: Receive, send: Send
) -> Coroutine[Any, Any, None]:
    """The session's own coroutine, not a wrapper around it: a frame that lives as long
    as the connection costs memory per connection."""
    return WebSocketSession(hub, scope, receive, send).run()
