"""The ``Origin`` allow-list for browser connections (WebSocket and cookie-auth SSE)."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str]) -> bool:
    """Whether a request with this ``Origin`` may connect.

    * no ``Origin`` header: a non-browser client; allowed (it must still authenticate);
    * ``*`` in the allow-list: any origin;
    * an origin listed exactly (scheme://host[:port]);
    * the same origin as the ``Host`` the client used (pages served by the hub itself,
      such as the dashboard), whatever the list says.
    """
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if "*" in allowed:
        return True
    if origin in (entry.rstrip("/").lower() for entry in allowed):
        return True
    if host:
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:
            return False
        return netloc == host.strip().lower()
    return False
