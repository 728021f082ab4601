"""Shared helpers: /proc readings, file-descriptor limits, latency histograms, tables."""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

SECRET = "bench-secret-" + "b" * 40  # HERALD_SECRET_KEY of every server the bench starts
SERVICE_KEY = "svc-bench-key-0123456789abcdef"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Latency histogram: 0.1 ms buckets up to 10 s (the last bucket holds everything above;
# the exact maximum is kept apart).
HIST_RES_NS = 100_000
HIST_SIZE = 100_000


def raise_nofile(wanted: int | None = None) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit (to the hard limit by default)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else min(hard, max(soft, wanted))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- /proc -------------------------------------------------------------------------------


def _stat_fields(pid: int | str) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


def cpu_seconds(pid: int | str = "self") -> float:
    """utime + stime of one process (its threads included), in seconds."""
    fields = _stat_fields(pid)
    # fields[0] is the state (field 3); utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int | str = "self") -> int:
    fields = Path(f"/proc/{pid}/statm").read_text().split()
    return int(fields[1]) * PAGE_SIZE


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (uvicorn's supervisor and its workers)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(entry.name)[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, ()))
    return sorted(found)


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"


def sum_cpu(pids: Iterable[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def sum_rss(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += rss_bytes(pid)
        except OSError:
            pass
    return total


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine_info() -> dict[str, Any]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_total_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": loadavg(),
    }


# -- latency histograms ------------------------------------------------------------------


def new_hist() -> list[int]:
    return [0] * HIST_SIZE


def sparse(hist: Sequence[int]) -> dict[int, int]:
    return {i: n for i, n in enumerate(hist) if n}


def merge_sparse(into: dict[int, int], other: dict[int, int]) -> None:
    for key, n in other.items():
        k = int(key)
        into[k] = into.get(k, 0) + n


def percentile_ms(hist: dict[int, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a sparse histogram, in milliseconds (bucket top)."""
    total = sum(hist.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return (bucket + 1) * HIST_RES_NS / 1e6
    return None


# -- output ------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A plain-text table; ``columns`` are (key, heading)."""
    cells = [[heading for _, heading in columns]]
    for row in rows:
        cells.append([fmt(row.get(key), 2 if "cpu" in key else 1) for key, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for index, row_cells in enumerate(cells):
        lines.append("  ".join(c.rjust(w) for c, w in zip(row_cells, widths, strict=True)))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
