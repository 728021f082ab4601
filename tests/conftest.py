"""Fixtures shared by every test suite.

Redis: tests never use a Redis they did not start. ``redis_server`` is one
``redis-server`` for the whole session (never stopped by a test); tests that stop,
kill or restart Redis create their own with ``redis_server_factory``. Keys never
collide because every test gets its own ``unique_prefix``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any
from uuid import uuid4

import pytest

from hub.protocol import Publication

try:
    from tests.redis_server import RedisServer
except ImportError:  # pytest put tests/ itself on sys.path (``pytest`` rather than ``-m``)
    from redis_server import RedisServer  # type: ignore[no-redef, import-not-found]

# -- Redis --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A test-owned redis-server on a free loopback port, shared by the session."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's redis-server (restarted first if a test left it down)."""
    if not redis_server.running:
        redis_server.start()
    return redis_server.url


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., RedisServer]]:
    """Start extra redis-servers owned by one test (for stop/kill/restart tests);
    ``factory(appendonly=True)`` for AOF. All are closed when the test ends."""
    servers: list[RedisServer] = []

    def factory(**options: Any) -> RedisServer:
        server = RedisServer(**options)
        servers.append(server)
        return server.start()

    try:
        yield factory
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def unique_prefix() -> str:
    """A key prefix of its own for each test (use as ``BrokerConfig.prefix``)."""
    return f"t{uuid4().hex[:10]}"


# -- broker handlers ----------------------------------------------------------------------


class RecordingHandler:
    """A :class:`hub.broker.BrokerHandler` that records every callback, for broker tests."""

    def __init__(self) -> None:
        self.publications: list[Publication] = []
        self.controls: list[dict[str, Any]] = []
        self.states: list[bool] = []
        self._changed = asyncio.Event()

    def on_publication(self, publication: Publication) -> None:
        self.publications.append(publication)
        self._changed.set()

    def on_control(self, command: dict[str, Any]) -> None:
        self.controls.append(command)
        self._changed.set()

    def on_broker_state(self, connected: bool) -> None:
        self.states.append(connected)
        self._changed.set()

    def on(self, channel: str) -> list[Publication]:
        return [p for p in self.publications if p.channel == channel]

    async def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition"
    ) -> None:
        """Wait until ``predicate()`` holds (checked after every callback), or fail."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass


@pytest.fixture
def recording_handler() -> type[RecordingHandler]:
    """The :class:`RecordingHandler` class: ``handler = recording_handler()``."""
    return RecordingHandler
