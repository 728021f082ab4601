"""``python -m bench.memory [N] [ws|sse] [http] [ws-impl]``: what does an idle connection
hold in the server's Python heap, and where was it allocated?

Runs the hub app in this process under uvicorn (memory broker, ``HERALD_GC=default``),
opens N connections from a bench client process, lets them settle, and compares two
``tracemalloc`` snapshots (before and after), printing KB per connection grouped by
the allocating line, and the number of live objects per type per connection. The
process RSS delta per connection is printed too: the rest of it is C memory (libuv
handles, transport buffers) and allocator overhead that tracemalloc does not see.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import sys
import tracemalloc

from .common import rss_bytes


def main() -> None:
    from .client import ClientPool, Spec
    from .inprocess import FAST_HTTP, FAST_WS, serving
    from .scenarios import FANOUT_CHANNEL, tokens

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    transport = sys.argv[2] if len(sys.argv) > 2 else "ws"
    http = sys.argv[3] if len(sys.argv) > 3 else FAST_HTTP
    ws = sys.argv[4] if len(sys.argv) > 4 else FAST_WS

    async def run() -> None:
        async with serving(http=http, ws=ws) as port:
            await census(port)

    async def census(port: int) -> None:
        specs = [Spec(t, FANOUT_CHANNEL) for t in tokens([f"m{i}" for i in range(n)])]
        pool = ClientPool(port=port, transport=transport, procs=1, cpus=None)

        # warm-up: one connection cycle, so lazily built module state is not counted
        warm = ClientPool(port=port, transport=transport, procs=1, cpus=None)
        await asyncio.to_thread(warm.connect, specs[:50], concurrency=50)
        await asyncio.to_thread(warm.close)
        await asyncio.sleep(1.0)
        gc.collect()
        tracemalloc.start(8)
        before = tracemalloc.take_snapshot()
        types_before = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        rss_before = rss_bytes(os.getpid())
        result = await asyncio.to_thread(pool.connect, specs, concurrency=100)
        await asyncio.sleep(2.0)
        gc.collect()
        after = tracemalloc.take_snapshot()
        rss_after = rss_bytes(os.getpid())
        types_after = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        ok = max(int(result["ok"]), 1)
        stats = after.compare_to(before, "lineno")
        total = sum(s.size_diff for s in stats)
        rss_kb = (rss_after - rss_before) / ok / 1024
        print(
            f"{ok} idle {transport} connections: traced Python heap "
            f"{total / ok / 1024:.1f} KB each; process RSS {rss_kb:.1f} KB each "
            "(RSS includes tracemalloc's own bookkeeping)"
        )
        print("\nKB per connection by allocating line:")
        for stat in stats[:30]:
            if stat.size_diff / ok < 16:
                continue
            frame = stat.traceback[0]
            name = frame.filename.split("site-packages/")[-1].replace(os.getcwd() + "/", "")
            print(f"{stat.size_diff / ok / 1024:8.2f}  {name}:{frame.lineno}")
        if os.environ.get("BENCH_MEMORY_TRACEBACKS"):
            print("\ntop allocations with their tracebacks:")
            for stat in after.compare_to(before, "traceback")[:12]:
                print(f"{stat.size_diff / ok / 1024:8.2f} KB per connection")
                for line in stat.traceback.format()[-12:]:
                    print("      " + line)
        print("\nlive objects per connection by type (gc-tracked only):")
        diff = {k: types_after[k] - types_before.get(k, 0) for k in types_after}
        for name, count in sorted(diff.items(), key=lambda kv: -kv[1])[:30]:
            if count / ok >= 0.5:
                print(f"{count / ok:8.2f}  {name}")
        tracemalloc.stop()
        await asyncio.to_thread(pool.close)

    import uvloop

    uvloop.run(run())


if __name__ == "__main__":
    main()
