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
import tempfile
import tracemalloc

from .common import rss_bytes


def main() -> None:
    import uvicorn

    from .client import ClientPool, Spec
    from .common import SECRET
    from .scenarios import FANOUT_CHANNEL, tokens

    os.environ.update(
        HERALD_SECRET_KEY=SECRET,
        HERALD_DATA_DIR=tempfile.mkdtemp(prefix="herald-memory-"),
        HERALD_GC="default",
        HERALD_LOG_LEVEL="warning",
    )
    os.environ.pop("HERALD_REDIS_URL", None)
    from hub.app import create_app

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    transport = sys.argv[2] if len(sys.argv) > 2 else "ws"
    http = sys.argv[3] if len(sys.argv) > 3 else "hub.transports.fasthttp:FastHttpProtocol"
    ws = sys.argv[4] if len(sys.argv) > 4 else "hub.transports.fastws:FastWebSocketProtocol"

    async def run() -> None:
        config = uvicorn.Config(
            create_app,
            factory=True,
            port=0,
            host="127.0.0.1",
            http=http,
            ws=ws,
            loop="none",
            log_level="warning",
            ws_per_message_deflate=False,
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no started event
            await asyncio.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
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
        server.should_exit = True
        await task

    import uvloop

    uvloop.run(run())


if __name__ == "__main__":
    main()
