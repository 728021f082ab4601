"""Fixtures for the recovery tests: real ``herald serve --workers 2`` processes on a
test-owned redis-server (``running_herald`` of the e2e suite starts and stops them by
PID). When a test fails, the logs of every server still running are attached."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from tests.e2e import conftest as e2e_conftest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for index, herald in enumerate(e2e_conftest._RUNNING):
            title = f"herald server {index} log (port {herald.port})"
            report.sections.append((title, herald.log()))
