"""Hub: the facade the transports, the publish API and the users API talk to.

It owns this worker's :class:`Registry`, reference-counts broker subscriptions per
channel, fans broker publications out to local connections, executes control
commands (disconnect a user on every worker) and drains on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import errors
from .auth import Authenticator, Principal
from .broker import Broker, BrokerUnavailable, PublishRequest
from .connection import Connection, TransportKind
from .connection_slots import ConnectionSlots
from .errors import Disconnect, HubError
from .flusher import Flusher
from .metrics import Metrics
from .policy import ChannelPolicy, check_publish, check_subscribe
from .presence import PresenceTracker
from .protocol import (
    Publication,
    StreamPosition,
    encode_bye,
    encode_data,
    validate_event_name,
)
from .registry import Registry
from .settings import Settings

logger = logging.getLogger("herald.hub")

CONTROL_DISCONNECT_USER = "disconnect_user"


@dataclass(slots=True)
class _ChannelSubscription:
    """Whether the broker is subscribed to a channel, reconciled under a per-channel lock."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    active: bool = False
    users: int = 0  # coroutines holding or waiting for the lock


@dataclass(frozen=True, slots=True)
class SubscribeResult:
    channel: str
    position: StreamPosition
    recovered: bool | None  # None when the client asked for no recovery


class Hub:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        authenticator: Authenticator,
        policy: ChannelPolicy,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.authenticator = authenticator
        self.policy = policy
        self.metrics = metrics
        self.registry = Registry()
        self.flusher = Flusher()
        self._channels: dict[str, _ChannelSubscription] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.accepting = True
        self.broker_connected = False
        # Identifies this worker in `connected` frames and X-Herald-Node headers.
        self.node_id = secrets.token_hex(4)
        self.presence = PresenceTracker(settings, broker, self.node_id, self.publish)
        self.slots = ConnectionSlots(
            settings, broker, self.node_id, lambda: self.registry.connections
        )

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start(self)
        self.broker_connected = True
        self._spawn(self.presence.run())
        self._spawn(self.slots.run())
        self._spawn(self._sweep())

    async def drain(self, grace: float | None = None) -> None:
        """Stop accepting, tell every client ``bye`` (reconnect) and wait for them to go."""
        self.accepting = False
        grace = self.settings.shutdown_grace if grace is None else grace
        conns = list(self.registry.connections)
        for conn in conns:
            self.close_connection(conn, errors.SHUTDOWN)
        deadline = time.monotonic() + grace
        # Connections leave the registry as their handlers finish; poll briefly.
        while self.registry.connections and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def aclose(self) -> None:
        await self.drain(0 if not self.registry.connections else None)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.presence.aclose()
        await self.broker.aclose()

    async def _sweep(self) -> None:
        """One pass over this worker's connections every few seconds, instead of a timer
        per connection: queue the transport's heartbeat (``{"op":"ping"}`` on WebSockets,
        a comment on raw SSE streams) on connections idle for a heartbeat interval, and
        cut writers stuck in one send for longer than ``send_timeout``
        (only possible on the portable ASGI write path)."""
        settings = self.settings
        heartbeat = settings.heartbeat_interval
        interval = max(0.05, min(heartbeat, settings.send_timeout) / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self.registry.connections):
                if conn.closed is not None:
                    continue
                if conn.send_started and now - conn.send_started > settings.send_timeout:
                    self.close_connection(conn, errors.SLOW_CONSUMER)
                    self.metrics.slow_consumers.inc()
                    if conn.writer_task is not None:
                        conn.writer_task.cancel()
                elif (
                    conn.heartbeat is not None
                    and now - conn.last_write >= heartbeat
                    and not conn.outbox_size
                ):
                    conn.enqueue_control(conn.heartbeat)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- BrokerHandler ------------------------------------------------------------------------

    def on_publication(self, publication: Publication) -> None:
        self.registry.fanout(publication)

    def on_control(self, command: dict[str, Any]) -> None:
        if command.get("type") == CONTROL_DISCONNECT_USER:
            user = command.get("user")
            reason = command.get("reason", errors.USER_DISABLED.reason)
            disconnect = errors.DISCONNECTS_BY_REASON.get(str(reason), errors.USER_DISABLED)
            if isinstance(user, str):
                for conn in self.registry.user_connections(user):
                    self.close_connection(conn, disconnect)
        else:
            logger.warning("unknown control command %r", command.get("type"))

    def on_broker_state(self, connected: bool) -> None:
        self.broker_connected = connected
        if connected:
            self.metrics.broker_reconnects.inc()
            logger.info("broker connection restored; recovering missed messages")
            # Hold every channel's live publications from now on, before the reader
            # delivers any: the channels are resynced one after the other, and a live
            # message fanned out meanwhile would move a channel's position past its gap.
            registry = self.registry
            channels = [ch for ch in registry.channels() if registry.position(ch) is not None]
            for channel in channels:
                registry.begin_sync(channel)
            self._spawn(self._resync_channels(channels))
        else:
            logger.warning("broker connection lost; reconnecting")

    async def _resync_channels(self, channels: list[str]) -> None:
        for channel in channels:
            await self._resync(channel)

    async def _resync(self, channel: str) -> None:
        """After a broker outage, deliver what was published meanwhile from history; if
        history cannot fill the gap, make the channel's subscribers resubscribe (they
        then learn ``recovered: false``, or resume from history once it answers again)
        rather than let them miss messages silently."""
        since = self.registry.position(channel)
        if since is None:  # nobody left on this channel
            self.registry.end_sync(channel, [])
            return
        self.registry.begin_sync(channel)
        try:
            history = await self.broker.history(channel, since=since)
        except Exception as exc:
            self.registry.end_sync(channel, [])
            if not isinstance(exc, BrokerUnavailable):
                logger.exception("resync of %s failed", channel)
            for conn in self.registry.subscribers(channel):
                self.close_connection(conn, errors.INSUFFICIENT_STATE)
            return
        if history.recovered:
            count = self.registry.end_sync(channel, history.publications)
            if count:
                logger.info("recovered %d missed messages on %s", count, channel)
            return
        self.registry.end_sync(channel, [])
        top = history.position
        if top.epoch == since.epoch and top.offset < since.offset:
            # Redis lost writes this worker saw: new epoch, so no position in the lost
            # range is ever mistaken for the offsets that will be reused.
            try:
                await self.broker.reset_epoch_if_behind(channel, since)
            except Exception:
                logger.exception("could not give %s a new epoch after lost writes", channel)
        for conn in self.registry.subscribers(channel):
            self.close_connection(conn, errors.INSUFFICIENT_STATE)

    # -- connections --------------------------------------------------------------------------

    async def open_connection(self, principal: Principal, transport: TransportKind) -> Connection:
        """Register a new authenticated connection or raise :class:`~hub.errors.Refused`.

        A user's connections are limited across every worker (``connection_limit``):
        this worker's count first (no round trip), then a slot claimed in the broker."""
        if not self.accepting:
            raise errors.Refused(errors.SHUTDOWN)
        user = principal.subject if principal.kind == "user" else None
        if (
            user is not None
            and self.registry.user_connection_count(user) >= self.settings.max_connections_per_user
        ):
            raise errors.Refused(errors.CONNECTION_LIMIT)
        conn = Connection(
            principal,
            transport,
            max_messages=self.settings.outbox_max_messages,
            max_bytes=self.settings.outbox_max_bytes,
            on_overflow=self._on_overflow,
        )
        if user is not None:
            await self.slots.claim(user, conn)
            if not self.accepting:  # the drain began while the broker answered
                self.slots.release(user, conn)
                raise errors.Refused(errors.SHUTDOWN)
        conn.schedule_expiry(principal.expires_at, time.time())
        self.registry.add(conn)
        self.metrics.connections.labels(transport).inc()
        return conn

    def _on_overflow(self, conn: Connection, dropped: int) -> None:
        self.metrics.slow_consumers.inc()
        self.metrics.outbox_drops.inc(dropped)
        logger.info("connection %s closed: slow consumer", conn.id)

    def close_connection(self, conn: Connection, disconnect: Disconnect) -> None:
        """Ask ``conn``'s writer to say goodbye and stop (non-blocking)."""
        conn.close(disconnect)

    def release_connection(self, conn: Connection) -> None:
        """Forget a finished connection (called by its transport, exactly once)."""
        if conn not in self.registry.connections:
            return
        conn.cancel_expiry()
        if conn.principal.kind == "user":
            self.slots.release(conn.principal.subject, conn)
        if conn.closed is not None:  # counted once, whoever closed it
            self.metrics.disconnects.labels(conn.closed.reason).inc()
        subs = len(conn.channels)
        for channel in conn.channels:
            self.presence.left(conn, channel)
        emptied = self.registry.remove(conn)
        self.metrics.connections.labels(conn.transport).dec()
        self.metrics.subscriptions.dec(subs)
        for channel in emptied:
            self._spawn(self._reconcile(channel))

    async def refresh(self, conn: Connection, token: str) -> Principal:
        principal = await self.authenticator.authenticate_token(token)
        if principal.subject != conn.principal.subject:
            raise HubError(errors.FORBIDDEN, "refresh token is for a different subject")
        conn.principal = principal
        conn.schedule_expiry(principal.expires_at, time.time())
        return principal

    # -- subscriptions ------------------------------------------------------------------------

    async def _reconcile(self, channel: str) -> None:
        """Make the broker subscription of ``channel`` match whether anyone local wants it.

        Runs under the channel's lock so SUBSCRIBE/UNSUBSCRIBE for one channel are never
        reordered. Raises :class:`BrokerUnavailable` if a needed subscribe failed.
        """
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _ChannelSubscription()
        state.users += 1
        try:
            async with state.lock:
                wanted = self.registry.has_subscribers(channel)
                if wanted and not state.active:
                    # Active even if this raises: the broker remembers the channel and
                    # subscribes it on reconnect, so a later unsubscribe must reach it.
                    state.active = True
                    await self.broker.subscribe([channel])
                elif not wanted and state.active:
                    state.active = False
                    with contextlib.suppress(BrokerUnavailable):
                        await self.broker.unsubscribe([channel])
        finally:
            state.users -= 1
            if state.users == 0 and not state.active:
                self._channels.pop(channel, None)

    async def subscribe(
        self,
        conn: Connection,
        channel: object,
        since: StreamPosition | None = None,
        reply: Callable[[SubscribeResult], bytes | None] | None = None,
    ) -> SubscribeResult:
        """Subscribe ``conn`` with no gap: live first (buffered), then history, then live.

        ``result.position`` is the channel's top when the subscription became active.
        Without ``since`` only messages after it are delivered. With ``since``, missed
        messages are replayed when history still holds them (``recovered`` true) and the
        client is told when it does not (``recovered`` false: refetch your state). The
        frame ``reply`` builds is queued before any replayed message.
        """
        name = check_subscribe(self.policy, conn.principal, channel)
        if name in conn.channels:
            raise HubError(errors.ALREADY_SUBSCRIBED, f"already subscribed to {name!r}")
        if len(conn.channels) >= self.settings.max_channels_per_connection:
            raise HubError(
                errors.TOO_MANY_CHANNELS,
                f"at most {self.settings.max_channels_per_connection} channels per connection",
            )
        conn.begin_recovery(name)
        self.registry.subscribe(conn, name)
        self.metrics.subscriptions.inc()
        try:
            await self._reconcile(name)
            replay: list[Publication] = []
            recovered: bool | None = None
            if since is None:
                top = await self.broker.position(name)
                after = top
            else:
                history = await self.broker.history(name, since=since)
                top = history.position
                recovered = history.recovered
                if history.recovered:
                    replay, after = history.publications, since
                else:
                    after = top
        except BrokerUnavailable:
            conn.abort_recovery(name)
            self._drop_subscription(conn, name)
            raise HubError(
                errors.UNAVAILABLE, "message broker unavailable, retry shortly", temporary=True
            ) from None
        except BaseException:
            conn.abort_recovery(name)
            self._drop_subscription(conn, name)
            raise
        self.registry.note_position(name, top)
        result = SubscribeResult(name, top, recovered)
        head = reply(result) if reply is not None else None
        conn.finish_recovery(name, replay, after, head)
        # Where the client stands now, not where it will stand once the queued replay is
        # written: the writer advances it per message (an SSE cursor sent before the replay
        # reaches the client must not skip it).
        conn.positions[name] = after
        self.presence.joined(conn, name)
        return result

    def _drop_subscription(self, conn: Connection, channel: str) -> None:
        if channel in conn.channels:
            self.presence.left(conn, channel)
            self.metrics.subscriptions.dec()
            if self.registry.unsubscribe(conn, channel):
                self._spawn(self._reconcile(channel))

    async def unsubscribe(self, conn: Connection, channel: object) -> str:
        if not isinstance(channel, str) or channel not in conn.channels:
            raise HubError(errors.NOT_SUBSCRIBED, f"not subscribed to {channel!r}")
        conn.positions.pop(channel, None)
        self._drop_subscription(conn, channel)
        return channel

    # -- publishing ---------------------------------------------------------------------------

    def _check_size(self, data: bytes) -> None:
        if len(data) > self.settings.max_message_bytes:
            raise HubError(
                errors.MESSAGE_TOO_LARGE,
                f"data is {len(data)} bytes, the limit is {self.settings.max_message_bytes}",
            )

    async def publish_encoded(self, channel: str, event: str, data: bytes) -> Publication:
        """Publish already-encoded JSON ``data`` (no policy check: callers did it)."""
        self._check_size(data)
        try:
            pub = await self.broker.publish(channel, event, data)
        except BrokerUnavailable:
            raise HubError(
                errors.UNAVAILABLE, "message broker unavailable, retry shortly", temporary=True
            ) from None
        self.metrics.published.inc()
        return pub

    async def publish(self, channel: str, event: str, data: Any) -> Publication:
        """Publish a JSON-able payload on behalf of the server itself (e.g. the users API)."""
        from .policy import validate_channel

        return await self.publish_encoded(
            validate_channel(channel), validate_event_name(event), encode_data(data)
        )

    async def publish_many(self, items: Sequence[tuple[str, str, Any]]) -> list[Publication]:
        """Publish several messages in one broker round trip, in order."""
        from .policy import validate_channel

        requests = []
        for channel, event, data in items:
            encoded = encode_data(data)
            self._check_size(encoded)
            requests.append(
                PublishRequest(validate_channel(channel), validate_event_name(event), encoded)
            )
        return await self.publish_requests(requests)

    async def publish_requests(self, requests: Sequence[PublishRequest]) -> list[Publication]:
        for request in requests:
            self._check_size(request.data)
        try:
            pubs = await self.broker.publish_batch(requests)
        except BrokerUnavailable:
            raise HubError(
                errors.UNAVAILABLE, "message broker unavailable, retry shortly", temporary=True
            ) from None
        self.metrics.published.inc(len(pubs))
        return pubs

    async def publish_as(
        self, principal: Principal, channel: object, event: str, data: bytes
    ) -> Publication:
        """Publish for a client, after the channel policy allowed it."""
        name = check_publish(self.policy, principal, channel)
        return await self.publish_encoded(name, event, data)

    # -- cross-worker commands ----------------------------------------------------------------

    async def disconnect_user(
        self,
        user_id: str,
        *,
        revoke: bool = True,
        disconnect: Disconnect = errors.USER_DISABLED,
        not_before: float | None = None,
    ) -> None:
        """Close every connection of ``user_id`` on every worker; with ``revoke``, refuse
        every token issued to them before ``not_before`` (default: now) for
        ``max_token_ttl`` seconds. A revocation carried late (the API's outbox, after a
        broker outage) passes the time of the change, so tokens issued since stay valid."""
        try:
            if revoke:
                await self.broker.set_user_not_before(
                    user_id,
                    time.time() if not_before is None else not_before,
                    self.settings.max_token_ttl,
                )
            await self.broker.send_control(
                {"type": CONTROL_DISCONNECT_USER, "user": user_id, "reason": disconnect.reason}
            )
        except BrokerUnavailable:
            raise HubError(
                errors.UNAVAILABLE, "message broker unavailable, retry shortly", temporary=True
            ) from None

    def bye_frame(self, disconnect: Disconnect) -> bytes:
        return encode_bye(disconnect)
