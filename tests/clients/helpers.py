"""Helpers for the client tests: real ``herald serve`` processes (stopped by PID),
tokens signed with their secret, worker-kill helpers, admin bootstrap."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.helpers import token
from tests.herald_process import HeraldProcess

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
API_APP = "api.app:create_app"
ADMIN_PASSWORD = "dashboard admin password"

RUNNING: list[HeraldProcess] = []  # servers up now, for failure reports


@contextlib.contextmanager
def running(herald: HeraldProcess | None = None, **kwargs: Any) -> Iterator[HeraldProcess]:
    """Start ``herald`` (or ``HeraldProcess(**kwargs)``); stop it (by PID) afterwards."""
    herald = herald or HeraldProcess(**kwargs)
    RUNNING.append(herald)
    try:
        with herald:
            yield herald
    finally:
        RUNNING.remove(herald)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def user_token(subject: str, **kw: Any) -> str:
    return token(subject, **kw)


def admin_token() -> str:
    return token("admin-" + uuid.uuid4().hex[:6], role="admin")


def worker_pids(herald: HeraldProcess) -> list[int]:
    """uvicorn's worker processes of ``herald`` (the supervisor's children)."""
    return herald.worker_pids() if herald.workers > 1 else []


async def wait_workers(herald: HeraldProcess, count: int, timeout: float = 20.0) -> None:
    """Wait until ``count`` workers run again and the hub answers /health."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(worker_pids(herald)) >= count:
            try:
                async with httpx.AsyncClient(timeout=1.0) as http:
                    if (await http.get(f"{herald.base_url}/health")).status_code == 200:
                        return
            except httpx.HTTPError:
                pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"workers did not come back: {worker_pids(herald)}")


def kill(pid: int) -> None:
    """SIGKILL one worker this test's server started (by PID)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def create_admin(herald: HeraldProcess, email: str, password: str = ADMIN_PASSWORD) -> None:
    """``herald users create-admin`` against the server's database (before it starts)."""
    env = {**herald.env, "HERALD_ADMIN_PASSWORD": password}
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", "users", "create-admin", "--email", email],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr + result.stdout
