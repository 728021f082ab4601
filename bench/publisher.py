"""The publisher process: publishes at a fixed rate, each message stamped with
``time.time_ns()`` as the first field of its data.

Two paths:

* ``redis`` (default with a Redis broker): the hub's own ``RedisBroker.publish_batch``
  (the same Lua script as the publish API: history append + PUBLISH, one pipeline per
  tick), built without ``start()`` (publishing needs only the command pool). The server
  then spends CPU on fan-out only, which is what the figures are about, and the
  publisher costs little on the generator's core.
* ``http``: ``POST /api/v1/publish/batch`` with a service key. The only way in for the
  embedded (memory) broker; it adds the HTTP request and validation of each batch to
  the server's CPU (per message, not per delivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import time
from collections.abc import Sequence
from typing import Any

from .common import SERVICE_KEY, cpu_seconds

MAX_BATCH = 1000
# ~200-byte envelopes: {"op":"message","channel":"public:bench","offset":"...",
# "event":"bench","data":{"t":...,"i":...,"p":"..."},"ts":...}
PAD = "x" * 64


def payload(seq: int) -> bytes:
    return b'{"t":%d,"i":%d,"p":"%s"}' % (time.time_ns(), seq, PAD.encode())


class _RedisPath:
    def __init__(self, url: str, prefix: str) -> None:
        from hub.broker import BrokerConfig, PublishRequest
        from hub.broker.redis import RedisBroker

        self.broker = RedisBroker(BrokerConfig(url=url, prefix=prefix))
        self.request = PublishRequest

    async def publish(self, items: list[tuple[str, bytes]]) -> None:
        await self.broker.publish_batch([self.request(ch, "bench", data) for ch, data in items])

    async def aclose(self) -> None:
        await self.broker.aclose()


class _HttpPath:
    def __init__(self, base_url: str) -> None:
        import httpx

        self.client = httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {SERVICE_KEY}"}, timeout=30
        )

    async def publish(self, items: list[tuple[str, bytes]]) -> None:
        # data must reach the server as JSON; splice the raw bytes into the body.
        body = (
            b'{"messages":['
            + b",".join(
                b'{"channel":"' + ch.encode() + b'","event":"bench","data":' + data + b"}"
                for ch, data in items
            )
            + b"]}"
        )
        response = await self.client.post(
            "/api/v1/publish/batch", content=body, headers={"Content-Type": "application/json"}
        )
        if response.status_code != 200:
            raise RuntimeError(f"publish failed: HTTP {response.status_code} {response.text}")

    async def aclose(self) -> None:
        await self.client.aclose()


async def _run(path: Any, command: dict[str, Any]) -> dict[str, Any]:
    """Publish ``rate`` messages/s for ``duration`` s; ``channels`` is one channel name or
    ``("users", n)``: a random ``user:u<i>``, i < n, per message."""
    loop = asyncio.get_running_loop()
    rate: float = command["rate"]
    total = max(1, round(rate * command["duration"]))
    channels = command["channels"]
    pick_user = isinstance(channels, list | tuple)
    n_users = channels[1] if pick_user else 0
    rng = random.Random(command.get("seed", 1))
    seq = command.get("start_seq", 0)
    cpu0 = cpu_seconds()
    t0 = loop.time()
    sent = 0
    ticks = 0
    while sent < total:
        due = min(total, int((loop.time() - t0) * rate) + 1)
        while sent < due:
            batch = min(due - sent, MAX_BATCH)
            items = []
            for _ in range(batch):
                ch = f"user:u{rng.randrange(n_users)}" if pick_user else channels
                items.append((ch, payload(seq)))
                seq += 1
            await path.publish(items)
            sent += batch
            ticks += 1
        delay = t0 + sent / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    elapsed = loop.time() - t0
    return {
        "published": sent,
        "elapsed": elapsed,
        "ticks": ticks,
        "cpu": cpu_seconds() - cpu0,
        "next_seq": seq,
    }


def publisher_main(pipe: Any, mode: str, target: str, prefix: str, cpus: Any) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass

    async def main() -> None:
        path = _RedisPath(target, prefix) if mode == "redis" else _HttpPath(target)
        try:
            while True:
                command = await asyncio.to_thread(pipe.recv)
                if command["op"] == "stop":
                    break
                try:
                    pipe.send(await _run(path, command))
                except Exception as exc:  # report, keep serving
                    pipe.send({"error": f"{type(exc).__name__}: {exc}"})
        finally:
            await path.aclose()

    asyncio.run(main())


class Publisher:
    """Controller side of the publisher process."""

    def __init__(self, mode: str, target: str, prefix: str, cpus: Sequence[int] | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.mode = mode
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=publisher_main,
            args=(child, mode, target, prefix, list(cpus) if cpus else None),
            daemon=True,
        )
        self.proc.start()
        child.close()
        self.seq = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def start(self, rate: float, duration: float, channels: Any) -> None:
        self.pipe.send(
            {
                "op": "run",
                "rate": rate,
                "duration": duration,
                "channels": channels,
                "start_seq": self.seq,
                "seed": self.seq + 1,
            }
        )

    def wait(self, timeout: float) -> dict[str, Any]:
        if not self.pipe.poll(timeout):
            raise TimeoutError("publisher did not finish")
        result: dict[str, Any] = self.pipe.recv()
        if "error" in result:
            raise RuntimeError(result["error"])
        self.seq = result["next_seq"]
        return result

    def run(self, rate: float, duration: float, channels: Any) -> dict[str, Any]:
        self.start(rate, duration, channels)
        return self.wait(duration * 10 + 60)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pipe.send({"op": "stop"})
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
