"""A real, test-owned ``redis-server`` on a free loopback port (a helper, not a test).

``RedisServer`` starts ``/usr/bin/redis-server`` in its own temporary directory, waits
until it answers PING, and can be stopped (SIGTERM, SIGKILL fallback), killed
(SIGKILL) and started again on the *same* port and directory, so restart tests can
check what survives. It only ever signals the process it started itself, by PID.

    with RedisServer() as server:                  # no persistence
        ...server.url...
    server = RedisServer(appendonly=True)          # AOF, appendfsync always
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType

REDIS_SERVER_BINARY = os.environ.get("HERALD_TEST_REDIS_SERVER", "/usr/bin/redis-server")
HOST = "127.0.0.1"

_live: weakref.WeakSet[RedisServer] = weakref.WeakSet()


def free_port() -> int:
    """A TCP port that was free on the loopback interface a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    # -NOAUTH: up, with --requirepass; -LOADING: still loading its AOF, not ready yet
    return reply.startswith((b"+PONG", b"-NOAUTH"))


class RedisServer:
    """One ``redis-server`` process owned by the test that created it."""

    def __init__(
        self,
        *,
        appendonly: bool = False,
        port: int | None = None,
        extra_args: list[str] | None = None,
        binary: str = REDIS_SERVER_BINARY,
        startup_timeout: float = 10.0,
    ) -> None:
        self.appendonly = appendonly
        self.port = port or 0
        self.extra_args = list(extra_args or [])
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="herald-redis-"))
        self._process: subprocess.Popen[bytes] | None = None
        _live.add(self)

    # -- properties -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- lifecycle --------------------------------------------------------------------------

    def _command(self) -> list[str]:
        args = [
            self.binary,
            "--bind",
            HOST,
            "--port",
            str(self.port),
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
            "--save",
            "",
            "--databases",
            "1",
        ]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        return args + self.extra_args

    def start(self) -> RedisServer:
        """Start (or restart, on the same port and directory) and wait for PING."""
        if self.running:
            return self
        if not Path(self.binary).exists():
            raise RuntimeError(f"{self.binary} not found: install redis-server to run these tests")
        first_start = self.port == 0
        for _ in range(5 if first_start else 1):
            if first_start:
                self.port = free_port()
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready():
                return self
            self.kill()
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            if _ping(self.port):
                return True
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis shuts down cleanly, flushing the AOF), then wait; SIGKILL if it
        does not exit within ``timeout``."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout)
        self._process = None

    def kill(self) -> None:
        """SIGKILL: an abrupt crash, nothing flushed beyond what is already on disk."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
        self._process = None

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        _live.discard(self)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, pid={self.pid}, appendonly={self.appendonly})"


@atexit.register
def _close_leftovers() -> None:  # servers a crashed test never closed
    for server in list(_live):
        try:
            server.kill()
        finally:
            shutil.rmtree(server.dir, ignore_errors=True)
