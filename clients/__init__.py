"""Herald clients for Python: subscribe over WebSocket or SSE, publish over HTTP.

::

    from clients import HeraldClient, HeraldHTTP

    async with HeraldClient("http://localhost:8000", token=access_token) as hub:
        async for msg in hub.subscribe("user:42", "public:news"):
            print(msg.channel, msg.event, msg.data)

    async with HeraldHTTP("http://localhost:8000", api_key=key) as herald:
        await herald.publish("user:42", "order.shipped", {"id": 7})

Backend services next to the hub's Redis can skip HTTP: ``from hub import
HeraldPublisher`` (server code: it shares the hub's atomic publish script).

This package imports no server code; it speaks protocol v1 as docs/protocol.md
describes it. The browser client is ``clients/js/herald.js`` (served at
``/client/herald.js``); the dashboard is ``clients/dashboard/``.
"""

from ._errors import (
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    ForbiddenError,
    HeraldError,
    ProtocolError,
    RateLimitedError,
    ServerError,
    TokenExpiredError,
    TransportError,
    UnavailableError,
    UserDisabledError,
)
from ._models import Backoff, Message, Offset, PublishResult, Recovery
from ._transport import (
    HandshakeRejected,
    TransportClosed,
    WebSocketConnection,
    WebSocketConnector,
    WebsocketsConnector,
)
from .client import HeraldClient, Subscription, TokenProvider
from .http import HeraldHTTP, PublishItem

__all__ = [
    "AuthenticationError",
    "Backoff",
    "BadRequestError",
    "ClientClosedError",
    "ForbiddenError",
    "HandshakeRejected",
    "HeraldClient",
    "HeraldError",
    "HeraldHTTP",
    "Message",
    "Offset",
    "ProtocolError",
    "PublishItem",
    "PublishResult",
    "RateLimitedError",
    "Recovery",
    "ServerError",
    "Subscription",
    "TokenExpiredError",
    "TokenProvider",
    "TransportClosed",
    "TransportError",
    "UnavailableError",
    "UserDisabledError",
    "WebSocketConnection",
    "WebSocketConnector",
    "WebsocketsConnector",
]
