"""Pure ASGI middleware (never ``BaseHTTPMiddleware``: it breaks streaming and WebSockets)."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = b"x-request-id"
_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{8,128}$")


class RequestIdMiddleware:
    """Give every HTTP request an id: a well-formed incoming ``X-Request-ID`` is kept,
    anything else is replaced. It is echoed in the response and stored in
    ``scope["state"]["request_id"]`` (``request.state.request_id``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", ()):
            if name == REQUEST_ID_HEADER:
                incoming = value
                break
        if incoming is not None and _VALID_REQUEST_ID.fullmatch(incoming):  # no trailing \n
            request_id = incoming.decode()
        else:
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        header = (REQUEST_ID_HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != REQUEST_ID_HEADER]
                headers.append(header)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)
