"""Presence: who is subscribed to a channel, across every worker.

Each worker tracks its own subscribers of presence-enabled channels (namespace option
``presence``) and writes them to the broker with a TTL, refreshed every third of it;
the entries of a worker that died (``kill -9``) expire by themselves within
``HERALD_PRESENCE_TTL`` seconds. With the namespace option ``join_leave``, joins and
leaves are also published on the channel as ``presence.join`` / ``presence.leave``
messages (ordinary messages: ordered, in history, recoverable).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from .broker import Broker, BrokerUnavailable
from .connection import Connection
from .settings import Settings

logger = logging.getLogger("herald.presence")

Publish = Callable[[str, str, Any], Awaitable[object]]


class PresenceTracker:
    def __init__(self, settings: Settings, broker: Broker, node_id: str, publish: Publish) -> None:
        self._settings = settings
        self._broker = broker
        self._node_id = node_id
        self._publish = publish
        # channel -> client id -> user id, for this worker's connections only
        self._local: dict[str, dict[str, str]] = {}
        self._pending: set[asyncio.Future[None]] = set()
        self._chains: dict[tuple[str, str], asyncio.Future[None]] = {}

    def client_id(self, conn: Connection) -> str:
        return f"{self._node_id}-{conn.id}"

    def _spawn(self, coro: Coroutine[Any, Any, None], key: tuple[str, str] | None = None) -> None:
        """Run ``coro`` in the background; writes with the same ``key`` (channel, client)
        run one after the other, so a leave never overtakes its join in Redis or on the
        channel (which would leave a ghost entry for a whole TTL)."""
        previous = self._chains.get(key) if key is not None else None

        async def after_previous() -> None:
            try:
                if previous is not None:
                    await asyncio.wait({previous})  # never raises, even if it was cancelled
            except BaseException:  # cancelled while waiting: the write never starts
                coro.close()
                raise
            await coro

        task = asyncio.ensure_future(after_previous() if previous is not None else coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        if key is not None:
            self._chains[key] = task

            def forget(done: asyncio.Future[None]) -> None:
                if self._chains.get(key) is done:
                    del self._chains[key]

            task.add_done_callback(forget)

    def joined(self, conn: Connection, channel: str) -> None:
        options = self._settings.channel_options(channel)
        if not options.presence:
            return
        client, user = self.client_id(conn), conn.principal.subject
        self._local.setdefault(channel, {})[client] = user
        self._spawn(self._write_join(channel, client, user, options.join_leave), (channel, client))

    def left(self, conn: Connection, channel: str) -> None:
        entries = self._local.get(channel)
        client = self.client_id(conn)
        if entries is None or client not in entries:
            return
        user = entries.pop(client)
        if not entries:
            del self._local[channel]
        join_leave = self._settings.channel_options(channel).join_leave
        self._spawn(self._write_leave(channel, client, user, join_leave), (channel, client))

    async def _write_join(self, channel: str, client: str, user: str, announce: bool) -> None:
        try:
            await self._broker.presence_update(
                {channel: {client: user}}, self._settings.presence_ttl
            )
            if announce:
                await self._publish(channel, "presence.join", {"user": user, "client": client})
        except BrokerUnavailable:
            logger.info(
                "presence join of %s on %s not written: broker unavailable", client, channel
            )
        except Exception:
            logger.exception("presence join failed")

    async def _write_leave(self, channel: str, client: str, user: str, announce: bool) -> None:
        try:
            await self._broker.presence_remove(channel, [client])
            if announce:
                await self._publish(channel, "presence.leave", {"user": user, "client": client})
        except BrokerUnavailable:
            logger.info(
                "presence leave of %s on %s not written: broker unavailable", client, channel
            )
        except Exception:
            logger.exception("presence leave failed")

    async def run(self) -> None:
        """Refresh this worker's entries every third of the TTL, for ever."""
        interval = max(0.2, self._settings.presence_ttl / 3)
        while True:
            await asyncio.sleep(interval)
            if not self._local:
                continue
            snapshot = {channel: dict(entries) for channel, entries in self._local.items()}
            try:
                await self._broker.presence_update(snapshot, self._settings.presence_ttl)
                self._remove_left_since(snapshot)
            except BrokerUnavailable:
                logger.info("presence refresh skipped: broker unavailable")
            except Exception:
                logger.exception("presence refresh failed")

    def _remove_left_since(self, snapshot: dict[str, dict[str, str]]) -> None:
        """A client that left while the refresh was in flight may have been written back
        after its leave was: remove it again (in its own write order)."""
        for channel, entries in snapshot.items():
            current = self._local.get(channel, {})
            for client in entries:
                if client not in current:
                    self._spawn(self._remove(channel, client), (channel, client))

    async def _remove(self, channel: str, client: str) -> None:
        try:
            await self._broker.presence_remove(channel, [client])
        except Exception:
            logger.info("presence removal of %s on %s failed", client, channel)

    async def snapshot(self, channel: str) -> dict[str, Any]:
        """Presence of ``channel`` on every worker: users with their connection counts."""
        clients = await self._broker.presence(channel)
        users: dict[str, int] = {}
        for user in clients.values():
            users[user] = users.get(user, 0) + 1
        return {"channel": channel, "connections": len(clients), "users": users}

    async def aclose(self) -> None:
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
