"""A uvicorn HTTP protocol with a raw write path for long-lived streaming responses.

An SSE stream under a stock ASGI stack pays, per event and per subscriber, an ASGI
message dict, a coroutine ``send`` and (with sse-starlette) a task group of three tasks
per connection to watch for disconnects and send pings. Herald's SSE events are
pre-formatted once per message (:meth:`hub.protocol.EncodedMessage.sse_event`), so
what is left per subscriber is one ``transport.write``.

This protocol is uvicorn's ``httptools`` implementation, unchanged, plus the ASGI
extension ``herald.raw_body`` on GET requests: a :class:`RawBodyWriter` that, once the
app has started its response through the ordinary ``send``, writes body bytes straight
to the transport (as HTTP/1.1 chunks when uvicorn chose chunked encoding), tells the
app when the client goes away, and ends the response the way uvicorn's last ``send``
would, minus its wait for a slow client to read. Apps that do not use the extension
see plain uvicorn.

Selected by ``herald serve``, or ``uvicorn --http hub.transports.fasthttp:FastHttpProtocol``.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

EXTENSION = "herald.raw_body"


class RawBodyWriter:
    """Writes response body bytes of one request straight to its connection."""

    __slots__ = ("_cycle_ref", "_on_lost")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        # A weak reference: the cycle's scope holds this writer, and a reference cycle
        # per GET request would be garbage for the collector to find.
        self._cycle_ref: Callable[[], RequestResponseCycle | None] = weakref.ref(cycle)
        self._on_lost: Callable[[], None] | None = None

    @property
    def _cycle(self) -> RequestResponseCycle | None:
        return self._cycle_ref()

    def _open_cycle(self) -> RequestResponseCycle | None:
        cycle = self._cycle
        if (
            cycle is None
            or not cycle.response_started
            or cycle.response_complete
            or cycle.disconnected
            or cycle.transport.is_closing()
        ):
            return None
        return cycle

    @property
    def chunked(self) -> bool:
        """Whether the body is sent in HTTP/1.1 chunks (known once the response started)."""
        cycle = self._cycle
        return bool(cycle is not None and cycle.chunked_encoding)

    def write(self, body: bytes) -> bool:
        """Queue ``body`` on the transport without waiting (asyncio buffers it), as one
        chunk if the response is chunked. Only between the app's ``http.response.start``
        and its last body message. False if the response or the connection is over and
        nothing was written."""
        if self.chunked:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        return self.write_framed(body)

    def write_framed(self, data: bytes) -> bool:
        """Like :meth:`write`, for ``data`` already framed as the response needs (whole
        chunks if :attr:`chunked`)."""
        cycle = self._open_cycle()
        if cycle is None:
            return False
        cycle.transport.write(data)
        return True

    def buffered(self) -> int:
        """Bytes written but not yet accepted by the kernel: how far the client lags."""
        cycle = self._cycle
        if cycle is None or cycle.transport.is_closing():
            return 0
        return int(cycle.transport.get_write_buffer_size())

    def on_lost(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` once when the connection is lost (the client went away)."""
        self._on_lost = callback

    def close_after_response(self, *, abort_after: float) -> None:
        """Close the connection once the response has ended and what is buffered is
        flushed (no keep-alive: a stream the server ended is not reused), and abort it
        if the client has not read it all after ``abort_after`` seconds."""
        cycle = self._cycle
        if cycle is None:
            return
        cycle.keep_alive = False
        asyncio.get_running_loop().call_later(abort_after, _abort_if_unflushed, cycle.transport)

    def finish(self) -> None:
        """End the response now, as uvicorn's last ``http.response.body`` would (the last
        chunk, keep-alive or close), but without waiting for the client to read what is
        buffered: a slow client must not hold the app task. The app must not ``send``
        afterwards."""
        cycle = self._cycle
        if cycle is None or not cycle.response_started or cycle.response_complete:
            return
        if not cycle.disconnected and not cycle.transport.is_closing() and cycle.chunked_encoding:
            cycle.transport.write(b"0\r\n\r\n")
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive or cycle.disconnected:
            cycle.transport.close()
        cycle.on_response()

    def connection_lost(self) -> None:
        callback = self._on_lost
        # Nothing is written after this; the cycle is released with the request.
        self._on_lost = None  # (a closure over the app's connection)
        self._cycle_ref = _no_cycle
        if callback is not None:
            callback()


def _no_cycle() -> None:
    return None


def _abort_if_unflushed(transport: Any) -> None:
    if not transport.is_closing() or transport.get_write_buffer_size():
        transport.abort()


class FastHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the ``herald.raw_body`` extension on GETs."""

    _raw_body: RawBodyWriter | None = None

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        # The app task was created but has not run: the scope can still be extended.
        if cycle is not None and cycle.scope is self.scope and self.scope["method"] == "GET":
            writer = self._raw_body = RawBodyWriter(cycle)
            self.scope.setdefault("extensions", {})[EXTENSION] = writer  # type: ignore[assignment]

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        # The connection now belongs to the WebSocket protocol; this one is garbage, but
        # its parser (whose callbacks are this protocol's methods) would keep it in a
        # reference cycle, see FastWebSocketProtocol.connection_lost.
        self.parser = None  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        writer = self._raw_body
        if writer is not None:
            self._raw_body = None
            writer.connection_lost()
