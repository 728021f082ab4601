"""``HeraldHTTP``: the hub's HTTP API for services — publish, publish in batches, mint
subscribe tokens, disconnect users.

::

    async with HeraldHTTP("http://localhost:8000", api_key="svc-...") as herald:
        result = await herald.publish("user:42", "order.shipped", {"id": 7})
        results = await herald.publish_batch([("public:news", "posted", {"t": "hi"})])

Errors come back as the exceptions of :mod:`clients._errors`, mapped from the API's
error envelope (``RateLimitedError.retry_after`` from ``Retry-After``). Nothing is
retried here: a publish that timed out may have been applied, so retrying is the
caller's decision.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import httpx

from ._errors import ProtocolError, TransportError, error_from_response
from ._models import PublishResult
from ._wire import Endpoints

__all__ = ["HeraldHTTP", "PublishItem"]

PublishItem = tuple[str, str, Any] | Mapping[str, Any]
"""One message for :meth:`HeraldHTTP.publish_batch`: ``(channel, event, data)`` or a
mapping with those keys."""


class HeraldHTTP:
    """An HTTP client for the hub's API, authenticated with a service API key (or a
    user's access token, for the endpoints users may call).

    ``transport`` is an ``httpx`` transport (``httpx.MockTransport`` in tests).
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("api_key is required")
        self.endpoints = Endpoints.from_url(url)
        self._http = httpx.AsyncClient(
            base_url=self.endpoints.http,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> HeraldHTTP:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.post(path, **kwargs)
        except httpx.HTTPError as exc:
            raise TransportError(f"POST {path} failed: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content, response.headers)
        try:
            return response.json()
        except ValueError:
            raise ProtocolError(f"POST {path} answered non-JSON") from None

    async def publish(self, channel: str, event: str, data: Any = None) -> PublishResult:
        """Publish one message; returns its offset. ``data`` is any JSON value."""
        body = await self._post(
            "/api/v1/publish", json={"channel": channel, "event": event, "data": data}
        )
        return PublishResult.from_json(body)

    async def publish_batch(self, messages: Iterable[PublishItem]) -> list[PublishResult]:
        """Publish several messages in one round trip, in order; results in order."""
        items = []
        for item in messages:
            if isinstance(item, tuple):
                channel, event, data = item
                items.append({"channel": channel, "event": event, "data": data})
            else:
                items.append(
                    {"channel": item["channel"], "event": item["event"], "data": item.get("data")}
                )
        body = await self._post("/api/v1/publish/batch", json={"messages": items})
        return [PublishResult.from_json(result) for result in body["results"]]

    async def subscribe_token(self) -> str:
        """A short-lived subscribe token for ``/sse?token=`` (needs a user access token)."""
        body = await self._post("/api/v1/tokens/subscribe")
        return str(body["token"])

    async def disconnect_user(self, user_id: str, *, revoke: bool = False) -> None:
        """Close every live connection of ``user_id`` on every worker (admin); with
        ``revoke``, also refuse every token issued to them until now."""
        await self._post(
            f"/api/v1/connections/users/{user_id}/disconnect",
            params={"revoke": "true" if revoke else "false"},
        )
