"""The transactional outbox: the API's hub side effects, written with the change itself.

A change to a user and the events that announce it (and the revocation that goes with
suspending or deleting them) are written in one database transaction: a change that
rolls back leaves no event, and a change that commits always has its events. A relay in
each worker then carries them into the hub and deletes them. If the broker is down, the
entries wait and are retried until it is back: delivery is *at least once* and, for the
entries of one worker, in order. (Publishing after the commit, as the API first did,
lost the event whenever the broker failed in between.)

Ownership: an entry belongs to the worker that wrote it, which relays it right after its
commit (the request waits for that, briefly, so a client that saw its response also
finds the event). A worker that died leaves its entries behind: any other worker takes
over an entry that nobody attempted for ``takeover_after`` seconds. Entries written
without a hub (``herald users create-admin``) have no owner and go to the first relay.

Failures: a broker that is unavailable is retried with backoff, forever. An entry the
hub refuses for good (a permanent error, which is a bug: the API builds every event) or
that keeps failing unexpectedly is dropped after ``MAX_UNEXPECTED_FAILURES`` attempts and
logged, so it cannot block the entries behind it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy import CursorResult, delete, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from hub.errors import HubError
from hub.hub import Hub

from .db import Database, utcnow
from .events import Event
from .models import OutboxEntry

logger = logging.getLogger("herald.api.outbox")

KIND_PUBLISH = "publish"
KIND_REVOKE = "revoke"

# An entry failing with anything but a temporary hub error is dropped after this many.
MAX_UNEXPECTED_FAILURES = 5
MAX_BACKOFF = 5.0
STATS_INTERVAL = 1.0  # seconds between two counts of the whole outbox

# Told after a pass (at most every STATS_INTERVAL): entries waiting in the whole outbox
# (every worker's) and the age in seconds of the oldest.
OutboxObserver = Callable[[int, float], None]


class EventSink(Protocol):
    """Where the relay carries entries. Raises on failure (``HubError`` with
    ``temporary`` for an unavailable broker)."""

    async def publish(self, events: Sequence[Event]) -> None:
        """Publish ``events`` in order, in one round trip."""

    async def revoke_user(self, user_id: str, not_before: float) -> None:
        """Close ``user_id``'s connections on every worker and refuse their tokens
        issued before ``not_before``."""


class HubSink:
    """:class:`EventSink` over this worker's :class:`hub.hub.Hub` (and so its broker)."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    async def publish(self, events: Sequence[Event]) -> None:
        await self._hub.publish_many([(e.channel, e.event, e.data) for e in events])

    async def revoke_user(self, user_id: str, not_before: float) -> None:
        await self._hub.disconnect_user(user_id, revoke=True, not_before=not_before)


class Outbox:
    """The API's :class:`~api.events.Publisher`: stages entries in the caller's session
    (they commit or roll back with it) and, after the commit, asks the relay to deliver.

    Without a relay (the CLI) entries are only staged, with no owner: a running server
    delivers them.
    """

    def __init__(self, relay: OutboxRelay | None = None) -> None:
        self._relay = relay
        self._owner = relay.owner if relay is not None else None

    def stage(self, session: AsyncSession, events: Sequence[Event]) -> None:
        session.add_all(
            OutboxEntry(
                kind=KIND_PUBLISH,
                payload={"channel": e.channel, "event": e.event, "data": e.data},
                owner=self._owner,
            )
            for e in events
        )

    def stage_revocation(self, session: AsyncSession, user_id: str) -> None:
        session.add(
            OutboxEntry(
                kind=KIND_REVOKE,
                payload={"user_id": user_id, "not_before": time.time()},
                owner=self._owner,
            )
        )

    async def flush(self) -> None:
        if self._relay is not None:
            await self._relay.deliver_now()


class OutboxRelay:
    """Carries this worker's outbox entries (and orphans) into the hub, in id order."""

    def __init__(
        self,
        db: Database,
        sink: EventSink,
        owner: str,
        *,
        poll_interval: float = 1.0,
        takeover_after: float = 30.0,
        flush_timeout: float = 5.0,
        batch_size: int = 100,
        observe: OutboxObserver | None = None,
    ) -> None:
        self.owner = owner
        self._db = db
        self._sink = sink
        self._poll_interval = poll_interval
        self._takeover_after = timedelta(seconds=takeover_after)
        self._flush_timeout = flush_timeout
        self._batch_size = batch_size
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._requested = 0  # deliver_now calls so far
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._failures = 0  # consecutive failed passes, for the backoff
        self._unexpected: dict[int, int] = {}  # entry id -> unexpected failures
        self._observe = observe
        self._observed_at = -STATS_INTERVAL

    # -- the request side -------------------------------------------------------------

    async def deliver_now(self) -> None:
        """Wake the relay and wait (at most ``flush_timeout``) for a pass that started
        after this call: it sees everything committed before. Never raises; what it
        could not deliver is retried in the background."""
        self._requested += 1
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((self._requested, waiter))
        self._wake.set()
        try:
            async with asyncio.timeout(self._flush_timeout):
                await asyncio.shield(waiter)
        except TimeoutError:
            logger.warning("event delivery is slow; it continues in the background")

    # -- the relay loop ---------------------------------------------------------------

    async def run(self) -> None:
        """Relay until cancelled: at once when woken, else every ``poll_interval``
        (which also finds orphaned entries), backing off while delivery fails."""
        while True:
            delay = (
                self._poll_interval
                if self._failures == 0
                else min(MAX_BACKOFF, self._poll_interval * 2 ** (self._failures - 1))
            )
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            covered = self._requested
            more = False
            try:
                more = await self.relay_once()
            except Exception:  # a bug must not end delivery for good: log, back off, go on
                logger.exception("event outbox relay pass failed")
                self._failures += 1
            finally:
                self._release_waiters(covered)
            if more:
                self._wake.set()  # a full batch: go on without waiting

    def _release_waiters(self, covered: int) -> None:
        still: list[tuple[int, asyncio.Future[None]]] = []
        for target, waiter in self._waiters:
            if target <= covered:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                still.append((target, waiter))
        self._waiters = still

    async def relay_once(self) -> bool:
        """One pass: claim orphans, deliver this worker's oldest entries, delete what
        was delivered. True if a full batch went out (there may be more)."""
        try:
            return await self._pass()
        finally:
            await self._report()

    async def _report(self) -> None:
        """Count the whole outbox for the metrics, at most every ``STATS_INTERVAL``."""
        now = time.monotonic()
        if self._observe is None or now - self._observed_at < STATS_INTERVAL:
            return
        self._observed_at = now
        try:
            async with self._db.session() as session:
                count, oldest = (
                    await session.execute(
                        select(func.count(OutboxEntry.id), func.min(OutboxEntry.created_at))
                    )
                ).one()
        except SQLAlchemyError:
            return  # the pass logged the database's trouble already
        age = 0.0 if oldest is None else max(0.0, (utcnow() - oldest).total_seconds())
        self._observe(int(count), age)

    async def _pass(self) -> bool:
        async with self._lock:
            try:
                entries = await self._claim_and_load()
            except SQLAlchemyError:
                logger.exception("could not read the event outbox; retrying")
                self._failures += 1
                return False
            if not entries:
                self._failures = 0
                return False
            delivered, failed = await self._deliver(entries)
            try:
                await self._settle(delivered, failed)
            except SQLAlchemyError:
                # Delivered entries stay and go out again: at least once, never lost.
                logger.exception("could not update the event outbox; retrying")
                self._failures += 1
                return False
            self._failures = self._failures + 1 if failed else 0
            return not failed and len(entries) == self._batch_size

    async def _claim_and_load(self) -> list[OutboxEntry]:
        now = utcnow()
        cutoff = now - self._takeover_after
        last_touched = func.coalesce(OutboxEntry.attempted_at, OutboxEntry.created_at)
        orphaned = or_(
            OutboxEntry.owner.is_(None),
            (OutboxEntry.owner != self.owner) & (last_touched < cutoff),
        )
        async with self._db.session() as session:
            candidates = (
                await session.scalars(
                    select(OutboxEntry.id)
                    .where(orphaned)
                    .order_by(OutboxEntry.id)
                    .limit(self._batch_size)
                )
            ).all()
            if candidates:
                # The condition is checked again as each row is updated: of two workers
                # claiming the same orphan, one wins.
                claimed: CursorResult[Any] = await session.execute(  # type: ignore[assignment]
                    update(OutboxEntry)
                    .where(OutboxEntry.id.in_(candidates), orphaned)
                    .values(owner=self.owner, attempted_at=now)
                    .execution_options(synchronize_session=False)
                )
                await session.commit()
                logger.info("took over %d orphaned event(s)", claimed.rowcount)
            rows = await session.scalars(
                select(OutboxEntry)
                .where(OutboxEntry.owner == self.owner)
                .order_by(OutboxEntry.id)
                .limit(self._batch_size)
            )
            return list(rows)

    async def _deliver(self, entries: list[OutboxEntry]) -> tuple[list[int], bool]:
        """Deliver ``entries`` in order, consecutive publications in one round trip.
        Returns the ids done with (delivered or dropped) and whether it stopped early
        (the rest waits for a retry)."""
        done: list[int] = []
        todo = deque(_groups(entries))
        while todo:
            group = todo.popleft()
            outcome, reason = await self._try(group)
            if outcome is _Outcome.RETRY:
                return done, True
            if outcome is _Outcome.REFUSED:
                if len(group) > 1:  # one of them is refused: go on one at a time, in order
                    todo.extendleft([entry] for entry in reversed(group))
                    continue
                self._drop(group[0], reason)
            done.extend(entry.id for entry in group)
        return done, False

    async def _try(self, group: list[OutboxEntry]) -> tuple[_Outcome, str]:
        try:
            await self._send(group)
        except HubError as exc:
            if exc.temporary:
                logger.warning("event delivery failed, will retry: %s", exc.message)
                return _Outcome.RETRY, exc.message
            return _Outcome.REFUSED, exc.message
        except Exception:
            if len(group) > 1:  # isolate the culprit: the caller retries one at a time
                logger.warning("event delivery failed unexpectedly; retrying one by one")
                return _Outcome.REFUSED, "unexpected error"
            key = group[0].id
            count = self._unexpected[key] = self._unexpected.get(key, 0) + 1
            logger.exception("event delivery failed unexpectedly (attempt %d)", count)
            if count < MAX_UNEXPECTED_FAILURES:
                return _Outcome.RETRY, "unexpected error"
            del self._unexpected[key]
            return _Outcome.REFUSED, f"failed unexpectedly {count} times"
        self._unexpected.pop(group[0].id, None)
        return _Outcome.DELIVERED, ""

    async def _send(self, group: list[OutboxEntry]) -> None:
        first = group[0]
        if first.kind == KIND_REVOKE:
            payload = first.payload
            await self._sink.revoke_user(str(payload["user_id"]), float(payload["not_before"]))
            return
        await self._sink.publish(
            [Event(e.payload["channel"], e.payload["event"], e.payload["data"]) for e in group]
        )

    def _drop(self, entry: OutboxEntry, why: str) -> None:
        logger.error(
            "dropped outbox entry %d (%s %s): %s",
            entry.id,
            entry.kind,
            entry.payload.get("event", ""),
            why,
        )

    async def _settle(self, done: list[int], failed: bool) -> None:
        async with self._db.session() as session:
            if done:
                await session.execute(
                    delete(OutboxEntry)
                    .where(OutboxEntry.id.in_(done))
                    .execution_options(synchronize_session=False)
                )
            if failed:
                # Attempted now: keeps them ours while this worker lives.
                await session.execute(
                    update(OutboxEntry)
                    .where(OutboxEntry.owner == self.owner)
                    .values(attempted_at=utcnow(), attempts=OutboxEntry.attempts + 1)
                    .execution_options(synchronize_session=False)
                )
            await session.commit()


class _Outcome(enum.Enum):
    DELIVERED = enum.auto()
    RETRY = enum.auto()
    REFUSED = enum.auto()


def _groups(entries: list[OutboxEntry]) -> list[list[OutboxEntry]]:
    """Runs of consecutive publications (one round trip each); a revocation alone."""
    groups: list[list[OutboxEntry]] = []
    for entry in entries:
        if entry.kind == KIND_PUBLISH and groups and groups[-1][0].kind == KIND_PUBLISH:
            groups[-1].append(entry)
        else:
            groups.append([entry])
    return groups
