"""py-spy a server worker during one fan-out step and summarise where the time goes.

``py-spy record --native --rate 100 --format raw`` (collapsed stacks) on the worker,
pinned to the generator's core so the sampler does not take the server's. ``--native``
shows CPython's own C frames, so garbage collection appears as itself (``gc_collect_main``
and friends) instead of being charged to whatever Python line allocated. The summary:
self time by function (the leaf frame), inclusive time by function, and the share of a
few buckets (GC, socket writes, uvicorn/websockets framing, asyncio machinery, hub code).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR, timestamp

SYSCALL_LEAVES = {
    "write": "kernel: socket write",
    "writev": "kernel: socket write",
    "sendmsg": "kernel: socket write",
    "__libc_write": "kernel: socket write",
    "__send": "kernel: socket write",
    "send": "kernel: socket write",
    "read": "kernel: socket read",
    "recv": "kernel: socket read",
    "recvmsg": "kernel: socket read",
    "getpid": "getpid syscall",
}
IDLE_LEAVES = {"epoll_pwait", "epoll_wait", "epoll_pwait2"}
GC_FRAME = re.compile(r"^(gc_collect_main|gc_collect_with_callback|gc_collect_generations)\b")


def _frame_name(frame: str) -> str:
    """``func (file.py:12)`` -> ``func (file.py)``; native frames keep their file."""
    return re.sub(r":\d+\)$", ")", frame.strip())


def _short(frame: str) -> str:
    m = re.match(r"(.*) \((.*)\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


def _python_owner(frames: list[str]) -> str:
    """The bucket of the innermost Python frame (C frames below it are charged to it)."""
    for frame in reversed(frames):
        if ".py)" not in frame:
            continue
        if frame.endswith("(<frozen runpy>)"):
            continue
        path = frame.rsplit("(", 1)[1]
        if path.startswith("hub/"):
            return "hub code"
        if path.startswith(("uvicorn/protocols/websockets", "websockets/", "wsproto/")):
            return "uvicorn WebSocket protocol + websockets/wsproto"
        if path.startswith("uvicorn/"):
            return "uvicorn (other)"
        if path.startswith(("sse_starlette/", "starlette/", "fastapi/")):
            return "starlette / sse-starlette"
        if path.startswith(("anyio/", "sniffio/")):
            return "anyio"
        if path.startswith("asyncio/"):
            return "asyncio (python)"
        if path.startswith(("redis/",)):
            return "redis-py"
        if path.startswith("prometheus_client/"):
            return "prometheus_client"
        return "other python: " + path.split("/", 1)[0]
    return "event loop (uvloop C)"


def summarise(raw_path: Path, top: int = 25) -> dict[str, Any]:
    """Main-thread samples only (the GC recorder and anyio's worker threads are left
    out); samples blocked in epoll are idle and counted apart."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    busy = idle = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        if "thread_run (" in stack:  # not the event loop's thread
            continue
        count = int(count_text)
        frames = [_short(_frame_name(f)) for f in stack.split(";") if f]
        if not frames:
            continue
        leaf = frames[-1].split(" (", 1)[0]
        if leaf in IDLE_LEAVES:
            idle += count
            continue
        busy += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            incl_counts[name] += count
        if any(GC_FRAME.match(f) for f in frames):
            buckets["garbage collection"] += count
        elif leaf in SYSCALL_LEAVES:
            buckets[SYSCALL_LEAVES[leaf]] += count
        else:
            buckets[_python_owner(frames)] += count

    def pct(counter: Counter[str], skip_trunk: bool = False) -> list[tuple[str, float]]:
        items = [
            (name, round(100 * n / busy, 1))
            for name, n in counter.most_common()
            if not (skip_trunk and n >= 0.97 * busy)
        ]
        return items[:top]

    return {
        "samples": busy + idle,
        "busy_samples": busy,
        "busy_fraction": round(busy / (busy + idle), 3) if busy + idle else None,
        "self": pct(self_counts),
        "inclusive": pct(incl_counts, skip_trunk=True),
        "buckets": pct(buckets),
    }


def profile_step(
    bench: Any, rate: float, duration: float, channels: Any, per_msg: int
) -> dict[str, Any] | None:
    """Run one step at ``rate`` with py-spy attached to the (first) worker."""
    from .scenarios import measure_step

    if shutil.which("py-spy") is None:
        print("   (py-spy not installed: pip install py-spy)")
        return None
    pid = bench.server.worker_pids()[0]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    raw = RESULTS_DIR / f"pyspy-{timestamp()}-{pid}.txt"
    seconds = int(duration + 2)
    cmd = ["py-spy", "record", "--native", "-r", "100", "-d", str(seconds), "-f", "raw"]
    cmd += ["-o", str(raw), "-p", str(pid)]
    if bench.client_cpus:
        cmd = ["taskset", "-c", ",".join(map(str, bench.client_cpus)), *cmd]
    print(f"   profiling: {' '.join(cmd)}", flush=True)
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)
    row = measure_step(
        bench, rate=rate, duration=duration, channels=channels, expected_per_msg=per_msg
    )
    try:
        _, err = spy.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if not raw.exists():
        print(f"   py-spy failed: {err.decode(errors='replace')[-500:]}")
        return None
    summary = summarise(raw)
    summary["raw"] = str(raw)
    summary["step"] = row
    print_summary(summary)
    return summary


def print_summary(summary: dict[str, Any], top: int = 15) -> None:
    print(
        f"\n   py-spy: {summary['samples']} main-thread samples, "
        f"{summary['busy_fraction']:.0%} busy; shares of busy samples:"
    )
    print("   buckets:")
    for name, p in summary["buckets"]:
        print(f"     {p:5.1f}%  {name}")
    print("   top self:")
    for name, p in summary["self"][:top]:
        print(f"     {p:5.1f}%  {name}")
    print("   top inclusive:")
    for name, p in summary["inclusive"][:top]:
        print(f"     {p:5.1f}%  {name}")
