"""``python -m bench.cycles [N] [ws|sse] [WS-IMPL]``: which objects does a closed
WebSocket (or SSE) connection leave in reference cycles (what a frozen connection
leaks until the next thaw, see hub/gc_tuning.py)?

Runs the hub app in this process under uvicorn (memory broker, ``HERALD_GC=default``),
opens and closes N connections from a bench client process once to warm up, then again
with ``gc.DEBUG_SAVEALL`` and prints what the collector found unreachable, per connection.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import sys


def main() -> None:
    from .client import ClientPool, Spec
    from .inprocess import FAST_WS, serving
    from .scenarios import FANOUT_CHANNEL, tokens

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    transport = sys.argv[2] if len(sys.argv) > 2 else "ws"
    ws = sys.argv[3] if len(sys.argv) > 3 else FAST_WS

    async def run() -> None:
        async with serving(ws=ws) as port:
            await census(port)

    async def census(port: int) -> None:
        specs = [Spec(t, FANOUT_CHANNEL) for t in tokens([f"c{i}" for i in range(n)])]

        def cycle() -> int:
            pool = ClientPool(port=port, transport=transport, procs=1, cpus=None)
            r = pool.connect(specs, concurrency=50)
            pool.close()
            return int(r["ok"])

        ok = await asyncio.to_thread(cycle)  # warm-up round
        await asyncio.sleep(1.0)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        ok = await asyncio.to_thread(cycle)
        await asyncio.sleep(1.5)
        gc.collect()
        garbage = list(gc.garbage)
        gc.set_debug(0)
        counts = collections.Counter(
            type(o).__module__ + "." + type(o).__qualname__ for o in garbage
        )
        print(
            f"{ok} connections opened and closed; {len(garbage)} objects in cycles "
            f"({len(garbage) / max(ok, 1):.1f} per connection)"
        )
        for name, c in counts.most_common(40):
            print(f"{c / ok:8.2f}  {name}")
        # coroutines and frames among them, by name
        names: collections.Counter[str] = collections.Counter()
        for o in garbage:
            if type(o).__name__ in ("coroutine",):
                names[o.__qualname__] += 1
            if type(o).__name__ == "frame":
                names["frame " + o.f_code.co_qualname] += 1
        for k, c in names.most_common(20):
            print(f"{c / ok:8.2f}  {k}")
        gc.garbage.clear()

    import uvloop

    uvloop.run(run())


if __name__ == "__main__":
    main()
