"""The WebSocket seam: what the client needs from a WebSocket library, and the default
implementation over ``websockets``.

Tests (and unusual deployments) pass their own :class:`WebSocketConnector` to
:class:`~clients.HeraldClient`, as one passes an ``httpx`` transport: the client then
runs its whole reconnect/resume/refresh logic against a scripted fake. SSE needs no
seam of its own: it goes through ``httpx``, whose transports are already injectable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from ._errors import TransportError

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

__all__ = [
    "HandshakeRejected",
    "TransportClosed",
    "WebSocketConnection",
    "WebSocketConnector",
    "WebsocketsConnector",
]


class TransportClosed(TransportError):
    """The WebSocket closed; ``code`` is the close code (1006 when no close frame came)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed ({code} {reason})".strip())
        self.code = code
        self.reason = reason


class HandshakeRejected(TransportError):
    """The server answered the upgrade request with an HTTP status instead of 101."""

    def __init__(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None):
        super().__init__(f"WebSocket upgrade refused with HTTP {status}")
        self.status = status
        self.body = body
        self.headers = dict(headers or {})


class WebSocketConnection(Protocol):
    """One open WebSocket."""

    async def send(self, text: str) -> None:
        """Send one text frame. Raises :class:`TransportClosed` if the socket is gone."""

    async def recv(self) -> str:
        """The next text frame. Raises :class:`TransportClosed` when the socket closes."""

    async def close(self) -> None:
        """Close (normal closure), without raising. Idempotent."""


class WebSocketConnector(Protocol):
    """Opens WebSockets: ``await connector(url, headers, subprotocols)``."""

    async def __call__(
        self, url: str, headers: Mapping[str, str], subprotocols: Sequence[str]
    ) -> WebSocketConnection:
        """Open ``url`` with extra request ``headers``, offering ``subprotocols``.
        Raises :class:`HandshakeRejected` for an HTTP refusal and
        :class:`~clients.TransportError` for network failures."""


class _WebsocketsConnection:
    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws

    def _closed(self, exc: Exception) -> TransportClosed:
        from websockets.exceptions import ConnectionClosed

        if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
            return TransportClosed(exc.rcvd.code, exc.rcvd.reason)
        return TransportClosed(1006, type(exc).__name__)

    async def send(self, text: str) -> None:
        try:
            await self._ws.send(text)
        except Exception as exc:
            raise self._closed(exc) from None

    async def recv(self) -> str:
        try:
            frame = await self._ws.recv()
        except Exception as exc:
            raise self._closed(exc) from None
        return frame.decode() if isinstance(frame, bytes) else frame

    async def close(self) -> None:
        try:
            await self._ws.close()
        except Exception:  # already gone: nothing to do
            return


class WebsocketsConnector:
    """The default connector, over the ``websockets`` library.

    ``max_size`` is generous because a server frame may coalesce many messages;
    the library answers the hub's protocol pings and pings the server itself
    (``ping_interval``), so a half-open connection is noticed and reconnected.
    """

    def __init__(
        self,
        *,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        max_size: int | None = 64 * 1024 * 1024,
        close_timeout: float = 2.0,
    ) -> None:
        self.open_timeout = open_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.max_size = max_size
        self.close_timeout = close_timeout

    async def __call__(
        self, url: str, headers: Mapping[str, str], subprotocols: Sequence[str]
    ) -> WebSocketConnection:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus, WebSocketException
        from websockets.typing import Subprotocol

        try:
            ws = await connect(
                url,
                additional_headers=dict(headers),
                subprotocols=[Subprotocol(p) for p in subprotocols],
                open_timeout=self.open_timeout,
                ping_interval=self.ping_interval,
                ping_timeout=self.ping_timeout,
                max_size=self.max_size,
                close_timeout=self.close_timeout,
                compression=None,
            )
        except InvalidStatus as exc:
            response = exc.response
            raise HandshakeRejected(
                response.status_code,
                bytes(response.body or b""),
                {k.lower(): v for k, v in response.headers.raw_items()},
            ) from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise TransportError(f"cannot open {url}: {type(exc).__name__}: {exc}") from None
        return _WebsocketsConnection(ws)
