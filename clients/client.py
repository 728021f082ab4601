"""``HeraldClient``: subscribe to hub channels over WebSocket or SSE, resiliently.

::

    async with HeraldClient("http://localhost:8000", token_provider=get_token) as hub:
        async for msg in hub.subscribe("user:42", "public:news"):
            print(msg.channel, msg.event, msg.data)

One background task owns the connection and loops: connect -> authenticate ->
subscribe every wanted channel (with ``since`` = the last offset processed) -> read
until the connection ends -> decide (see :mod:`clients._outcome`) -> wait a jittered,
capped backoff -> again. Subscriptions are async iterators fed by that task; they
survive reconnects, and see every message exactly once, in order, or a
:class:`~clients.Recovery` notice when history could not fill a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Literal

import httpx

from ._errors import (
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    HeraldError,
    ServerError,
    TokenExpiredError,
    TransportError,
)
from ._models import Backoff, Message, Offset
from ._outcome import BACKOFF, IMMEDIATE, REFRESH, RESTART, TERMINAL, Outcome
from ._router import RecoveryHandler, Router
from ._transport import WebSocketConnector, WebsocketsConnector
from ._wire import Endpoints

__all__ = ["HeraldClient", "Subscription", "TokenProvider"]

logger = logging.getLogger("herald.client")

TokenProvider = Callable[[], Awaitable[str]]
TransportName = Literal["websocket", "sse"]

# docs/protocol.md, "Concepts": kind[:name], at most 128 characters.
_CHANNEL_RE = re.compile(r"^[A-Za-z0-9_\-]{1,32}(:[A-Za-z0-9_\-.@=+/]{1,95})?$")
_SHUTDOWN_JITTER = 0.25  # seconds: spread "reconnect at once" over a short window


class _End:
    """Queue marker: the iteration is over."""


_END = _End()


class Subscription:
    """Messages of one or more channels, as an async iterator.

    Iterating yields :class:`~clients.Message` objects in order per channel. It ends
    when the client closes, and raises the :class:`~clients.ServerError` that ended it
    otherwise (a forbidden channel, a revoked token). Leave it with :meth:`aclose` or
    ``async with`` to unsubscribe at once; a subscription you drop is unsubscribed when
    it is garbage-collected.

    Its queue is bounded (``queue_size``): when you read slower than messages arrive,
    the client stops reading the socket, the hub disconnects it as a slow consumer, and
    it resumes from history — nothing is lost while history holds it.
    """

    def __init__(
        self,
        client: HeraldClient,
        channels: tuple[str, ...],
        *,
        queue_size: int,
        on_recovery: RecoveryHandler | None,
    ) -> None:
        self.channels = channels
        self.on_recovery = on_recovery
        self._client = client
        self._queue: asyncio.Queue[Message | _End | HeraldError] = asyncio.Queue(queue_size)
        self._done = False
        self._error: HeraldError | None = None

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        if self._done and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, Message):
            return item
        self._done = True
        if isinstance(item, HeraldError):
            raise item
        raise StopAsyncIteration

    async def get(self, timeout: float | None = None) -> Message:
        """The next message (raises :class:`TimeoutError` after ``timeout`` seconds, or
        :class:`~clients.ClientClosedError` when the subscription has ended)."""
        try:
            async with asyncio.timeout(timeout):
                return await self.__anext__()
        except StopAsyncIteration:
            raise ClientClosedError("subscription ended") from None

    async def wait_subscribed(self, timeout: float | None = None) -> None:
        """Wait until the hub confirmed every channel of this subscription: anything
        published afterwards is delivered. Raises the error that refused a channel,
        :class:`~clients.ClientClosedError` if the subscription ended, and
        :class:`TimeoutError` after ``timeout`` seconds."""
        router = self._client._router
        async with asyncio.timeout(timeout):
            while True:
                if self._error is not None:
                    raise self._error
                if self._done:
                    raise ClientClosedError("subscription ended")
                if all(router.confirmed(channel) for channel in self.channels):
                    return
                router.progress.clear()
                await router.progress.wait()

    async def _put(self, message: Message) -> None:
        if not self._done:
            await self._queue.put(message)

    def _fail(self, error: HeraldError) -> None:
        if not self._done:
            self._error = error
        self._push_final(error)

    def _end(self) -> None:
        self._push_final(_END)

    def _push_final(self, item: _End | HeraldError) -> None:
        if self._done:
            return
        self._done = True
        # Make room: the final item must get in even when the queue is full.
        while self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(item)

    async def aclose(self) -> None:
        """Unsubscribe (channels no other subscription wants are left on the server)."""
        self._client._router.remove(self)
        self._end()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _parse_since(
    channels: tuple[str, ...], since: str | Mapping[str, str] | None
) -> dict[str, Offset]:
    if since is None:
        return {}
    if isinstance(since, str):
        if len(channels) != 1:
            raise ValueError("a single 'since' offset needs exactly one channel; pass a mapping")
        return {channels[0]: Offset.parse(since)}
    unknown = set(since) - set(channels)
    if unknown:
        raise ValueError(f"'since' names channels not subscribed here: {sorted(unknown)}")
    return {channel: Offset.parse(token) for channel, token in since.items()}


class HeraldClient:
    """A connection to a Herald hub that stays up: reconnects, resumes, refreshes tokens.

    ``url`` is the hub's base URL (``http://host:8000``) or its WebSocket URL
    (``ws://host:8000/ws``). Authenticate with a fixed ``token`` (access JWT or service
    API key) or a ``token_provider``: an async callable returning a valid token, called
    before every connection and before the current token expires (WebSocket
    ``refresh``). Without a provider an expired token ends the client with
    :class:`~clients.TokenExpiredError`.

    ``transport`` is ``"websocket"`` (default: one connection, channels added and
    removed on the fly) or ``"sse"`` (one ``/sse`` stream for all channels; changing
    the channel set reconnects, resuming every channel by its offset).

    ``on_recovery`` is called (sync or async) with a :class:`~clients.Recovery` for any
    channel whose missed messages history could no longer provide.

    Test seams: ``ws_connector`` opens WebSockets (default: the ``websockets``
    library), ``http_transport`` is the ``httpx`` transport for SSE.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        transport: TransportName = "websocket",
        on_recovery: RecoveryHandler | None = None,
        backoff: Backoff | None = None,
        max_reconnect_attempts: int | None = None,
        queue_size: int = 10_000,
        refresh_margin: float = 30.0,
        connect_timeout: float = 10.0,
        sse_read_timeout: float = 60.0,
        ws_connector: WebSocketConnector | None = None,
        http_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if (token is None) == (token_provider is None):
            raise ValueError("pass exactly one of token= or token_provider=")
        if transport not in ("websocket", "sse"):
            raise ValueError("transport must be 'websocket' or 'sse'")
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.endpoints = Endpoints.from_url(url)
        self.transport = transport
        self.backoff = backoff or Backoff()
        self.max_reconnect_attempts = max_reconnect_attempts
        self.queue_size = queue_size
        self.refresh_margin = refresh_margin
        self.connect_timeout = connect_timeout
        self.sse_read_timeout = sse_read_timeout
        self._token = token
        self._provider = token_provider
        self._ws_connector: WebSocketConnector = ws_connector or WebsocketsConnector(
            open_timeout=connect_timeout
        )
        self._http_transport = http_transport
        self._http: httpx.AsyncClient | None = None
        self._router = Router(on_recovery)
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self._failure: HeraldError | None = None
        self._connected = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._sse_cursor: tuple[tuple[str, ...], str] | None = None  # (channels, Last-Event-ID)
        self.node: str | None = None  # the worker of the current connection
        self.expires_at: float | None = None  # expiry of the current token (Unix time)
        self.reconnects = 0  # connections opened after the first one

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> HeraldClient:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def start(self) -> None:
        """Start the background connection task (``async with`` does it for you)."""
        if self._closed:
            raise ClientClosedError("client is closed")
        if self._runner is None:
            if self.transport == "sse":
                self._http = httpx.AsyncClient(
                    transport=self._http_transport,
                    timeout=httpx.Timeout(self.connect_timeout, read=self.sse_read_timeout),
                    follow_redirects=False,
                )
            self._runner = asyncio.create_task(self._run(), name="herald-client")

    async def aclose(self) -> None:
        """Close the connection and end every subscription's iteration. Idempotent."""
        if self._closed:
            return
        self._closed = True
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
        self._router.end_all()
        self._connected.clear()
        self._state_changed.set()
        if self._http is not None:
            await self._http.aclose()

    @property
    def connected(self) -> bool:
        """Whether a connection is currently authenticated."""
        return self._connected.is_set()

    @property
    def offsets(self) -> dict[str, str]:
        """The last offset processed per subscribed channel (persist it, and pass it back
        as ``since`` to resume after a restart of your process)."""
        return self._router.offsets()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until a connection is authenticated; raises the terminal error if the
        client gave up, and :class:`TimeoutError` after ``timeout`` seconds. (WebSocket
        connects at start; SSE once there is a subscription, as a stream needs channels.)"""
        self.start()
        async with asyncio.timeout(timeout):
            while not self._connected.is_set():
                if self._failure is not None:
                    raise self._failure
                if self._closed:
                    raise ClientClosedError("client is closed")
                self._state_changed.clear()
                await self._state_changed.wait()

    # -- subscribing ------------------------------------------------------------------------

    def subscribe(
        self,
        *channels: str,
        since: str | Mapping[str, str] | None = None,
        on_recovery: RecoveryHandler | None = None,
        queue_size: int | None = None,
    ) -> Subscription:
        """Subscribe to ``channels`` on the shared connection; iterate the result.

        ``since`` resumes from an offset you stored (one offset for one channel, or a
        mapping per channel). ``on_recovery`` hears about channels whose gap could not be
        filled (in addition to the client's handler). Raises
        :class:`~clients.BadRequestError` at once for a malformed channel name.
        """
        if self._closed:
            raise ClientClosedError("client is closed")
        if self._failure is not None:
            raise self._failure
        if not channels:
            raise ValueError("subscribe to at least one channel")
        names = tuple(dict.fromkeys(channels))
        for name in names:
            if not isinstance(name, str) or len(name) > 128 or not _CHANNEL_RE.match(name):
                raise BadRequestError("bad_channel", f"invalid channel name {name!r}")
        offsets = _parse_since(names, since)
        sub = Subscription(
            self, names, queue_size=queue_size or self.queue_size, on_recovery=on_recovery
        )
        self._router.add(sub, offsets)
        self.start()
        return sub

    # -- the connection loop ----------------------------------------------------------------

    async def _get_token(self) -> str:
        if self._provider is None:
            return self._token or ""
        token = await self._provider()
        if not isinstance(token, str) or not token:
            raise AuthenticationError("unauthorized", "token provider returned no token")
        return token

    @property
    def can_refresh(self) -> bool:
        return self._provider is not None

    def _set_connected(self, node: str | None, expires_at: float | None) -> None:
        self.node = node
        self.expires_at = expires_at
        self._connected.set()
        self._state_changed.set()

    def _set_disconnected(self) -> None:
        self._connected.clear()
        self._state_changed.set()

    async def _run(self) -> None:
        attempt = 0
        refresh_failures = 0
        first = True
        try:
            while not self._closed:
                if self.transport == "sse" and not self._router.wanted():
                    # An SSE stream needs channels: none until a subscription arrives.
                    self._router.changed.clear()
                    await self._router.changed.wait()
                    continue
                if not first:
                    self.reconnects += 1
                first = False
                outcome = await self._connect_once()
                self._set_disconnected()
                if outcome.connected:
                    attempt = 0
                if outcome.action == REFRESH:
                    if not self.can_refresh:
                        raise outcome.error or TokenExpiredError(
                            "token_expired", "the token expired; pass token_provider= to renew it"
                        )
                    refresh_failures = 0 if outcome.connected else refresh_failures + 1
                    if refresh_failures >= 2:
                        raise outcome.error or TokenExpiredError(
                            "token_expired", "the token provider keeps returning expired tokens"
                        )
                    logger.info("token expired; reconnecting with a fresh token")
                    continue
                refresh_failures = 0
                if outcome.action == TERMINAL:
                    raise outcome.error or ServerError("refused", "connection refused for good")
                if outcome.action == RESTART:
                    continue
                if outcome.action == IMMEDIATE and outcome.connected:
                    # A worker going away: another one takes us at once. (Refused at once
                    # by a draining worker: back off like any failure.)
                    delay = random.uniform(0, _SHUTDOWN_JITTER)
                else:
                    if (
                        self.max_reconnect_attempts is not None
                        and attempt >= self.max_reconnect_attempts
                    ):
                        raise TransportError(
                            f"gave up after {attempt} reconnect attempts ({outcome.reason})"
                        )
                    delay = self.backoff.delay(attempt)
                    attempt += 1
                logger.info("connection ended (%s); reconnecting in %.2fs", outcome.reason, delay)
                await asyncio.sleep(delay)
        except HeraldError as error:
            logger.warning("herald client stopped: %s", error)
            self._failure = error
            self._router.fail(error)
            self._state_changed.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: surface it to every subscription, not silently
            logger.exception("herald client failed")
            failure = HeraldError(f"client failed: {type(exc).__name__}: {exc}")
            self._failure = failure
            self._router.fail(failure)
            self._state_changed.set()

    async def _connect_once(self) -> Outcome:
        """One connection from open to close."""
        from ._sse import run_sse_connection
        from ._ws import run_ws_connection

        try:
            if self._http is not None:  # SSE
                return await run_sse_connection(self, self._http)
            return await run_ws_connection(self)
        except AuthenticationError as exc:  # from the token provider
            return Outcome(TERMINAL, error=exc, reason=exc.code)
        except ServerError:
            raise
        except (HeraldError, OSError, TimeoutError, httpx.HTTPError) as exc:
            return Outcome(BACKOFF, reason=f"{type(exc).__name__}: {exc}")

    def _token_deadline(self) -> float | None:
        """When to refresh the current token (Unix time), if it expires."""
        if self.expires_at is None:
            return None
        remaining = self.expires_at - time.time()
        return self.expires_at - min(self.refresh_margin, max(remaining / 3, 1.0))
