"""One SSE stream of :class:`~clients.HeraldClient`, from request to end.

``GET /sse?channel=a&channel=b`` with ``Authorization: Bearer`` and, when resuming,
``Last-Event-ID``: the hub's own last cursor when the channel set is unchanged, or one
built from the per-channel offsets when it changed (so the channels the client knew
still resume exactly, and new ones start at the top). A change of the channel set ends
the stream between two events and reconnects at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx

from ._errors import ProtocolError, TokenExpiredError, error_from_response
from ._models import Offset
from ._outcome import BACKOFF, REFRESH, RESTART, TERMINAL, Outcome, classify_close
from ._wire import SSEEvent, SSEParser, build_cursor, message_from

if TYPE_CHECKING:
    from ._router import Router
    from .client import HeraldClient


async def run_sse_connection(client: HeraldClient, http: httpx.AsyncClient) -> Outcome:
    router = client._router
    channels = router.wanted()
    if not channels:
        return Outcome(RESTART, reason="no channels")
    sent = {ch: last for ch in channels if (last := router.last(ch)) is not None}
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if sent:
        saved = client._sse_cursor
        if saved is not None and saved[0] == tuple(channels):
            headers["Last-Event-ID"] = saved[1]
        else:
            headers["Last-Event-ID"] = build_cursor({c: str(o) for c, o in sent.items()}, channels)
    token = await client._get_token()
    headers["Authorization"] = f"Bearer {token}"
    request = http.build_request(
        "GET", client.endpoints.sse, params=[("channel", ch) for ch in channels], headers=headers
    )
    response = await http.send(request, stream=True)
    try:
        if response.status_code != 200:
            body = await response.aread()
            return _refused(response.status_code, body, response.headers, channels, router)
        return await _SSEStream(client, response, channels, sent).run()
    finally:
        await response.aclose()


def _refused(
    status: int, body: bytes, headers: Mapping[str, str], channels: list[str], router: Router
) -> Outcome:
    error = error_from_response(status, body, headers)
    if status == 401:
        action = REFRESH if isinstance(error, TokenExpiredError) else TERMINAL
        return Outcome(action, error=error, reason=error.code)
    if status in (400, 403, 413, 422):
        # The hub names a refused channel in its message ('not allowed to subscribe to
        # 'x''): end only the subscriptions of that channel and keep the others.
        named = [ch for ch in channels if repr(ch) in error.message]
        if named and len(named) < len(channels):
            router.fail(error, named)
            return Outcome(RESTART, reason=error.code)
        return Outcome(TERMINAL, error=error, reason=error.code)
    if status == 429 or status >= 500:
        return Outcome(BACKOFF, reason=f"HTTP {status} {error.code}")
    return Outcome(TERMINAL, error=error, reason=error.code)


class _SSEStream:
    def __init__(
        self,
        client: HeraldClient,
        response: httpx.Response,
        channels: list[str],
        sent: dict[str, Offset],
    ) -> None:
        self.client = client
        self.router = client._router
        self.response = response
        self.channels = channels
        self.key = tuple(channels)
        self.sent = sent
        self.connected = False
        self.busy = False  # handling an event: do not cancel the reader now
        self.stop = False

    async def run(self) -> Outcome:
        reader = asyncio.create_task(self._read(), name="herald-sse-reader")
        watcher = asyncio.create_task(self._watch(), name="herald-sse-watch")
        try:
            await asyncio.wait([reader, watcher], return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                # The channel set changed: stop between two events, never inside one.
                self.stop = True
                if not self.busy:
                    reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                if reader.cancelled():
                    return Outcome(RESTART, self.connected, reason="channels changed")
            return reader.result()
        finally:
            for task in (reader, watcher):
                task.cancel()
            await asyncio.gather(reader, watcher, return_exceptions=True)

    async def _watch(self) -> None:
        changed = self.router.changed
        while True:
            changed.clear()
            if self.router.wanted() != self.channels:
                return
            await changed.wait()

    async def _read(self) -> Outcome:
        parser = SSEParser()
        async for line in self.response.aiter_lines():
            event = parser.feed(line)
            if event is None:
                continue
            self.busy = True
            try:
                outcome = await self._handle(event)
            finally:
                self.busy = False
            if outcome is not None:
                return outcome
            if self.stop:
                return Outcome(RESTART, self.connected, reason="channels changed")
        return classify_close(None, None, connected=self.connected)

    def _json(self, event: SSEEvent) -> dict[str, Any]:
        try:
            obj = json.loads(event.data)
        except ValueError:
            raise ProtocolError(f"SSE data is not JSON: {event.data[:80]!r}") from None
        if not isinstance(obj, dict):
            raise ProtocolError("SSE data is not a JSON object")
        return obj

    async def _handle(self, event: SSEEvent) -> Outcome | None:
        if event.event == "disconnect":
            return classify_close(None, self._json(event), connected=self.connected)
        obj = self._json(event)
        if event.event == "connected":
            await self._on_connected(obj)
        elif obj.get("op") == "message":
            await self.router.deliver(message_from(obj))
        if event.id:
            self.client._sse_cursor = (self.key, event.id)
        return None

    async def _on_connected(self, obj: dict[str, Any]) -> None:
        self.connected = True
        expires_at = obj.get("expires_at")
        self.client._set_connected(
            str(obj.get("node") or ""),
            float(expires_at) if isinstance(expires_at, (int, float)) else None,
        )
        status = obj.get("channels")
        if not isinstance(status, dict):
            raise ProtocolError("SSE 'connected' event lacks 'channels'")
        for channel in self.channels:
            info = status.get(channel)
            if not isinstance(info, dict):
                continue
            since = self.sent.get(channel)
            recovered = bool(info.get("recovered")) if since is not None else None
            recovery = self.router.subscribed(
                channel, str(info.get("offset") or ""), recovered, since
            )
            if recovery is not None:
                await self.router.recover(recovery)
