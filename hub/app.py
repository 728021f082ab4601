"""create_app(settings) -> the ASGI app. Everything is built in the lifespan, nothing at import.

Lifespan: broker connect -> hub start -> extensions (the users API) -> serve ->
extensions exit -> hub drain (``bye``) -> broker close. On SIGTERM the drain runs
*before* uvicorn closes connections (see :mod:`hub.shutdown`), so clients get
``bye`` with ``reconnect: true`` instead of a bare close.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from . import gc_tuning
from .auth import Authenticator, TokenService
from .broker import BrokerConfig, create_broker
from .http import router as hub_router
from .http_errors import install_error_handlers
from .hub import Hub
from .metrics import Metrics
from .middleware import RequestIdMiddleware
from .policy import ChannelPolicy, DefaultChannelPolicy
from .settings import Settings, load_settings
from .shutdown import SignalDrain
from .transports.sse import sse_endpoint
from .transports.websocket import websocket_endpoint

logger = logging.getLogger("herald")

DRAIN_STATE_KEY = "herald.drain"


class Extension(Protocol):
    """A part of the product mounted into the hub app (the users API is one)."""

    def install(self, app: FastAPI) -> None:
        """Add routers and exception handlers; called once inside :func:`create_app`."""

    def lifespan(self, app: FastAPI) -> AbstractAsyncContextManager[None]:
        """Entered after the hub started; exited before the hub drains."""


def _hub_of(scope: Scope) -> Hub:
    hub: Hub = scope["app"].state.hub
    return hub


class _WebSocketApp:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await websocket_endpoint(_hub_of(scope), scope, receive, send)


class _SSEApp:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await sse_endpoint(_hub_of(scope), scope, receive, send)


_DIRECT_SSE = RequestIdMiddleware(_SSEApp())


class HeraldApp(FastAPI):
    """FastAPI with a direct route to the two long-lived endpoints, ``/ws`` and ``/sse``.

    Every middleware layer (FastAPI's own included) is a coroutine frame, often with
    wrapped ``receive``/``send`` closures, that lives as long as the connection: behind
    the full stack an idle WebSocket held 21 coroutines. These endpoints need none of
    it (they check origins, authenticate and answer errors themselves), so they are
    dispatched here; the SSE stream keeps the request id, which its error responses
    carry. Everything else, including other methods on these paths, takes the stack.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if path == "/ws" and scope["type"] == "websocket":
            scope["app"] = self
            await websocket_endpoint(self.state.hub, scope, receive, send)
        elif path == "/sse" and scope["type"] == "http" and scope["method"] == "GET":
            scope["app"] = self
            await _DIRECT_SSE(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def _client_routes() -> list[BaseRoute]:
    """``/client/herald.js`` (+ ``.d.ts``) and ``/dashboard/``: static files of the
    ``clients`` package, located with ``find_spec`` so the hub never runs its code."""
    spec = importlib.util.find_spec("clients")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))

    def serve(path: Path, media_type: str) -> Route:
        async def endpoint(request: Request) -> FileResponse:
            return FileResponse(path, media_type=media_type, headers={"Cache-Control": "no-cache"})

        return Route("/client/" + path.name, endpoint, methods=["GET", "HEAD"])

    routes: list[BaseRoute] = [
        serve(root / "js" / "herald.js", "text/javascript; charset=utf-8"),
        serve(root / "js" / "herald.d.ts", "application/typescript; charset=utf-8"),
    ]
    if (root / "dashboard").is_dir():
        routes.append(Mount("/dashboard", StaticFiles(directory=root / "dashboard", html=True)))
    return routes


def build_hub(settings: Settings, *, policy: ChannelPolicy | None = None) -> Hub:
    broker = create_broker(
        BrokerConfig(
            url=settings.broker_url,
            prefix=settings.redis_prefix,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            history_overrides=settings.history_overrides(),
            **settings.redis_tuning(),
        )
    )
    tokens = TokenService(
        settings.signing_key(),
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        access_ttl=settings.access_token_ttl,
        subscribe_ttl=settings.subscribe_token_ttl,
        max_ttl=settings.max_token_ttl,
    )
    authenticator = Authenticator(
        tokens,
        static_service_keys=[key.get_secret_value() for key in settings.service_keys],
        revocation=broker.get_user_not_before,
    )
    return Hub(settings, broker, authenticator, policy or DefaultChannelPolicy(), Metrics())


def create_app(
    settings: Settings | None = None,
    *,
    extensions: Sequence[Extension] = (),
    policy: ChannelPolicy | None = None,
) -> FastAPI:
    """The hub as an ASGI app. ``settings`` default to the environment (``HERALD_*``)."""
    settings = settings or load_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        hub = build_hub(settings, policy=policy)
        app.state.hub = hub
        await hub.start()
        logger.info("hub started (broker %s)", "redis" if settings.redis_url else "memory")
        signals = SignalDrain(hub.drain)
        try:
            async with contextlib.AsyncExitStack() as stack:
                for extension in extensions:
                    await stack.enter_async_context(extension.lifespan(app))
                # Everything alive now lives as long as the process: freeze it (GC).
                stack.enter_context(gc_tuning.tune(settings, lambda: hub.registry.connections))
                signals.install()
                yield {DRAIN_STATE_KEY: hub.drain}
        finally:
            signals.restore()
            await hub.aclose()
            logger.info("hub stopped")

    app = HeraldApp(
        title="Herald",
        version="1.0.0",
        summary="Real-time notification hub: WebSocket and SSE fan-out over Redis",
        lifespan=lifespan,
        routes=[
            WebSocketRoute("/ws", _WebSocketApp()),
            Route("/sse", _SSEApp(), methods=["GET"]),
            *_client_routes(),
        ],
    )
    app.state.settings = settings
    app.state.readiness_checks = {}
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    app.include_router(hub_router)
    for extension in extensions:
        extension.install(app)
    return app
