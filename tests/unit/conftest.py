"""Fixtures for the in-process unit suite: memory broker only, no Redis, no subprocesses.

Every test runs in a fresh temporary working directory with no ``HERALD_*`` variables,
so neither a developer's environment nor a ``.env`` file can leak into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI

from hub.app import create_app
from hub.auth import Authenticator, Principal, TokenService
from hub.broker import BrokerConfig, HistoryResult
from hub.broker.memory import MemoryBroker
from hub.hub import Hub
from hub.metrics import Metrics
from hub.policy import DefaultChannelPolicy
from hub.protocol import StreamPosition
from hub.settings import Settings

SECRET = "unit-test-secret-" + "s" * 40
FAST_WS = "hub.transports.fastws:FastWebSocketProtocol"
FAST_HTTP = "hub.transports.fasthttp:FastHttpProtocol"
SERVICE_KEY = "svc-unit-key-0123456789abcdef"
OTHER_SERVICE_KEY = "svc-unit-key-fedcba9876543210"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("HERALD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "secret_key": SECRET,
        "data_dir": tmp_path / "data",
        "service_keys": [SERVICE_KEY, OTHER_SERVICE_KEY],
        "history_size": 100,
        "shutdown_grace": 0.5,
        "send_timeout": 2.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(tmp_path, **overrides)

    return factory


def make_tokens(settings: Settings) -> TokenService:
    return TokenService(
        settings.signing_key(),
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        access_ttl=settings.access_token_ttl,
        subscribe_ttl=settings.subscribe_token_ttl,
        max_ttl=settings.max_token_ttl,
    )


class SpyBroker(MemoryBroker):
    """A MemoryBroker that records subscribe/unsubscribe calls and can run a hook inside
    ``history`` (to publish "live" messages while a subscriber is recovering)."""

    def __init__(self, config: BrokerConfig) -> None:
        super().__init__(config)
        self.subscribe_calls: list[tuple[str, ...]] = []
        self.unsubscribe_calls: list[tuple[str, ...]] = []
        self.before_history: Callable[[], Any] | None = None
        self.after_history: Callable[[], Any] | None = None

    @property
    def subscribed(self) -> set[str]:
        return set(self._subscribed)

    async def subscribe(self, channels: Sequence[str]) -> None:
        self.subscribe_calls.append(tuple(channels))
        await asyncio.sleep(0)  # a real backend awaits here: let others interleave
        await super().subscribe(channels)

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        self.unsubscribe_calls.append(tuple(channels))
        await super().unsubscribe(channels)

    async def history(
        self, channel: str, *, since: StreamPosition | None = None, limit: int | None = None
    ) -> HistoryResult:
        if self.before_history is not None:
            await self.before_history()
        result = await super().history(channel, since=since, limit=limit)
        if self.after_history is not None:
            await self.after_history()
        return result


def build_test_hub(settings: Settings) -> Hub:
    broker = SpyBroker(
        BrokerConfig(history_size=settings.history_size, history_ttl=settings.history_ttl)
    )
    authenticator = Authenticator(
        make_tokens(settings),
        static_service_keys=[key.get_secret_value() for key in settings.service_keys],
        revocation=broker.get_user_not_before,
    )
    return Hub(settings, broker, authenticator, DefaultChannelPolicy(), Metrics())


@contextlib.asynccontextmanager
async def running_hub(settings: Settings) -> AsyncIterator[Hub]:
    hub = build_test_hub(settings)
    await hub.start()
    try:
        yield hub
    finally:
        # Tests hold connections without transports; release them as a transport would,
        # so aclose() does not wait out the drain grace for nobody.
        for conn in list(hub.registry.connections):
            hub.release_connection(conn)
        await hub.aclose()


async def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)


def user(subject: str = "42", role: str = "user", **kwargs: Any) -> Principal:
    return Principal(subject=subject, role=role, **kwargs)


def service(*scopes: str) -> Principal:
    return Principal(
        subject="svc", role="user", kind="service", scopes=frozenset(scopes or ("publish",))
    )


# -- in-process HTTP ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def http_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to ``app`` in-process, inside the app's lifespan."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://herald.test") as client:
            yield client


# -- a real uvicorn server on this event loop ----------------------------------------------


class LiveServer:
    """uvicorn serving ``app`` on a free port, as a task on the test's own event loop (so
    tests can reach ``app.state.hub`` directly)."""

    def __init__(
        self, app: FastAPI, settings: Settings, ws: str = FAST_WS, http: str = FAST_HTTP
    ) -> None:
        self.app = app
        # herald's raw write paths (what `herald serve` runs) or plain uvicorn
        self.raw_paths = http == FAST_HTTP
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            lifespan="on",
            log_config=None,
            log_level="warning",
            access_log=False,
            http=http,
            ws=ws,
            ws_max_size=settings.max_frame_bytes,
            ws_per_message_deflate=False,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def hub(self) -> Hub:
        hub: Hub = self.app.state.hub
        return hub

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def __aenter__(self) -> LiveServer:
        self._task = asyncio.create_task(self.server.serve())
        deadline = time.monotonic() + 5
        while not self.server.started:
            if self._task.done():
                self._task.result()
                pytest.fail("uvicorn exited during start-up")
            if time.monotonic() > deadline:
                pytest.fail("uvicorn did not start within 5 s")
            await asyncio.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await asyncio.wait_for(self._task, timeout=10)


@pytest.fixture(
    params=[(FAST_HTTP, FAST_WS), ("httptools", "websockets-sansio")], ids=["fast", "asgi"]
)
async def live(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Any]]:
    """``server = await live(**settings)`` starts a server; every one stops at teardown.

    Every test runs twice: with herald's raw write paths (the pre-framed WebSocket
    protocol and the raw SSE body, what ``herald serve`` uses) and with plain uvicorn
    (the portable ASGI write paths)."""
    http, ws = request.param
    stack = contextlib.AsyncExitStack()

    async def start(**overrides: Any) -> LiveServer:
        settings = make_settings(tmp_path, **overrides)
        return await stack.enter_async_context(
            LiveServer(create_app(settings), settings, ws=ws, http=http)
        )

    async with stack:
        yield start


def json_lines(text: str | bytes) -> list[dict[str, Any]]:
    """A server frame holds one JSON object per line."""
    if isinstance(text, str):
        text = text.encode()
    return [orjson.loads(line) for line in text.split(b"\n") if line]
