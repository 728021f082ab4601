"""One error envelope for every 4xx and 5xx the product answers.

``{"error": {"code": "...", "message": "...", "request_id": "...", "details": [...]}}``.
Handlers are registered in one place (:func:`install_error_handlers`); no stack trace,
SQL or Redis text ever reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.routing import Match

from . import errors
from .broker.base import BrokerUnavailable
from .errors import HubError

logger = logging.getLogger("herald.http")


# -- the envelope, for OpenAPI ------------------------------------------------------------


class ErrorDetail(BaseModel):
    loc: list[str] = Field(description="where: ['body', 'email'], ['query', 'size'], ...")
    type: str | None = None
    message: str | None = None


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. 'email_taken'")
    message: str
    request_id: str | None = Field(description="the X-Request-ID of the request")
    details: list[ErrorDetail] | None = Field(default=None, description="field errors, if any")


class ErrorResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "email_taken",
                        "message": "an account with this e-mail address already exists",
                        "request_id": "4be0643f1d98573b97cdca98a65347dd",
                        "details": [
                            {"loc": ["body", "email"], "type": "unique", "message": "already taken"}
                        ],
                    }
                }
            ]
        }
    )

    error: ErrorBody


_DESCRIPTIONS = {
    400: "Malformed request",
    401: "Missing, invalid, expired or revoked credentials",
    403: "Authenticated but not allowed",
    404: "Not found",
    409: "Conflicts with existing data",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Invalid input (field errors in `details`)",
    429: "Rate limited; retry after `Retry-After` seconds",
    503: "A dependency is unavailable",
}
_RATE_HEADERS = {
    "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}},
    "X-RateLimit-Limit": {"schema": {"type": "integer"}},
    "X-RateLimit-Remaining": {"schema": {"type": "integer"}},
    "X-RateLimit-Reset": {"schema": {"type": "integer"}},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries with the error envelope for ``statuses`` (400, 422 and 503
    always: a body or query that cannot be parsed or does not validate; a dependency
    cannot be reached)."""
    result: dict[int | str, dict[str, Any]] = {}
    for status in sorted({*statuses, 400, 422, 503}):
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
        if status == 429:
            entry["headers"] = _RATE_HEADERS
        if status == 503:
            entry["headers"] = {"Retry-After": _RATE_HEADERS["Retry-After"]}
        result[status] = entry
    return result


STATUS_BY_CODE: dict[str, int] = {
    errors.BAD_REQUEST: 400,
    errors.BAD_CHANNEL: 400,
    errors.UNKNOWN_OP: 400,
    errors.UNAUTHORIZED: 401,
    errors.TOKEN_EXPIRED: 401,
    errors.FORBIDDEN: 403,
    errors.NOT_SUBSCRIBED: 409,
    errors.ALREADY_SUBSCRIBED: 409,
    errors.TOO_MANY_CHANNELS: 400,
    errors.MESSAGE_TOO_LARGE: 413,
    errors.RATE_LIMITED: 429,
    errors.UNAVAILABLE: 503,
    errors.INTERNAL: 500,
}
HTTP_STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal",
    503: "unavailable",
}


class OrjsonResponse(JSONResponse):
    """JSON rendered with orjson (FastAPI deprecated its own OrjsonResponse)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    request_id: str | None = None,
    details: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> OrjsonResponse:
    body: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
    if details:
        body["details"] = details
    return OrjsonResponse({"error": body}, status_code=status, headers=dict(headers or {}))


class RateLimitExceeded(HubError):
    """429 with ``Retry-After`` and ``X-RateLimit-*`` headers."""

    def __init__(self, message: str, headers: dict[str, str]) -> None:
        super().__init__(errors.RATE_LIMITED, message, temporary=True)
        self.headers = headers


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ())]
        # Never echo the input back: it may be a password.
        details.append({"loc": loc, "type": err.get("type"), "message": err.get("msg")})
    return details


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app accepts for this request's path."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


def install_error_handlers(app: FastAPI) -> None:
    async def hub_error(request: Request, exc: Exception) -> OrjsonResponse:
        exc = cast(HubError, exc)
        status = STATUS_BY_CODE.get(exc.code, 400)
        headers = getattr(exc, "headers", None)
        if exc.code in (errors.UNAUTHORIZED, errors.TOKEN_EXPIRED):
            headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
        return error_response(
            status, exc.code, exc.message, request_id=request_id_of(request), headers=headers
        )

    async def validation_error(request: Request, exc: Exception) -> OrjsonResponse:
        exc = cast(RequestValidationError, exc)
        return error_response(
            422,
            "validation_error",
            "request is invalid",
            request_id=request_id_of(request),
            details=_validation_details(exc),
        )

    async def http_error(request: Request, exc: Exception) -> OrjsonResponse:
        exc = cast(StarletteHTTPException, exc)
        code = HTTP_STATUS_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route's methods; a path served by several
            # routes (GET and PATCH /users/me) must list them all.
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_response(
            exc.status_code,
            code,
            message,
            request_id=request_id_of(request),
            headers=headers,
        )

    async def broker_unavailable(request: Request, exc: Exception) -> OrjsonResponse:
        # Any route that touches the broker (rate limits, revocation, commands) while
        # Redis is down: a temporary 503, never a 500 with Redis's text.
        return error_response(
            503,
            errors.UNAVAILABLE,
            "message broker unavailable, retry shortly",
            request_id=request_id_of(request),
            headers={"Retry-After": "1"},
        )

    async def unhandled(request: Request, exc: Exception) -> OrjsonResponse:
        logger.exception("unhandled error (request %s)", request_id_of(request))
        return error_response(
            500, errors.INTERNAL, "internal server error", request_id=request_id_of(request)
        )

    app.add_exception_handler(HubError, hub_error)
    app.add_exception_handler(BrokerUnavailable, broker_unavailable)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unhandled)
