"""Fixtures for the client tests: real two-worker ``herald serve`` processes on a
test-owned Redis (helpers in ``tests/clients/helpers.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.clients.helpers import RUNNING, running
from tests.herald_process import HeraldProcess
from tests.redis_server import RedisServer


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    report = outcome.get_result()
    if report.failed:
        for index, herald in enumerate(RUNNING):
            report.sections.append((f"herald {index} log (port {herald.port})", herald.log()))


@pytest.fixture(scope="module")
def two_workers(redis_server: RedisServer) -> Iterator[HeraldProcess]:
    """Two hub workers on the session's Redis, shared by a module's tests."""
    if not redis_server.running:
        redis_server.start()
    with running(workers=2, redis_url=redis_server.url) as herald:
        yield herald
