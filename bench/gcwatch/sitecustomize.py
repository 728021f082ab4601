"""Bench-only GC pause recorder, loaded into the *server* processes by the bench.

The bench puts this directory first on ``PYTHONPATH`` of the ``herald serve`` it starts
and sets ``HERALD_BENCH_GC_DIR``; Python imports ``sitecustomize`` at start-up in the
supervisor and in every spawned uvicorn worker. Nothing in ``hub/`` changes. Every
collection is timed with ``gc.callbacks``; a daemon thread writes the totals and the
pauses over ``HERALD_BENCH_GC_MIN_MS`` (default 5 ms) to ``gc-<pid>.json`` once a second.
Pauses are wall time (what a client waits: a collection preempted by another process
on the core lasts longer); ``cpu_ms`` is the collector's own CPU time.
The bench also raises ``RLIMIT_NOFILE`` here, in case the launcher could not.

``HERALD_BENCH_GC_MODE`` runs what-if experiments for the optimisation phase, again
without touching ``hub/``: ``off`` (``gc.disable()``: the upper bound of what GC tuning
can win), ``freeze`` (``gc.freeze()`` when the bench creates ``freeze-now`` in the GC
directory, i.e. once every connection is up), or thresholds ``a,b,c``.
``HERALD_BENCH_GC_SIZES=1`` adds the frozen count and the size of each generation to
every snapshot (diagnostics only: it walks the heap once a second, holding the GIL).
"""

import os
from typing import Any

_DIR = os.environ.get("HERALD_BENCH_GC_DIR")

if _DIR:
    import gc
    import json
    import resource
    import threading
    import time

    _soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _soft < _hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))

    _MIN_NS = int(float(os.environ.get("HERALD_BENCH_GC_MIN_MS", "5")) * 1e6)
    _perf = time.perf_counter_ns
    _cpu = time.thread_time_ns  # CPU time: a pause stretched by preemption is not GC work
    _start = [0, 0]
    _cpu_ns = [0, 0, 0]
    _count = [0, 0, 0]
    _total_ns = [0, 0, 0]
    _max_ns = [0, 0, 0]
    _collected = [0, 0, 0]
    _pauses: list[tuple[float, int, float, int]] = []  # (wall time s, generation, ms, collected)

    def _on_gc(phase: str, info: dict[str, int], _perf: Any = _perf, _cpu: Any = _cpu) -> None:
        if phase == "start":
            _start[0] = _perf()
            _start[1] = _cpu()
            return
        elapsed = _perf() - _start[0]
        gen = info["generation"]
        _cpu_ns[gen] += _cpu() - _start[1]
        _count[gen] += 1
        _total_ns[gen] += elapsed
        _collected[gen] += info["collected"]
        if elapsed > _max_ns[gen]:
            _max_ns[gen] = elapsed
        if elapsed >= _MIN_NS and len(_pauses) < 100_000:
            _pauses.append((time.time(), gen, elapsed / 1e6, info["collected"]))

    gc.callbacks.append(_on_gc)
    _MODE = os.environ.get("HERALD_BENCH_GC_MODE", "default")
    _SIZES = os.environ.get("HERALD_BENCH_GC_SIZES") == "1"
    if _MODE == "off":
        gc.disable()
    elif _MODE.count(",") == 2:
        gc.set_threshold(*(int(x) for x in _MODE.split(",")))
    _trigger = os.path.join(_DIR, "freeze-now")
    _frozen: list[bool] = []
    _path = os.path.join(_DIR, f"gc-{os.getpid()}.json")

    def _dump() -> None:
        snapshot = {
            "pid": os.getpid(),
            "time": time.time(),
            "count": list(_count),
            "total_ms": [n / 1e6 for n in _total_ns],
            "cpu_ms": [n / 1e6 for n in _cpu_ns],
            "max_ms": [n / 1e6 for n in _max_ns],
            "collected": list(_collected),
            "pauses": list(_pauses),
            "thresholds": list(gc.get_threshold()),
            "mode": _MODE,
        }
        if _SIZES:
            # Diagnostics only: gc.get_freeze_count() and get_objects() walk their lists
            # with the GIL held (~70 ms for 700,000 frozen objects, i.e. 5,000 frozen
            # connections): once a second, that is a pause and ~7 % of a core.
            snapshot["frozen"] = gc.get_freeze_count()
            snapshot["gen_sizes"] = [len(gc.get_objects(g)) for g in range(3)]
        tmp = _path + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(snapshot, handle)
        os.replace(tmp, _path)

    def _loop() -> None:
        while True:
            time.sleep(1.0)
            try:
                if _MODE == "freeze" and not _frozen and os.path.exists(_trigger):
                    gc.collect()
                    gc.freeze()
                    _frozen.append(True)
                _dump()
            except Exception:
                pass

    threading.Thread(target=_loop, name="bench-gc-dump", daemon=True).start()
