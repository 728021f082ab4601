"""Start ``python -m hub.cli serve`` for a scenario, pinned with ``taskset``, and read its
CPU time, RSS and GC pauses from /proc and the bench-only GC recorder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from .common import SECRET, SERVICE_KEY, descendants, raise_nofile, sum_cpu, sum_rss

REPO = Path(__file__).resolve().parent.parent
GCWATCH = Path(__file__).resolve().parent / "gcwatch"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One ``herald serve`` (hub only) owned by the bench; stopped by PID."""

    def __init__(
        self,
        *,
        workers: int = 1,
        broker: str = "redis",
        redis_url: str = DEFAULT_REDIS,
        ws: str = "herald",
        http: str | None = None,
        cpus: str | None = "0",
        env: dict[str, str] | None = None,
        gc_watch: bool = True,
        repo: Path | str | None = None,
    ) -> None:
        if broker not in ("redis", "memory"):
            raise ValueError("broker must be redis or memory")
        if broker == "memory" and workers != 1:
            raise ValueError("embedded (memory) mode runs one worker only")
        self.workers = workers
        self.broker = broker
        self.redis_url = redis_url if broker == "redis" else None
        self.ws = ws
        # None: `herald serve`'s default (older checkouts have no --http)
        self.http = http
        self.cpus = cpus
        self.port = free_port()
        self.prefix = f"bench{uuid.uuid4().hex[:10]}"
        self.tmp = Path(tempfile.mkdtemp(prefix="herald-bench-"))
        self.gc_dir = self.tmp / "gc"
        self.gc_dir.mkdir()
        self.log_path = self.tmp / "server.log"
        self.gc_watch = gc_watch
        self.extra_env = dict(env or {})
        # The checkout whose ``hub`` package runs (another worktree for before/after runs).
        self.repo = Path(repo).resolve() if repo else REPO
        self.process: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "hub.cli",
            "serve",
            "--workers",
            str(self.workers),
            "--port",
            str(self.port),
            "--ws",
            self.ws,
            "--log-level",
            "warning",
        ]
        if self.http is not None:
            cmd += ["--http", self.http]
        if self.cpus is not None:
            cmd = ["taskset", "-c", self.cpus, *cmd]
        return cmd

    def command_line(self) -> str:
        env = [f"HERALD_REDIS_URL={self.redis_url}"] if self.redis_url else []
        env += [
            f"{k}={v}"
            for k, v in sorted(self.extra_env.items())
            if k.startswith("HERALD_") and not k.startswith("HERALD_BENCH_")
        ]
        if self.repo != REPO:
            env.insert(0, f"PYTHONPATH={self.repo}")
        cmd = self.command()
        cmd[cmd.index(sys.executable)] = "python"
        return " ".join([*env, *cmd])

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(
            {
                "HERALD_ENV": "development",
                "HERALD_SECRET_KEY": SECRET,
                "HERALD_SERVICE_KEYS": SERVICE_KEY,
                "HERALD_DATA_DIR": str(self.tmp / "data"),
                "HERALD_REDIS_PREFIX": self.prefix,
                "HERALD_LOG_LEVEL": "warning",
                # Bench tokens are one per connection; the publish API must not throttle
                # the HTTP publisher of embedded mode.
                "HERALD_PUBLISH_RATE_PER_SECOND": "1000000",
                "HERALD_PUBLISH_RATE_BURST": "1000000",
                "HERALD_MAX_TOKEN_TTL": "86400",
            }
        )
        if self.redis_url:
            env["HERALD_REDIS_URL"] = self.redis_url
        paths = [str(self.repo), *filter(None, [os.environ.get("PYTHONPATH")])]
        if self.gc_watch:
            env["HERALD_BENCH_GC_DIR"] = str(self.gc_dir)
            paths.insert(0, str(GCWATCH))
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60.0) -> Server:
        raise_nofile()  # inherited by the server (and raised again by gcwatch)
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.tmp,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        path = "/health/ready" if self.redis_url else "/health"
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"herald serve exited early:\n{self.log_tail()}")
            try:
                response = httpx.get(self.url + path, timeout=2.0)
                if response.status_code == 200:
                    break
                last = f"HTTP {response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"herald serve did not become ready ({last}):\n{self.log_tail()}")
        if self.workers > 1:  # wait for every worker to be up
            while len(self.worker_pids()) < self.workers and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- measurements -------------------------------------------------------------------

    def pids(self) -> list[int]:
        """The supervisor (or single worker) and every process below it."""
        if self.process is None:
            return []
        return descendants(self.process.pid)

    def worker_pids(self) -> list[int]:
        """The processes that serve connections (the supervisor excluded when >1)."""
        pids = self.pids()
        if self.workers == 1 or self.process is None:
            return pids[:1]
        names = {pid: _cmdline(pid) for pid in pids}
        return [p for p in pids if p != self.process.pid and "spawn_main" in names[p]]

    def cpu(self) -> float:
        return sum_cpu(self.pids())

    def rss(self) -> int:
        return sum_rss(self.pids())

    def gc_snapshots(self) -> list[dict[str, Any]]:
        snaps = []
        for path in self.gc_dir.glob("gc-*.json"):
            try:
                snaps.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return snaps

    # -- stop ---------------------------------------------------------------------------

    def stop(self, timeout: float = 15.0) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in reversed(descendants(process.pid)):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                process.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.redis_url:
            _delete_prefix(self.redis_url, self.prefix)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _delete_prefix(url: str, prefix: str) -> None:
    """Remove the keys of this run (only ours: the prefix is unique)."""
    import redis

    try:
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        client.close()
    except redis.RedisError:
        pass


def gc_summary(
    before: list[dict[str, Any]], after: list[dict[str, Any]], since: float, until: float
) -> dict[str, Any]:
    """GC activity of the server processes between two snapshot sets (by pid)."""
    old = {s["pid"]: s for s in before}
    counts = [0, 0, 0]
    total_ms = [0.0, 0.0, 0.0]
    cpu_ms = [0.0, 0.0, 0.0]
    pauses: list[list[float]] = []
    for snap in after:
        prev = old.get(snap["pid"])
        for gen in range(3):
            counts[gen] += snap["count"][gen] - (prev["count"][gen] if prev else 0)
            total_ms[gen] += snap["total_ms"][gen] - (prev["total_ms"][gen] if prev else 0.0)
            if "cpu_ms" in snap:
                cpu_ms[gen] += snap["cpu_ms"][gen] - (prev["cpu_ms"][gen] if prev else 0.0)
        pauses.extend(p for p in snap["pauses"] if since <= p[0] <= until)
    longest = max((p[2] for p in pauses), default=0.0)
    return {
        "collections": counts,
        "gc_ms": [round(t, 1) for t in total_ms],
        "gc_cpu_ms": [round(t, 1) for t in cpu_ms],
        "max_pause_ms": round(longest, 1),
        "pauses_over_50ms": sum(1 for p in pauses if p[2] > 50),
        "gen2_pauses_ms": sorted((round(p[2], 1) for p in pauses if p[1] == 2), reverse=True)[:10],
    }
