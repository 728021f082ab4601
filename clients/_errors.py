"""The client's exceptions, and the one mapping from server codes to them.

::

    HeraldError                      every error this package raises
     ├── TransportError              the network failed (the client retries these itself)
     ├── ProtocolError               the server sent something this client cannot read
     ├── ClientClosedError           the client was closed while you were waiting on it
     └── ServerError                 the server refused something; ``code`` says what
          ├── AuthenticationError    401, close 4501/4502: bad, revoked or missing credential
          │    ├── TokenExpiredError the token expired and no provider could renew it
          │    └── UserDisabledError close 4504: the user was suspended, deleted or revoked
          ├── ForbiddenError         403, close 4503: the policy refuses this channel/action
          ├── BadRequestError        400/413/422: bad channel, event, body, too many channels
          ├── RateLimitedError       429: ``retry_after`` seconds
          └── UnavailableError       503, 5xx: the hub or its broker is down; try later

Terminal errors (authentication, forbidden, bad request) are raised to the caller and
never retried: a client that retries a 401 forever hammers the server for nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ClientClosedError",
    "ForbiddenError",
    "HeraldError",
    "ProtocolError",
    "RateLimitedError",
    "ServerError",
    "TokenExpiredError",
    "TransportError",
    "UnavailableError",
    "UserDisabledError",
    "error_from_code",
    "error_from_response",
]


class HeraldError(Exception):
    """Base class of every error raised by :mod:`clients`."""


class TransportError(HeraldError):
    """The connection to the hub failed or was lost (retried by the client)."""


class ProtocolError(HeraldError):
    """The server sent a frame or event this client cannot understand."""


class ClientClosedError(HeraldError):
    """The client was closed (``aclose()`` or leaving ``async with``)."""


class ServerError(HeraldError):
    """The hub refused a request or ended the connection for good.

    ``code`` is the protocol's stable error code or close reason (``forbidden``,
    ``user_disabled``...), ``status`` the HTTP status when it came over HTTP,
    ``close_code`` the WebSocket close code when it ended a connection.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        close_code: int | None = None,
        request_id: str | None = None,
        details: list[Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.close_code = close_code
        self.request_id = request_id
        self.details = details

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class AuthenticationError(ServerError):
    """The credential was refused (missing, malformed, wrongly signed, revoked)."""


class TokenExpiredError(AuthenticationError):
    """The token expired and there is no token provider to get a fresh one (or the
    provider's token was expired too)."""


class UserDisabledError(AuthenticationError):
    """The user was suspended or deleted, or their tokens were revoked (close 4504)."""


class ForbiddenError(ServerError):
    """The channel policy does not allow this subscription or publication."""


class BadRequestError(ServerError):
    """The request was malformed: bad channel or event name, body, size or limits."""


class RateLimitedError(ServerError):
    """Over the publish rate; retry after ``retry_after`` seconds."""

    def __init__(self, code: str, message: str, *, retry_after: float | None = None, **kw: Any):
        super().__init__(code, message, **kw)
        self.retry_after = retry_after


class UnavailableError(ServerError):
    """The hub or its broker is temporarily unavailable (or failed internally)."""


_BY_CODE: dict[str, type[ServerError]] = {
    "unauthorized": AuthenticationError,
    "invalid_credentials": AuthenticationError,
    "auth_timeout": AuthenticationError,
    "token_expired": TokenExpiredError,
    "user_disabled": UserDisabledError,
    "forbidden": ForbiddenError,
    "forbidden_origin": ForbiddenError,
    "bad_request": BadRequestError,
    "bad_channel": BadRequestError,
    "unknown_op": BadRequestError,
    "too_many_channels": BadRequestError,
    "message_too_large": BadRequestError,
    "payload_too_large": BadRequestError,
    "validation_error": BadRequestError,
    "bad_protocol": BadRequestError,
    "rate_limited": RateLimitedError,
    "unavailable": UnavailableError,
    "internal": UnavailableError,
    "shutdown": UnavailableError,
}
_BY_STATUS: dict[int, type[ServerError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: ForbiddenError,
    413: BadRequestError,
    422: BadRequestError,
    429: RateLimitedError,
}


def error_from_code(
    code: str,
    message: str,
    *,
    status: int | None = None,
    close_code: int | None = None,
    request_id: str | None = None,
    details: list[Any] | None = None,
    retry_after: float | None = None,
) -> ServerError:
    """The exception for a protocol error code (or close reason), falling back on the
    HTTP status and then on :class:`ServerError`."""
    cls = _BY_CODE.get(code)
    if cls is None and status is not None:
        cls = _BY_STATUS.get(status, UnavailableError if status >= 500 else None)
    cls = cls or ServerError
    kw: dict[str, Any] = {
        "status": status,
        "close_code": close_code,
        "request_id": request_id,
        "details": details,
    }
    if cls is RateLimitedError:
        return RateLimitedError(code, message, retry_after=retry_after, **kw)
    return cls(code, message, **kw)


def error_from_response(
    status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> ServerError:
    """Map an HTTP error response carrying the product's envelope
    ``{"error": {"code", "message", "request_id", "details"}}`` to an exception.
    Bodies that are not the envelope (a proxy's HTML page) still map by status."""
    import json

    headers = headers or {}
    code, message, request_id, details = "", "", headers.get("x-request-id"), None
    try:
        envelope = json.loads(body)
    except ValueError:
        envelope = None
    if isinstance(envelope, dict) and isinstance(envelope.get("error"), dict):
        error = envelope["error"]
        code = str(error.get("code") or "")
        message = str(error.get("message") or "")
        request_id = error.get("request_id") or request_id
        raw_details = error.get("details")
        details = raw_details if isinstance(raw_details, list) else None
    if not code:
        code = {401: "unauthorized", 403: "forbidden", 429: "rate_limited"}.get(
            status, "unavailable" if status >= 500 else "bad_request"
        )
    if not message:
        message = f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"
    retry_after = None
    raw_retry = headers.get("retry-after")
    if raw_retry:
        try:
            retry_after = float(raw_retry)
        except ValueError:
            retry_after = None
    return error_from_code(
        code,
        message,
        status=status,
        request_id=request_id,
        details=details,
        retry_after=retry_after,
    )
