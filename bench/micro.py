"""``python -m bench.micro``: micro-benchmarks behind choices in docs/performance.md.

* ``counter``: one delivery-counter increment on the hot path: prometheus_client's
  multiprocess ``Counter.inc()`` (what ``herald serve`` runs: a lock, a ``getpid()`` and
  an mmap write) against :class:`hub.metrics.BufferedCounter` (a plain integer).
* ``redis [URL]``: server-side CPU of one RedisBroker round trip (redis-py + hiredis):
  the revocation GET every connection makes, a connection-slot claim (alone: one
  EVALSHA; in a batch: a pipeline with SCRIPT LOAD) and a release. Uses keys under the
  prefix ``herald-micro`` and deletes them.
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


def redis_round_trips(url: str = "redis://127.0.0.1:6379/0", n: int = 5000) -> None:
    import asyncio
    import time
    from collections.abc import Awaitable, Callable
    from typing import Any

    from hub.broker import BrokerConfig
    from hub.broker.redis import RedisBroker

    class Quiet:
        def on_publication(self, publication: Any) -> None: ...
        def on_control(self, command: Any) -> None: ...
        def on_broker_state(self, connected: bool) -> None: ...

    async def run() -> None:
        broker = RedisBroker(BrokerConfig(url=url, prefix="herald-micro"))
        await broker.start(Quiet())
        cases: list[tuple[str, Callable[[int], Awaitable[object]]]] = [
            ("GET not-before", lambda i: broker.get_user_not_before(f"u{i}")),
            ("claim, alone", lambda i: broker.claim_connection_slots([(f"u{i}", "a")], 32, 30)),
            (
                "claim, batch of 2 (per claim)",
                lambda i: broker.claim_connection_slots([(f"u{i}", "b"), (f"u{i}", "c")], 32, 30),
            ),
            ("release", lambda i: broker.release_connection_slots({f"u{i}": ["a", "b", "c"]})),
        ]
        try:
            for name, call in cases:
                started = time.process_time()
                for i in range(n):
                    await call(i)
                per_call = (time.process_time() - started) / n
                if name.startswith("claim, batch"):
                    per_call /= 2
                print(f"{name:30s} {per_call * 1e6:6.1f} us CPU")
        finally:
            await broker.aclose()

    asyncio.run(run())


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "counter"
    if what == "redis":
        redis_round_trips(*sys.argv[2:3])
    else:
        {"counter": counter}[what]()
