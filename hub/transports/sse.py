"""SSE ``/sse?channel=a&channel=b``: auth -> subscribe every channel -> stream the outbox.

Auth, in order: ``Authorization: Bearer`` (mobile apps, services), a short-lived
``token`` query parameter holding a *subscribe* token (browser ``EventSource``, which
cannot send headers), or the ``herald_token`` cookie. Subscription errors are plain
HTTP errors in the product's error envelope, before any event is streamed.

Every event carries ``id:``, a cursor of all the connection's channel positions, so a
reconnect with ``Last-Event-ID`` (or ``?lastEventId=`` where the header cannot be set)
resumes every channel exactly. The first event, ``connected``, reports per channel
whether the position was recovered. A server-side close ends with ``event:
disconnect`` carrying the same payload as the WebSocket ``bye``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import orjson
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from .. import errors, protocol
from ..auth import Principal, bearer_credential
from ..connection import Connection, Outbound
from ..errors import Disconnect, HubError
from ..http_errors import error_response, request_id_of
from .direct import DirectWriter
from .fasthttp import EXTENSION, RawBodyWriter
from .origin import origin_allowed

if TYPE_CHECKING:
    from ..hub import Hub

logger = logging.getLogger("herald.sse")

TOKEN_COOKIE = "herald_token"
SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}


class SSEFormatter:
    """Turns one connection's outbox batches into SSE bytes.

    Every event's ``id:`` is the cursor of all the connection's channel positions. On
    a single-channel connection that is the same for every subscriber of the channel,
    so the event (and its HTTP chunk) comes pre-formatted from the shared
    :class:`~hub.protocol.EncodedMessage`; otherwise the cursor is rebuilt from cached
    per-channel tokens, with the channel-set tag computed once.
    """

    __slots__ = ("_index", "_named", "_single", "_tag", "_tokens")

    def __init__(self, conn: Connection, channels: list[str], *, named: bool) -> None:
        # Browsers' EventSource only hears event names it listens for by name; with
        # ?named=0 every message is sent as the default "message" event instead.
        self._named = named
        self._single = len(channels) == 1
        self._tag = protocol.channel_set_tag(channels)
        self._index = {channel: i for i, channel in enumerate(channels)}
        positions = [conn.positions.get(channel) for channel in channels]
        self._tokens = ["" if pos is None else pos.token() for pos in positions]

    def cursor(self) -> str:
        """The cursor as of the last formatted event (on a single-channel connection,
        only tracked until the first one: its events carry their own)."""
        return self._tag + "." + ",".join(self._tokens)

    def format(self, batch: list[Outbound], *, chunked: bool = False) -> tuple[bytes, int]:
        """The bytes of ``batch`` (one HTTP chunk if ``chunked``) and how many messages
        it holds. Control items are SSE bytes already (heartbeat comments)."""
        named = self._named
        if self._single and len(batch) == 1:
            item = batch[0]
            if not isinstance(item, bytes):
                return item.sse_event(named=named, chunked=chunked), 1
        parts = []
        count = 0
        tokens = self._tokens
        for item in batch:
            if isinstance(item, bytes):
                parts.append(item)
                continue
            count += 1
            if self._single:
                parts.append(item.sse_event(named=named))
                continue
            pub = item.publication
            tokens[self._index[pub.channel]] = item.position.token()
            name = pub.event if named else "message"
            parts.append(protocol.sse_event(name, item.envelope, self.cursor()))
        body = b"".join(parts)
        if chunked:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        return body, count


class SSEStream:
    """The portable writer of one SSE connection (servers without ``herald.raw_body``):
    an async iterator of outbox batches for sse-starlette, which sends heartbeats and
    watches for the client going away."""

    def __init__(
        self,
        hub: Hub,
        conn: Connection,
        formatter: SSEFormatter,
        connected: bytes,
    ) -> None:
        self.hub = hub
        self.conn = conn
        self._formatter = formatter
        self._connected = connected

    async def events(self) -> AsyncIterator[bytes]:
        conn = self.conn
        delivered = self.hub.metrics.delivered.labels("sse")
        yield opening_events(self.hub, self._connected, self._formatter)
        while True:
            batch = await conn.next_batch()
            if batch is None:
                break
            if not batch:
                continue
            body, count = self._formatter.format(batch)
            yield body
            delivered.inc(count)
        disconnect = conn.closed
        if disconnect is not None and not disconnect.by_client:
            yield protocol.sse_event("disconnect", protocol.encode_bye(disconnect))


class RawSSEWriter(DirectWriter):
    """The fast path: each batch as one HTTP chunk straight to the transport."""

    __slots__ = ("_formatter", "_raw")

    def __init__(
        self, hub: Hub, conn: Connection, formatter: SSEFormatter, raw: RawBodyWriter
    ) -> None:
        super().__init__(hub, conn, "sse")
        self._formatter = formatter
        self._raw = raw

    def _encode(self, batch: list[Outbound]) -> tuple[bytes, int]:
        return self._formatter.format(batch, chunked=self._raw.chunked)

    def _write(self, data: bytes) -> bool:
        return self._raw.write_framed(data)

    def _buffered(self) -> int:
        return self._raw.buffered()

    def _say_goodbye(self, disconnect: Disconnect) -> None:
        """``event: disconnect``; the stream's task then ends the response."""
        self._raw.write(protocol.sse_event("disconnect", protocol.encode_bye(disconnect)))
        self._raw.close_after_response(abort_after=self._hub.settings.send_timeout)


def opening_events(hub: Hub, connected: bytes, formatter: SSEFormatter) -> bytes:
    """``retry:`` and the ``connected`` event, whose id resumes every channel."""
    return protocol.sse_retry(hub.settings.sse_retry_ms) + protocol.sse_event(
        "connected", connected, formatter.cursor()
    )


async def _authenticate(hub: Hub, request: Request) -> Principal:
    auth = hub.authenticator
    credential = bearer_credential(request.headers.get("authorization"))
    if credential is not None:
        return await auth.authenticate(credential)
    query_token = request.query_params.get("token")
    if query_token:
        principal = await auth.authenticate_token(query_token, token_type="subscribe")
        return principal
    cookie = request.cookies.get(TOKEN_COOKIE)
    if cookie:
        if not origin_allowed(
            request.headers.get("origin"), request.headers.get("host"), hub.settings.allowed_origins
        ):
            raise HubError(errors.FORBIDDEN, "origin not allowed")
        return await auth.authenticate_token(cookie)
    raise HubError(
        errors.UNAUTHORIZED,
        "send 'Authorization: Bearer <token>', a subscribe token as ?token=, "
        f"or the {TOKEN_COOKIE} cookie",
    )


def _requested_channels(request: Request, limit: int) -> list[str]:
    channels = sorted(set(request.query_params.getlist("channel")))
    if not channels:
        raise HubError(errors.BAD_REQUEST, "give at least one ?channel=")
    if len(channels) > limit:
        raise HubError(errors.TOO_MANY_CHANNELS, f"at most {limit} channels per connection")
    return channels


async def sse_endpoint(hub: Hub, scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)
    try:
        principal = await _authenticate(hub, request)
        channels = _requested_channels(request, hub.settings.max_channels_per_connection)
        conn = await hub.open_connection(principal, "sse")
    except HubError as exc:
        from ..http_errors import STATUS_BY_CODE

        hub.metrics.errors.labels(exc.code).inc()
        headers = (
            {"WWW-Authenticate": "Bearer"}
            if exc.code in ("unauthorized", "token_expired")
            else None
        )
        response = error_response(
            STATUS_BY_CODE.get(exc.code, 400),
            exc.code,
            exc.message,
            request_id=request_id_of(request),
            headers=headers,
        )
        await response(scope, receive, send)
        return
    except errors.Refused as refused:
        status = 503 if refused.disconnect in (errors.SHUTDOWN, errors.BROKER_UNAVAILABLE) else 429
        response = error_response(
            status,
            refused.disconnect.reason,
            refused.disconnect.message,
            request_id=request_id_of(request),
        )
        await response(scope, receive, send)
        return
    try:
        await _stream(hub, request, conn, channels, scope, receive, send)
    finally:
        hub.release_connection(conn)


async def _stream(
    hub: Hub,
    request: Request,
    conn: Connection,
    channels: list[str],
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    cursor_text = request.headers.get("last-event-id") or request.query_params.get("lastEventId")
    since: list[protocol.StreamPosition | None] = [None] * len(channels)
    if cursor_text:
        decoded = protocol.decode_cursor(channels, cursor_text)
        if decoded is not None:
            since = decoded
    status: dict[str, dict[str, object]] = {}
    try:
        for channel, position in zip(channels, since, strict=True):
            result = await hub.subscribe(conn, channel, position)
            entry: dict[str, object] = {"offset": result.position.token()}
            if cursor_text:
                # A cursor that does not match these channels recovers nothing.
                entry["recovered"] = bool(result.recovered)
            status[channel] = entry
    except HubError as exc:
        from ..http_errors import STATUS_BY_CODE

        response = error_response(
            STATUS_BY_CODE.get(exc.code, 400),
            exc.code,
            exc.message,
            request_id=request_id_of(request),
        )
        await response(scope, receive, send)
        return
    connected = orjson.dumps(
        {
            "op": "connected",
            "connection": conn.id,
            "node": hub.node_id,
            "subject": conn.principal.subject,
            "channels": status,
            "expires_at": conn.principal.expires_at,
        }
    )
    named = request.query_params.get("named", "1").lower() not in ("0", "false", "no")
    formatter = SSEFormatter(conn, channels, named=named)
    raw = scope.get("extensions", {}).get(EXTENSION)
    if raw is not None:
        await _stream_raw(hub, conn, formatter, connected, raw, send)
        return
    stream = SSEStream(hub, conn, formatter, connected)
    settings = hub.settings
    event_source = EventSourceResponse(
        stream.events(),
        headers=SSE_HEADERS,
        ping=settings.heartbeat_interval,
        send_timeout=settings.send_timeout,
        shutdown_grace_period=settings.shutdown_grace,
    )
    try:
        await event_source(scope, receive, send)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # send timeout or a vanished client
        name = type(exc).__name__
        if name == "SendTimeoutError" and conn.closed is None:
            # (an outbox overflow already closed and counted it otherwise)
            hub.close_connection(conn, errors.SLOW_CONSUMER)
            hub.metrics.slow_consumers.inc()
        else:
            logger.debug("sse stream %s ended: %s", conn.id, name)
    finally:
        conn.close(errors.CLIENT_CLOSED)


# uvicorn manages the connection header (keep-alive is HTTP/1.1's default).
RAW_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    *(
        (name.lower().encode(), value.encode())
        for name, value in SSE_HEADERS.items()
        if name != "Connection"
    ),
]


async def _stream_raw(
    hub: Hub,
    conn: Connection,
    formatter: SSEFormatter,
    connected: bytes,
    raw: RawBodyWriter,
    send: Send,
) -> None:
    """One task per connection, asleep until the connection closes: events are written
    by the flusher (:class:`RawSSEWriter`), heartbeats queued by the hub's sweep, and
    the client going away is reported by the protocol."""
    await send({"type": "http.response.start", "status": 200, "headers": RAW_HEADERS})
    await send(
        {
            "type": "http.response.body",
            "body": opening_events(hub, connected, formatter),
            "more_body": True,
        }
    )
    conn.last_write = time.monotonic()
    conn.heartbeat = protocol.SSE_HEARTBEAT
    writer = RawSSEWriter(hub, conn, formatter, raw)
    raw.on_lost(lambda: conn.close(errors.CLIENT_GONE))
    conn.attach_drain(writer.drain, hub.flusher)
    try:
        await conn.wait_closed()
    finally:
        conn.close(errors.CLIENT_GONE)  # cancelled (shutdown): nothing more is written
        writer.drain()  # the goodbye, where due, before the response ends
        conn.detach_drain()
        raw.on_lost(None)
        raw.finish()  # without waiting for a slow client to read what is buffered
