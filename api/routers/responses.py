"""OpenAPI descriptions of the error responses the API's routes can give."""

from __future__ import annotations

from typing import Any

from ..schemas import ErrorResponse

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


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries with the error envelope for ``statuses`` (400, 422 and 503
    always: a body or query that cannot be parsed or does not validate; the database
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


AUTHENTICATED = (401, 403)
