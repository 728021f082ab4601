"""A uvicorn WebSocket protocol with a pre-framed write path for the fan-out.

The cost floor of a stock ASGI stack is the per-connection ``send``: an ASGI message
dict, uvicorn's flow-control wait, websockets' frame building and a str -> bytes
encode, for every message and every subscriber. Server frames are unmasked, so a
message's frame is the same bytes for every connection: the hub builds it once
(:attr:`hub.protocol.EncodedMessage.frame`) and this protocol offers an ASGI extension
that writes such bytes straight to the transport.

Everything else (handshake, keepalive pings, receiving, the close handshake) is
uvicorn's ``websockets-sansio`` implementation, unchanged. The extension is only
used for complete data frames, which the WebSocket protocol allows between any
control frames; servers without it fall back to the ordinary ``send``.

Selected by ``herald serve`` (``--ws herald``), or ``uvicorn --ws
hub.transports.fastws:FastWebSocketProtocol``.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

EXTENSION = "herald.raw_frames"


class RawFrameWriter:
    """Writes complete, already-framed WebSocket frames to one connection."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: FastWebSocketProtocol) -> None:
        self._protocol: FastWebSocketProtocol | None = protocol

    def write(self, frame: bytes) -> bool:
        """Queue ``frame`` on the transport without waiting (asyncio buffers it).
        False if the connection is closing and nothing was written."""
        protocol = self._protocol
        if protocol is None:
            return False
        transport = protocol.transport
        if protocol.close_sent or protocol.disconnected or transport.is_closing():
            return False
        transport.write(frame)
        return True

    def buffered(self) -> int:
        """Bytes written but not yet accepted by the kernel: how far the client lags."""
        protocol = self._protocol
        if protocol is None or protocol.transport.is_closing():
            return 0
        return protocol.transport.get_write_buffer_size()

    def abort(self) -> None:
        """Drop the connection now, discarding what is buffered (a dead slow client)."""
        if self._protocol is not None:
            self._protocol.transport.abort()

    def detach(self) -> None:
        """The connection is gone: forget the protocol (later calls do nothing)."""
        self._protocol = None

    def close(self, code: int, reason: str, *, abort_after: float) -> None:
        """Send a close frame after what is buffered, then close the transport once it
        is flushed; a client that never reads it is aborted after ``abort_after`` s."""
        protocol = self._protocol
        if protocol is None:
            return
        transport = protocol.transport
        if protocol.close_sent or transport.is_closing():
            return
        protocol.close_sent = True  # uvicorn must not send a second close frame
        protocol.stop_keepalive()
        transport.write(close_frame(code, reason))
        transport.close()
        protocol.loop.call_later(abort_after, _abort_if_open, transport)


def _abort_if_open(transport: Any) -> None:
    if transport.get_write_buffer_size():  # still not flushed: the client is gone
        transport.abort()


def close_frame(code: int, reason: str) -> bytes:
    """An unmasked close frame (RFC 6455 5.5.1): 2-byte code and a short UTF-8 reason."""
    payload = code.to_bytes(2, "big") + reason.encode()[:120]
    return bytes((0x88, len(payload))) + payload


class FastWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol plus the ``herald.raw_frames`` extension."""

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        # The app task was created but has not run yet: the scope can still be extended.
        scope = getattr(self, "scope", None)
        if scope is not None and self.response.status_code == 101:
            extensions = scope.setdefault("extensions", {})
            extensions[EXTENSION] = RawFrameWriter(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # Break the reference cycles a closed connection would otherwise leave for the
        # collector: scope -> extensions -> writer -> protocol -> scope, and websockets'
        # parser generator, whose frame holds its ServerProtocol. Connections are
        # frozen out of the collector's reach (hub/gc_tuning.py); what dies in a cycle
        # after that stays until the next thaw, a full collection that pauses the
        # worker. Nothing reads either after the connection is lost.
        scope = getattr(self, "scope", None)
        if scope is not None:
            writer = scope.get("extensions", {}).get(EXTENSION)
            if writer is not None:
                writer.detach()
        self.conn.parser = None  # type: ignore[assignment]

    def start_keepalive(self) -> None:
        # Called once the app accepted and the 101 response went out: the handshake's
        # parsed request and response (all their headers) are never read again, and
        # would otherwise stay for the connection's lifetime (~2 KB each connection).
        if self.handshake_complete:
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]
        super().start_keepalive()
