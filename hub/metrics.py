"""Prometheus metrics, safe with several worker processes.

``herald serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the
workers start; every worker then writes its samples there and ``/metrics`` on any
worker reports the sum. Metric objects live on a per-app registry (no import-time
globals), so tests can build many apps in one process.

Deliveries are counted on the hot path (every write to a subscriber connection), where
a multiprocess ``Counter.inc()`` costs ~0.75 us (a lock, a ``getpid()`` and an mmap
write): a few per cent of a delivery at one message per frame. So ``delivered`` is a
:class:`BufferedCounter`: ``inc()`` adds to a plain integer (~0.05 us) and the totals
reach the exported counter at least once a second, whenever this worker renders
``/metrics`` or the stats, and at exit. Its meaning is unchanged: messages *written*.
"""

from __future__ import annotations

import asyncio
import atexit
import glob
import os
import weakref

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    multiprocess,
    values,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_enabled() -> bool:
    """True when values are written to the shared directory (decided by prometheus_client
    when it was first imported, so the environment alone is not enough)."""
    return bool(os.environ.get(MULTIPROC_ENV)) and values.ValueClass is not values.MutexValue


class Metrics:
    """The hub's counters and gauges."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.connections = Gauge(
            "herald_connections",
            "Live connections",
            ["transport"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.subscriptions = Gauge(
            "herald_subscriptions",
            "Live channel subscriptions",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.published = Counter("herald_messages_published", "Messages published", registry=reg)
        self.delivered = BufferedCounter(
            Counter(
                "herald_messages_delivered",
                "Messages written to subscriber connections "
                "(exported at most a second late: counted in memory, flushed every second)",
                ["transport"],
                registry=reg,
            )
        )
        self.outbox_drops = Counter(
            "herald_outbox_dropped_messages",
            "Messages dropped because a subscriber's outbox overflowed",
            registry=reg,
        )
        self.slow_consumers = Counter(
            "herald_slow_consumer_disconnects",
            "Connections closed because they did not read fast enough",
            registry=reg,
        )
        self.disconnects = Counter(
            "herald_disconnects", "Connections closed by the server", ["reason"], registry=reg
        )
        self.broker_reconnects = Counter(
            "herald_broker_reconnects", "Times the broker connection was restored", registry=reg
        )
        self.errors = Counter(
            "herald_request_errors", "Error replies sent to clients", ["code"], registry=reg
        )

    def flush(self) -> None:
        """Move the buffered counts into the exported counters."""
        self.delivered.flush()

    def render(self) -> bytes:
        self.flush()
        if multiprocess_enabled():
            forget_dead_processes()
            collect = CollectorRegistry()
            multiprocess.MultiProcessCollector(collect)  # type: ignore[no-untyped-call]
            return generate_latest(collect)
        return generate_latest(self.registry)

    def totals(self) -> dict[str, dict[str, float]]:
        """Every sample summed by metric name and label values, over all workers
        (for the admin stats endpoint)."""
        self.flush()
        if multiprocess_enabled():
            source = CollectorRegistry()
            multiprocess.MultiProcessCollector(source)  # type: ignore[no-untyped-call]
        else:
            source = self.registry
        totals: dict[str, dict[str, float]] = {}
        for family in source.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "pid")
                by_label = totals.setdefault(sample.name, {})
                by_label[key] = by_label.get(key, 0.0) + sample.value
        return totals

    @staticmethod
    def mark_process_dead(pid: int) -> None:
        if multiprocess_enabled():
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


FLUSH_INTERVAL = 1.0


class BufferedCounter:
    """A labelled :class:`Counter` for the hot path: ``labels(...).inc(n)`` adds to a
    plain integer; :meth:`flush` (scheduled at most ``FLUSH_INTERVAL`` s after the first
    unflushed ``inc``, and run by ``render``/``totals`` and at exit) adds it to the
    counter. Event-loop code only (no lock)."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self._children: dict[tuple[str, ...], BufferedChild] = {}
        self._armed = False
        _buffered.add(self)

    def labels(self, *values: str) -> BufferedChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = BufferedChild(self, self.counter.labels(*values))
        return child

    def _arm(self) -> None:
        self._armed = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a script or a test): count right away
            self.flush()
            return
        loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        self._armed = False
        for child in self._children.values():
            pending = child.pending
            if pending:
                child.pending = 0
                child.target.inc(pending)


class BufferedChild:
    __slots__ = ("owner", "pending", "target")

    def __init__(self, owner: BufferedCounter, target: Counter) -> None:
        self.owner = owner
        self.target = target
        self.pending = 0

    def inc(self, amount: int = 1) -> None:
        self.pending += amount
        owner = self.owner
        if not owner._armed:
            owner._arm()


_buffered: weakref.WeakSet[BufferedCounter] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for counter in list(_buffered):
        counter.flush()


def forget_dead_processes() -> None:
    """Drop the live gauges (connections, subscriptions) of workers that died without
    cleaning up (``kill -9``, OOM): otherwise they would be summed in for ever."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return
    for file in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        pid = file.rsplit("_", 1)[1].removesuffix(".db")
        if pid.isdigit() and not _alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), path)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
