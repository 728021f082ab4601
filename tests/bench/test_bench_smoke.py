"""Smoke version of ``python -m bench fanout``: 100 WebSocket subscribers of one channel
on a real embedded-mode ``herald serve``, a few messages through the publish API.

Asserts delivery only (every subscriber got every message, nothing closed), never
speed: it keeps the load generator, the server launcher and the publisher working.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

# bench/ is not an installed package: import it from the checkout (``pytest`` run
# without ``python -m`` does not put the repository on sys.path).
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from bench.client import ClientPool, Spec  # noqa: E402
from bench.publisher import Publisher  # noqa: E402
from bench.scenarios import FANOUT_CHANNEL, tokens  # noqa: E402
from bench.server import Server  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

SUBSCRIBERS = 100
RATE = 20.0  # messages per second
SECONDS = 1.5


def _wait_for(pool: ClientPool, expected: int, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    stats = pool.stats()
    while stats["received"] < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = pool.stats()
    return pool.stats(full=True)


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_fanout_smoke_delivers_every_message(transport: str) -> None:
    server = Server(broker="memory", cpus=None)
    server.start()
    pool = publisher = None
    try:
        pool = ClientPool(port=server.port, transport=transport, procs=2, cpus=None)
        ids = [f"smoke{i}" for i in range(SUBSCRIBERS)]
        specs = [Spec(token, FANOUT_CHANNEL) for token in tokens(ids)]
        connected = pool.connect(specs, concurrency=50, timeout=20)
        assert connected["ok"] == SUBSCRIBERS, connected["errors"]

        publisher = Publisher("http", server.url, server.prefix, None)
        pool.reset(time.time_ns())
        result = publisher.run(RATE, SECONDS, FANOUT_CHANNEL)
        published = result["published"]
        assert published == round(RATE * SECONDS)

        stats = _wait_for(pool, published * SUBSCRIBERS)
        assert stats["received"] == published * SUBSCRIBERS, server.log_tail()
        assert stats["conn_min"] == stats["conn_max"] == published
        assert stats["closed"] == 0
        assert stats["open"] == SUBSCRIBERS
        # Latencies were measured for every message (the histogram is not empty).
        assert sum(stats["hist_a"].values()) + sum(stats["hist_b"].values()) == stats["received"]
        # The server's CPU time is readable (the figures depend on it).
        assert server.cpu() > 0
        assert server.gc_snapshots(), "the bench GC recorder did not report"
    finally:
        if publisher is not None:
            publisher.close()
        if pool is not None:
            pool.close()
        server.stop()
