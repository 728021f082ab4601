"""Errors and disconnects as values, after centrifuge's ``errors.go`` and ``disconnect.go``.

A :class:`HubError` answers one request frame; the connection stays open.
A :class:`Disconnect` ends a connection. Its WebSocket close code says what the client
should do: 4000-4499 reconnect with backoff, 4500-4999 do not reconnect (terminal),
1001 the server is going away (reconnect, to another worker).
"""

from __future__ import annotations

from dataclasses import dataclass


class HubError(Exception):
    """A request failed; sent as ``{"op":"error","code":...,"message":...,"temporary":...}``."""

    def __init__(self, code: str, message: str, *, temporary: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.temporary = temporary

    def __repr__(self) -> str:
        return f"HubError({self.code!r}, {self.message!r})"


# Error codes carried by ``op: error`` frames and HTTP error envelopes.
BAD_REQUEST = "bad_request"
UNKNOWN_OP = "unknown_op"
BAD_CHANNEL = "bad_channel"
FORBIDDEN = "forbidden"
UNAUTHORIZED = "unauthorized"
TOKEN_EXPIRED = "token_expired"
ALREADY_AUTHENTICATED = "already_authenticated"
ALREADY_SUBSCRIBED = "already_subscribed"
NOT_SUBSCRIBED = "not_subscribed"
TOO_MANY_CHANNELS = "too_many_channels"
MESSAGE_TOO_LARGE = "message_too_large"
RATE_LIMITED = "rate_limited"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Why the server ends a connection.

    ``code`` is the WebSocket close code; SSE sends the same values in a final
    ``event: disconnect``.
    """

    code: int
    reason: str
    message: str

    @property
    def reconnect(self) -> bool:
        """Whether a client should reconnect (with backoff) after this disconnect."""
        return self.code < 4500

    def with_message(self, message: str) -> Disconnect:
        return Disconnect(self.code, self.reason, message)

    @property
    def by_client(self) -> bool:
        """The client ended the connection: nobody is left to say goodbye to."""
        return self.reason in ("client_closed", "client_gone")


class Refused(Exception):
    """A connection is refused (or ended) with ``disconnect``."""

    def __init__(self, disconnect: Disconnect) -> None:
        super().__init__(disconnect.reason)
        self.disconnect = disconnect


# Reconnect with backoff (1001, 4000-4499).
# The client went first: closed normally, or the connection was lost.
CLIENT_CLOSED = Disconnect(1000, "client_closed", "client closed")
CLIENT_GONE = Disconnect(1006, "client_gone", "connection lost")
SHUTDOWN = Disconnect(1001, "shutdown", "server is shutting down, reconnect")
SLOW_CONSUMER = Disconnect(4001, "slow_consumer", "client did not read fast enough")
HEARTBEAT_TIMEOUT = Disconnect(4002, "heartbeat_timeout", "no frame from client in time")
TOKEN_EXPIRED_DISCONNECT = Disconnect(4003, "token_expired", "token expired and was not refreshed")
SERVER_ERROR = Disconnect(4004, "server_error", "internal server error")
FORCE_RECONNECT = Disconnect(4005, "force_reconnect", "server asked the client to reconnect")
CONNECTION_LIMIT = Disconnect(4006, "connection_limit", "too many connections for this user")
BROKER_UNAVAILABLE = Disconnect(4007, "unavailable", "message broker unavailable")
INSUFFICIENT_STATE = Disconnect(
    4008,
    "insufficient_state",
    "messages were missed and could not be recovered; resubscribe with your last offsets",
)

# Terminal: do not reconnect without changing something (4500-4999).
BAD_PROTOCOL = Disconnect(4500, "bad_protocol", "protocol violation")
UNAUTHORIZED_DISCONNECT = Disconnect(4501, "unauthorized", "authentication failed")
AUTH_TIMEOUT = Disconnect(4502, "auth_timeout", "no auth frame in time")
FORBIDDEN_ORIGIN = Disconnect(4503, "forbidden_origin", "origin not allowed")
USER_DISABLED = Disconnect(4504, "user_disabled", "user was disabled or deleted")
MESSAGE_TOO_BIG = Disconnect(1009, "message_too_big", "frame exceeds the size limit")

ALL_DISCONNECTS = (
    SHUTDOWN,
    SLOW_CONSUMER,
    HEARTBEAT_TIMEOUT,
    TOKEN_EXPIRED_DISCONNECT,
    SERVER_ERROR,
    FORCE_RECONNECT,
    CONNECTION_LIMIT,
    BROKER_UNAVAILABLE,
    INSUFFICIENT_STATE,
    BAD_PROTOCOL,
    UNAUTHORIZED_DISCONNECT,
    AUTH_TIMEOUT,
    FORBIDDEN_ORIGIN,
    USER_DISABLED,
    MESSAGE_TOO_BIG,
)
DISCONNECTS_BY_REASON = {d.reason: d for d in ALL_DISCONNECTS}
