"""The per-user connection limit, across every worker.

Each open user connection holds a *slot* in the broker (``<node>-<connection id>``),
claimed atomically against ``HERALD_MAX_CONNECTIONS_PER_USER`` before the connection is
registered. Slots are refreshed every third of ``HERALD_CONNECTION_SLOT_TTL`` and freed
when their connection ends; the slots of a worker that died expire by themselves. A
worker's own count is checked first, so a user over the limit on one worker costs no
broker round trip.

The claims made in one event-loop iteration (a connection storm) go to the broker in
one round trip. Releases are batched by a background loop, which also refreshes. A
claim first sends its user's queued releases, so a client that closes and reconnects
at once is not refused by its own old connection. Every release and refresh holds one
lock: a refresh in flight can never write back a slot whose release was sent after it.
Service connections (API keys) are not limited. Cost: one broker round trip per user
connection (docs/performance.md, "Connection limit across workers").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from . import errors
from .broker import Broker, BrokerUnavailable
from .connection import Connection
from .settings import Settings

logger = logging.getLogger("herald.slots")


class ConnectionSlots:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        node_id: str,
        connections: Callable[[], Iterable[Connection]],
    ) -> None:
        self._limit = settings.max_connections_per_user
        self._ttl = settings.connection_slot_ttl
        self._broker = broker
        self._node_id = node_id
        self._connections = connections
        self._releases: dict[str, list[str]] = {}
        self._wake = asyncio.Event()
        self._writing = asyncio.Lock()
        self._claims: list[tuple[str, str, asyncio.Future[bool]]] = []
        self._claim_tasks: set[asyncio.Task[None]] = set()

    def slot(self, conn: Connection) -> str:
        return f"{self._node_id}-{conn.id}"

    async def claim(self, user_id: str, conn: Connection) -> None:
        """Hold a slot for ``conn`` or raise :class:`~hub.errors.Refused`
        (``connection_limit``, or ``unavailable`` if the broker cannot be asked)."""
        held = asyncio.get_running_loop().create_future()
        if not self._claims:
            task = asyncio.ensure_future(self._send_claims())
            self._claim_tasks.add(task)
            task.add_done_callback(self._claim_tasks.discard)
        self._claims.append((user_id, self.slot(conn), held))
        try:
            granted = await held
        except BrokerUnavailable:
            raise errors.Refused(errors.BROKER_UNAVAILABLE) from None
        if not granted:
            raise errors.Refused(errors.CONNECTION_LIMIT)

    async def _send_claims(self) -> None:
        """Runs once the current loop iteration has queued its claims: sends them (after
        their users' queued releases) in one round trip."""
        await asyncio.sleep(0)
        claims, self._claims = self._claims, []
        try:
            users = {user_id for user_id, _, _ in claims}
            released = {u: ids for u in users if (ids := self._releases.pop(u, None))}
            if released:
                async with self._writing:
                    await self._broker.release_connection_slots(released)
            results = await self._broker.claim_connection_slots(
                [(user_id, slot) for user_id, slot, _ in claims], self._limit, self._ttl
            )
        except Exception as exc:
            if not isinstance(exc, BrokerUnavailable):
                logger.exception("claiming connection slots failed")
                exc = BrokerUnavailable(str(exc))
            for _, _, waiter in claims:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for (user_id, slot, waiter), granted in zip(claims, results, strict=True):
            if not waiter.done():
                waiter.set_result(granted)
            elif granted:  # its connection gave up meanwhile: free the slot again
                self._queue_release(user_id, slot)

    def release(self, user_id: str, conn: Connection) -> None:
        """Free ``conn``'s slot (soon, in a batch with the others)."""
        self._queue_release(user_id, self.slot(conn))

    def _queue_release(self, user_id: str, slot: str) -> None:
        self._releases.setdefault(user_id, []).append(slot)
        self._wake.set()

    async def run(self) -> None:
        """Send queued releases as they come and refresh the held slots every third of
        the TTL, for ever (cancelled with the hub)."""
        interval = max(0.2, self._ttl / 3)
        next_refresh = time.monotonic() + interval
        while True:
            try:
                async with asyncio.timeout(max(0.0, next_refresh - time.monotonic())):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            await self._send_releases()
            if time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + interval
                await self._refresh()

    async def _send_releases(self) -> None:
        if not self._releases:
            return
        try:
            async with self._writing:
                releases, self._releases = self._releases, {}
                if releases:
                    await self._broker.release_connection_slots(releases)
        except BrokerUnavailable:
            logger.info("connection slots not released: broker unavailable (they expire)")
        except Exception:
            logger.exception("releasing connection slots failed")

    async def _refresh(self) -> None:
        try:
            async with self._writing:
                held: dict[str, list[str]] = {}
                for conn in self._connections():
                    principal = conn.principal
                    if principal.kind == "user" and conn.closed is None:
                        held.setdefault(principal.subject, []).append(self.slot(conn))
                if held:
                    await self._broker.refresh_connection_slots(held, self._ttl)
        except BrokerUnavailable:
            logger.info("connection slots not refreshed: broker unavailable")
        except Exception:
            logger.exception("refreshing connection slots failed")
