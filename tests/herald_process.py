"""Run a real ``herald serve`` in a subprocess for end-to-end tests.

Each instance gets a free port, its own data directory, a secret, service keys and
(optionally) a Redis URL and key prefix; :meth:`HeraldProcess.stop` ends it by PID.
Worker PIDs are read from ``/proc`` (children of the supervisor) so tests can kill
one worker with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

SECRET = "test-secret-" + "x" * 40
SERVICE_KEY = "svc-test-key-0123456789abcdef"
ADMIN_SERVICE_KEY = "svc-admin-key-0123456789abcdef"
DEFAULT_APP = "api.app:create_app"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` that are uvicorn workers (not multiprocessing's
    resource tracker)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) != pid:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            children.append(int(entry.name))
    return sorted(children)


class HeraldProcess:
    """``herald serve`` with ``workers`` processes; use as a context manager."""

    def __init__(
        self,
        *,
        workers: int = 1,
        redis_url: str | None = None,
        prefix: str | None = None,
        env: dict[str, str] | None = None,
        app: str = DEFAULT_APP,
        data_dir: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.workers = workers
        self.prefix = prefix or f"t{uuid.uuid4().hex[:10]}"
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="herald-e2e-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir
        self.env = {
            **os.environ,
            "HERALD_ENV": "development",
            "HERALD_SECRET_KEY": SECRET,
            "HERALD_SERVICE_KEYS": SERVICE_KEY,
            "HERALD_DATA_DIR": str(data_dir),
            "HERALD_REDIS_PREFIX": self.prefix,
            "HERALD_LOG_LEVEL": "warning",
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if redis_url:
            self.env["HERALD_REDIS_URL"] = redis_url
        else:
            self.env.pop("HERALD_REDIS_URL", None)
        self.env.update(env or {})
        self.app = app
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "server.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 30.0) -> HeraldProcess:
        cmd = [
            sys.executable,
            "-m",
            "hub.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]
        cmd += ["--app", self.app]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until /health answers on every worker (several probes per worker)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"herald exited early:\n{self.log()}")
            try:
                ok = httpx.get(f"{self.base_url}/health", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok and len(self.worker_pids()) >= (self.workers if self.workers > 1 else 0):
                # Give every worker time to finish its own start-up.
                time.sleep(0.3 if self.workers == 1 else 1.0)
                return
            time.sleep(0.1)
        raise TimeoutError(f"herald did not become ready:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        if self.process is None:
            return []
        if self.workers == 1:
            return [self.process.pid]
        return child_pids(self.process.pid)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the supervisor (it drains its workers); SIGKILL the group if it hangs."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        code = self.process.returncode
        return code

    def __enter__(self) -> HeraldProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
