"""Fixtures for end-to-end tests: real ``herald serve`` processes on loopback.

Servers are started by :func:`running_herald` (stopped by PID on exit) and shared per
module where tests can share them. When a test fails, the logs of every server still
running are attached to its report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from .helpers import HeraldProcess, RedisServer

_RUNNING: list[HeraldProcess] = []


@contextlib.contextmanager
def running_herald(*, unset: tuple[str, ...] = (), **kwargs: Any) -> Iterator[HeraldProcess]:
    """Start ``herald serve`` with ``HeraldProcess(**kwargs)`` (minus the ``unset``
    environment variables); stop it (by PID) after."""
    herald = HeraldProcess(**kwargs)
    for name in unset:
        herald.env.pop(name, None)
    _RUNNING.append(herald)
    try:
        with herald:
            yield herald
    finally:
        _RUNNING.remove(herald)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for index, herald in enumerate(_RUNNING):
            title = f"herald server {index} log (port {herald.port})"
            report.sections.append((title, herald.log()))


@pytest.fixture(scope="module")
def embedded_herald() -> Iterator[HeraldProcess]:
    """One ``herald serve`` worker, embedded mode (memory broker), default settings."""
    with running_herald() as herald:
        yield herald


@pytest.fixture(scope="session")
def cluster(redis_server: RedisServer) -> Iterator[HeraldProcess]:
    """``herald serve --workers 2`` on the session's redis-server, shared by every e2e
    module that only needs a healthy two-worker deployment (tests use unique channels
    and users, so they cannot see each other's traffic)."""
    with running_herald(workers=2, redis_url=redis_server.url) as herald:
        yield herald
