"""``python -m bench.micro``: micro-benchmarks behind choices in docs/performance.md.

* ``counter``: one delivery-counter increment on the hot path: prometheus_client's
  multiprocess ``Counter.inc()`` (what ``herald serve`` runs: a lock, a ``getpid()`` and
  an mmap write) against :class:`hub.metrics.BufferedCounter` (a plain integer).
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import timeit


def counter(n: int = 300_000) -> None:
    import asyncio

    async def run() -> None:  # the buffered counter arms its flush timer on the loop
        _counter(n)

    asyncio.run(run())


def _counter(n: int) -> None:
    with tempfile.TemporaryDirectory() as path:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        from prometheus_client import CollectorRegistry, Counter

        from hub.metrics import BufferedCounter, multiprocess_enabled

        assert multiprocess_enabled()
        plain = Counter("x", "x", ["t"], registry=CollectorRegistry()).labels("websocket")
        buffered = BufferedCounter(Counter("y", "y", ["t"], registry=CollectorRegistry())).labels(
            "websocket"
        )
        for name, inc in (
            ("multiprocess Counter.inc", plain.inc),
            ("BufferedCounter.inc", buffered.inc),
        ):
            best = min(timeit.repeat(functools.partial(inc, 1), number=n, repeat=5)) / n
            print(f"{name:28s} {best * 1e6:6.3f} us per call")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "counter"
    {"counter": counter}[what]()
