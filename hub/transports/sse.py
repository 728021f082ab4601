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
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import orjson
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from .. import errors, protocol
from ..auth import Principal, bearer_credential
from ..connection import Connection
from ..errors import Disconnect, HubError
from ..http_errors import error_response, request_id_of
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


class SSEStream:
    """The writer of one SSE connection: turns outbox batches into event bytes."""

    def __init__(
        self,
        hub: Hub,
        conn: Connection,
        channels: list[str],
        connected: bytes,
        *,
        named_events: bool = True,
    ) -> None:
        self.hub = hub
        self.conn = conn
        self.channels = channels
        self._connected = connected
        # Browsers' EventSource only hears event names it listens for by name; with
        # ?named=0 every message is sent as the default "message" event instead.
        self._named = named_events

    def cursor(self) -> str:
        positions = [self.conn.positions.get(ch) for ch in self.channels]
        return protocol.encode_cursor(self.channels, positions)

    async def events(self) -> AsyncIterator[bytes]:
        conn = self.conn
        delivered = self.hub.metrics.delivered.labels("sse")
        yield protocol.sse_retry(self.hub.settings.sse_retry_ms) + protocol.sse_event(
            "connected", self._connected, self.cursor()
        )
        while True:
            # sse-starlette sends the heartbeat comments: no timer of our own.
            batch = await conn.next_batch()
            if batch is None:
                break
            if not batch:
                continue
            chunks = []
            count = 0
            positions = conn.positions
            for item in batch:
                if isinstance(item, bytes):
                    chunks.append(item)
                    continue
                pub = item.publication
                positions[pub.channel] = pub.position
                name = pub.event if self._named else "message"
                chunks.append(protocol.sse_event(name, item.envelope, self.cursor()))
                count += 1
            yield b"".join(chunks)
            delivered.inc(count)
        disconnect = conn.closed
        if disconnect is not None and disconnect.reason != "client_closed":
            yield protocol.sse_event("disconnect", protocol.encode_bye(disconnect))


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
        conn = hub.open_connection(principal, "sse")
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
        status = 503 if refused.disconnect is errors.SHUTDOWN else 429
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
    stream = SSEStream(hub, conn, channels, connected, named_events=named)
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
        if name == "SendTimeoutError":
            hub.close_connection(conn, errors.SLOW_CONSUMER)
            hub.metrics.slow_consumers.inc()
        else:
            logger.debug("sse stream %s ended: %s", conn.id, name)
    finally:
        conn.close(Disconnect(1000, "client_closed", "stream ended"))
