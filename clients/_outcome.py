"""How a connection ended, and what the client does next (pure, no I/O).

The table is docs/protocol.md's: 1001 reconnect at once; 4000-4499 and network
failures (1006, 1011, ...) reconnect with backoff; 4003 ``token_expired`` reconnect with
a fresh token from the provider; 4500-4999 and ``bye`` with ``reconnect: false`` are
terminal. A ``bye`` frame, when one came, wins over the bare close code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import ServerError, TokenExpiredError, error_from_code

# What to do after a connection ended.
BACKOFF = "backoff"  # reconnect after the backoff delay
IMMEDIATE = "immediate"  # reconnect at once (server shutdown) if it had got connected
RESTART = "restart"  # the client itself ended the connection (SSE channel set changed)
REFRESH = "refresh"  # reconnect at once with a fresh token
TERMINAL = "terminal"  # stop, raise ``error`` to the caller


@dataclass(frozen=True, slots=True)
class Outcome:
    action: str
    connected: bool = False  # the connection got as far as ``connected``
    error: ServerError | None = None
    reason: str = ""


def classify_close(
    close_code: int | None,
    bye: Mapping[str, Any] | None = None,
    *,
    connected: bool = False,
    error_frame: Mapping[str, Any] | None = None,
) -> Outcome:
    """Decide from a close code, the ``bye`` payload (WebSocket ``bye`` frame or SSE
    ``disconnect`` event) and the last ``error`` frame seen before it."""
    reason = ""
    reconnect: bool | None = None
    message = ""
    if bye is not None:
        reason = str(bye.get("code") or "")
        message = str(bye.get("message") or "")
        raw_close = bye.get("close_code")
        if isinstance(raw_close, int) and close_code in (None, 1005, 1006):
            close_code = raw_close
        if isinstance(bye.get("reconnect"), bool):
            reconnect = bye["reconnect"]
    if reconnect is None:
        if close_code is None:
            reconnect = True
        else:
            reconnect = not 4500 <= close_code <= 4999
    if close_code == 4003 or reason == "token_expired":
        return Outcome(REFRESH, connected, reason="token_expired")
    if not reconnect:
        code = reason or {4500: "bad_protocol", 4501: "unauthorized", 4502: "auth_timeout"}.get(
            close_code or 0, "refused"
        )
        if error_frame is not None:
            # The error frame says precisely why (e.g. ``token_expired`` vs a bad signature).
            code = str(error_frame.get("code") or code)
            message = str(error_frame.get("message") or message)
        error = error_from_code(code, message or f"connection closed ({close_code})")
        error.close_code = close_code
        if isinstance(error, TokenExpiredError):
            return Outcome(REFRESH, connected, error, reason=code)
        return Outcome(TERMINAL, connected, error, reason=code)
    if close_code == 1001 or reason == "shutdown":
        return Outcome(IMMEDIATE, connected, reason=reason or "shutdown")
    return Outcome(BACKOFF, connected, reason=reason or f"closed {close_code}")
