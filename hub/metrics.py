"""Prometheus metrics, safe with several worker processes.

``herald serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the
workers start; every worker then writes its samples there and ``/metrics`` on any
worker reports the sum. Metric objects live on a per-app registry (no import-time
globals), so tests can build many apps in one process.
"""

from __future__ import annotations

import glob
import os

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
        self.delivered = Counter(
            "herald_messages_delivered",
            "Messages written to subscriber connections",
            ["transport"],
            registry=reg,
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

    def render(self) -> bytes:
        if multiprocess_enabled():
            forget_dead_processes()
            collect = CollectorRegistry()
            multiprocess.MultiProcessCollector(collect)  # type: ignore[no-untyped-call]
            return generate_latest(collect)
        return generate_latest(self.registry)

    def totals(self) -> dict[str, dict[str, float]]:
        """Every sample summed by metric name and label values, over all workers
        (for the admin stats endpoint)."""
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
