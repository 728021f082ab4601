"""Domain exceptions of the API and their one mapping to the hub's error envelope.

Services raise these (never ``HTTPException``); :func:`install_error_handlers` turns
each into ``{"error": {"code", "message", "request_id", "details"?}}`` with its status.
Database and storage error text never reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.responses import Response

from hub.http_errors import error_response, request_id_of

logger = logging.getLogger("herald.api")


class ApiError(Exception):
    """Base of every domain error: a stable ``code``, an HTTP ``status``, a message."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = dict(headers or {})


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"

    def __init__(self, message: str = "authentication required") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class InvalidCredentials(Unauthorized):
    code = "invalid_credentials"

    def __init__(self) -> None:
        super().__init__("incorrect username or password")


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class UserDisabled(Forbidden):
    code = "user_disabled"


class AdminProtected(Forbidden):
    """Admins cannot be deleted, and an admin cannot demote, suspend or delete themself."""

    code = "admin_protected"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class EmailTaken(Conflict):
    code = "email_taken"

    def __init__(self) -> None:
        super().__init__(
            "an account with this e-mail address already exists",
            details=[{"loc": ["body", "email"], "type": "unique", "message": "already taken"}],
        )


class UsernameTaken(Conflict):
    code = "username_taken"

    def __init__(self) -> None:
        super().__init__(
            "this username is already taken",
            details=[{"loc": ["body", "username"], "type": "unique", "message": "already taken"}],
        )


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


class InvalidInput(ApiError):
    """A business rule on a well-formed request failed; same shape as schema errors."""

    status = 422
    code = "validation_error"

    def __init__(self, field: list[str], message: str, *, type: str = "value_error") -> None:
        super().__init__(
            "request is invalid", details=[{"loc": field, "type": type, "message": message}]
        )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers for every :class:`ApiError` and for a database that cannot
    be reached (503, retry shortly); any other error is the hub's 500 ``internal``."""

    async def api_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, ApiError):  # pragma: no cover - registered for ApiError only
            raise exc
        return error_response(
            exc.status,
            exc.code,
            exc.message,
            request_id=request_id_of(request),
            details=exc.details,
            headers=exc.headers,
        )

    async def database_unavailable(request: Request, exc: Exception) -> Response:
        logger.error(
            "database unavailable (request %s): %s", request_id_of(request), type(exc).__name__
        )
        return error_response(
            503,
            "unavailable",
            "the database is unavailable, retry shortly",
            request_id=request_id_of(request),
            headers={"Retry-After": "1"},
        )

    app.add_exception_handler(ApiError, api_error)
    for unavailable in (OperationalError, InterfaceError, PoolTimeout):
        app.add_exception_handler(unavailable, database_unavailable)


class BadRequest(ApiError):
    status = 400
    code = "bad_request"
