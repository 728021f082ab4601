"""CPython garbage-collector tuning for a hub worker (issue 6; figures in
``docs/performance.md``, "Phase 2").

Why. A worker holds thousands of long-lived connections, and each one is a few hundred
GC-tracked objects (Connection, tasks, coroutine frames, uvicorn and websockets protocol
state, dicts, deques). CPython's collector is generational but not incremental: a full
(gen2) collection walks every tracked object that is not frozen. Measured at 5,000
WebSocket subscribers with the stock settings (700, 10, 10): full collections of
0.7-2.5 s every 1-3 s, 54-71 % of the worker's CPU. Nothing in those objects is
garbage; the collector just keeps proving it. So:

1. **Freeze after start-up.** Once the hub (and every extension) started, everything
   alive is process-long (modules, FastAPI/pydantic models, routes, the broker):
   ``gc.collect()`` then ``gc.freeze()`` moves it to the permanent generation, which
   no collection ever walks again.
2. **Refreeze as connections accumulate.** Connections opened later are just as
   long-lived. Every ``HERALD_GC_CHECK_INTERVAL`` seconds the worker counts its live
   connections opened since the last freeze; when there are at least
   ``HERALD_GC_FREEZE_AFTER`` of them it runs ``gc.collect()`` (which walks only the
   unfrozen objects: those connections and recent garbage) and freezes again. This
   bounds the unfrozen heap, hence every collection's pause, by about
   ``HERALD_GC_FREEZE_AFTER`` connections' worth of objects.
3. **Thaw now and then, if needed.** A frozen object that later dies in a reference
   cycle is never collected (reference counting still frees everything else). Under
   ``herald serve`` a closed connection leaves none: herald's protocol subclasses break
   the cycles uvicorn, httptools and websockets would leave (protocol <-> parser, the
   sans-I/O parser generator, scope -> raw writer -> protocol; ``python -m bench.cycles``
   counts them), and such connections say so (``Connection.leaves_cycles``). On the
   portable ASGI path a closed connection leaves ~70 objects, ~17 KB, in cycles. So when
   the frozen connections that have since closed *and left cycles* reach
   ``HERALD_GC_THAW_AFTER`` and half the live count, the worker runs
   ``gc.unfreeze(); gc.collect(); gc.freeze()``: one full collection of the whole heap
   (a long pause, ~0.1 ms per live connection), paid once per half-turnover of the
   connections instead of every few seconds, and the memory held by dead frozen cycles
   stays below ~half the live connections' own. The churn
   figures in ``docs/performance.md`` show both.
4. **Thresholds.** ``HERALD_GC_THRESHOLDS`` (generation 0, 1, 2; default
   :data:`TUNED_THRESHOLDS`): a larger generation-0 threshold means fewer young
   collections, so fewer short-lived objects (a batch in flight, a waiter) happen to be
   alive at a collection and get promoted towards generation 2.

``HERALD_GC=default`` leaves the collector exactly as CPython sets it (no freeze, no
thresholds); ``tuned`` (the default) applies all of the above. The settings are
process-wide, so :func:`tune` is reference-counted: in a process that runs several apps
(tests) the first one applies them and the last one to stop restores the previous
thresholds and unfreezes everything.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop, TimerHandle

    from .settings import Settings

logger = logging.getLogger("herald.gc")

# Chosen with the figures in docs/performance.md (Phase 2, "GC tuning").
TUNED_THRESHOLDS = (50_000, 20, 100)


class _HasId(Protocol):
    @property
    def id(self) -> int: ...


def _leaves_cycles(conn: object) -> bool:
    """Whether ``conn`` leaves reference cycles when it closes (True unless it says
    otherwise: herald's raw write paths break theirs, the portable path does not)."""
    return bool(getattr(conn, "leaves_cycles", True))


@dataclass
class GcStats:
    """What the policy did (for logs and tests)."""

    freezes: int = 0
    thaws: int = 0
    last_pause_ms: float = 0.0
    max_pause_ms: float = 0.0
    pauses_ms: list[float] = field(default_factory=list)


class FreezePolicy:
    """Refreeze when enough connections opened since the last freeze are alive; thaw
    when enough frozen ones have closed. ``connections`` returns the live connections;
    their ``id`` must grow with the order they were opened in."""

    def __init__(
        self,
        connections: Callable[[], Collection[_HasId]],
        *,
        freeze_after: int,
        thaw_after: int,
        check_interval: float,
    ) -> None:
        self._connections = connections
        self.freeze_after = freeze_after
        self.thaw_after = thaw_after
        self.check_interval = check_interval
        self.stats = GcStats()
        # Every connection with an id <= _mark was alive (hence frozen) at the last
        # freeze, or had closed before it; _frozen is how many were alive then.
        self._mark = 0
        self._frozen = 0
        self._frozen_leaky = 0  # of those, how many leave cycles when they close
        self._timer: TimerHandle | None = None
        self._loop: AbstractEventLoop | None = None

    # -- the three operations ------------------------------------------------------------

    def _timed(self, action: Callable[[], None]) -> float:
        started = time.perf_counter()
        action()
        ms = (time.perf_counter() - started) * 1000
        stats = self.stats
        stats.last_pause_ms = ms
        stats.max_pause_ms = max(stats.max_pause_ms, ms)
        stats.pauses_ms.append(round(ms, 1))
        del stats.pauses_ms[:-20]
        return ms

    def _note_frozen(self, conns: Collection[_HasId]) -> None:
        self._mark = max((c.id for c in conns), default=self._mark)
        self._frozen = len(conns)
        self._frozen_leaky = sum(1 for c in conns if _leaves_cycles(c))

    def freeze(self) -> float:
        """Collect what is unfrozen, then freeze everything alive; returns the pause (ms)."""

        def run() -> None:
            gc.collect()
            gc.freeze()

        ms = self._timed(run)
        self._note_frozen(self._connections())
        self.stats.freezes += 1
        return ms

    def thaw(self) -> float:
        """Unfreeze, collect the whole heap, freeze again; returns the pause (ms)."""

        def run() -> None:
            gc.unfreeze()
            gc.collect()
            gc.freeze()

        ms = self._timed(run)
        self._note_frozen(self._connections())
        self.stats.thaws += 1
        return ms

    def check(self) -> str | None:
        """One periodic check; returns ``"freeze"``, ``"thaw"`` or ``None``."""
        conns = self._connections()
        mark = self._mark
        old = old_leaky = 0
        for c in conns:
            if c.id <= mark:
                old += 1
                if _leaves_cycles(c):
                    old_leaky += 1
        new = len(conns) - old
        closed_frozen = self._frozen - old
        # Only closed connections that left cycles behind hold memory a thaw frees.
        closed_leaky = self._frozen_leaky - old_leaky
        # (No gc.get_freeze_count() here: it walks the whole permanent generation, ~0.1 us
        # per object with the GIL held: 70 ms at 5,000 connections.)
        if closed_leaky >= self.thaw_after and 2 * closed_leaky >= len(conns):
            ms = self.thaw()
            logger.info(
                "gc: thawed after %d frozen connections closed (%d live): %.0f ms",
                closed_frozen, len(conns), ms,
            )  # fmt: skip
            return "thaw"
        if new >= self.freeze_after:
            ms = self.freeze()
            logger.info("gc: froze %d new connections (%d live): %.0f ms", new, len(conns), ms)
            return "freeze"
        return None

    # -- scheduling (a timer, not a task) -----------------------------------------------

    def start(self, loop: AbstractEventLoop) -> None:
        self._loop = loop
        self._schedule()

    def _schedule(self) -> None:
        if self._loop is not None and self.check_interval > 0:
            self._timer = self._loop.call_later(self.check_interval, self._tick)

    def _tick(self) -> None:
        try:
            self.check()
        except Exception:  # pragma: no cover - never let GC housekeeping kill the loop
            logger.exception("gc: periodic check failed")
        self._schedule()

    def stop(self) -> None:
        self._loop = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# Process-wide state: how many tune() blocks are active, and what to restore.
_active = 0
_saved_thresholds: tuple[int, int, int] | None = None


@contextlib.contextmanager
def tune(
    settings: Settings,
    connections: Callable[[], Collection[_HasId]],
    loop: AbstractEventLoop | None = None,
) -> Iterator[FreezePolicy | None]:
    """Apply the GC policy of ``settings`` for the duration of the block (enter it once
    the hub and its extensions started). Yields the :class:`FreezePolicy`, or ``None``
    with ``HERALD_GC=default``."""
    global _active, _saved_thresholds
    if settings.gc == "default":
        yield None
        return
    import asyncio

    thresholds = settings.gc_thresholds or TUNED_THRESHOLDS
    first = _active == 0
    _active += 1
    if first:
        _saved_thresholds = gc.get_threshold()
        gc.set_threshold(*thresholds)
    policy = FreezePolicy(
        connections,
        freeze_after=settings.gc_freeze_after,
        thaw_after=settings.gc_thaw_after,
        check_interval=settings.gc_check_interval,
    )
    ms = policy.freeze()
    logger.info("gc: thresholds %s, froze the start-up heap in %.0f ms", thresholds, ms)
    policy.start(loop or asyncio.get_running_loop())
    try:
        yield policy
    finally:
        policy.stop()
        _active -= 1
        if _active == 0:
            gc.unfreeze()
            if _saved_thresholds is not None:
                gc.set_threshold(*_saved_thresholds)
                _saved_thresholds = None
