"""OpenAPI descriptions of the error responses the API's routes can give."""

from __future__ import annotations

from hub.http_errors import error_responses

errors = error_responses


AUTHENTICATED = (401, 403)
