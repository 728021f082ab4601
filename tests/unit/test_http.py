"""HTTP routes in-process (httpx + ASGITransport, inside the app's lifespan)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from hub.app import create_app
from hub.hub import Hub
from hub.settings import Settings

from .conftest import OTHER_SERVICE_KEY, SERVICE_KEY, http_client, user

KEY = {"Authorization": f"Bearer {SERVICE_KEY}"}


class Api:
    def __init__(self, client: httpx.AsyncClient, app: FastAPI) -> None:
        self.client = client
        self.app = app
        self.hub: Hub = app.state.hub

    def token(self, subject: str = "1", **kw: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.hub.authenticator.tokens.issue(subject, **kw)}"}


@pytest.fixture
async def api_factory(
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Any]]:
    import contextlib

    stack = contextlib.AsyncExitStack()

    async def start(**overrides: Any) -> Api:
        app = create_app(settings_factory(**overrides))
        client = await stack.enter_async_context(http_client(app))
        return Api(client, app)

    async with stack:
        yield start


@pytest.fixture
async def api(api_factory: Callable[..., Any]) -> Api:
    result: Api = await api_factory()
    return result


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert {"code", "message", "request_id"} <= set(error)
    assert error["request_id"] == response.headers["x-request-id"]
    return error


# -- publish -----------------------------------------------------------------------------------


async def test_publish_returns_the_offset(api: Api) -> None:
    response = await api.client.post(
        "/api/v1/publish",
        json={"channel": "user:1", "event": "order.shipped", "data": {"id": 7}},
        headers=KEY,
    )
    assert response.status_code == 200
    body = response.json()
    epoch = body["epoch"]
    assert body["channel"] == "user:1" and body["seq"] == 1
    assert body["offset"] == f"1:{epoch}"
    assert isinstance(body["ts"], int)
    assert response.headers["x-herald-node"] == api.hub.node_id
    history = await api.hub.broker.history("user:1")
    assert [p.data for p in history.publications] == [b'{"id":7}']


async def test_publish_batch_returns_offsets_in_order(api: Api) -> None:
    messages = [
        {"channel": "public:a", "event": "e", "data": 1},
        {"channel": "public:b", "event": "e", "data": 2},
        {"channel": "public:a", "event": "e", "data": 3},
    ]
    response = await api.client.post(
        "/api/v1/publish/batch", json={"messages": messages}, headers=KEY
    )
    assert response.status_code == 200
    results = response.json()["results"]
    assert [(r["channel"], r["seq"]) for r in results] == [
        ("public:a", 1),
        ("public:b", 1),
        ("public:a", 2),
    ]


async def test_publish_without_credentials_is_401(api: Api) -> None:
    body = {"channel": "public:a", "event": "e", "data": 1}
    response = await api.client.post("/api/v1/publish", json=body)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert error_of(response)["code"] == "unauthorized"
    bad = await api.client.post(
        "/api/v1/publish", json=body, headers={"Authorization": "Bearer wrong-key-0123456789"}
    )
    assert bad.status_code == 401
    basic = await api.client.post(
        "/api/v1/publish", json=body, headers={"Authorization": f"Basic {SERVICE_KEY}"}
    )
    assert basic.status_code == 401


async def test_publish_with_expired_token_is_401_token_expired(api: Api) -> None:
    import time

    import jwt

    now = int(time.time())
    token = jwt.encode(
        {"sub": "1", "iat": now - 100, "exp": now - 60, "aud": "herald", "iss": "herald"},
        api.hub.authenticator.tokens._secret,
        algorithm="HS256",
    )
    response = await api.client.post(
        "/api/v1/publish",
        json={"channel": "public:a", "event": "e", "data": 1},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 401
    assert error_of(response)["code"] == "token_expired"


async def test_user_token_cannot_publish_on_a_user_channel(api: Api) -> None:
    response = await api.client.post(
        "/api/v1/publish",
        json={"channel": "user:1", "event": "e", "data": 1},
        headers=api.token("1"),
    )
    assert response.status_code == 403
    assert error_of(response)["code"] == "forbidden"
    assert (await api.hub.broker.position("user:1")).offset == 0


async def test_admin_token_publishes_on_public_channels(api: Api) -> None:
    response = await api.client.post(
        "/api/v1/publish",
        json={"channel": "public:news", "event": "e", "data": 1},
        headers=api.token("1", role="admin"),
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"channel": "public:a", "event": "bad event!", "data": "hunter2-secret"},
        {"channel": "public:a", "data": "hunter2-secret"},
        {"channel": "", "event": "e", "data": "hunter2-secret"},
        {"channel": "public:a", "event": "e", "data": 1, "password": "hunter2-secret"},
        ["hunter2-secret"],
    ],
)
async def test_invalid_body_is_422_without_echoing_input(api: Api, body: Any) -> None:
    response = await api.client.post("/api/v1/publish", json=body, headers=KEY)
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "validation_error"
    assert error["details"] and all({"loc", "type", "message"} == set(d) for d in error["details"])
    assert "hunter2" not in response.text


async def test_non_json_body_is_422(api: Api) -> None:
    response = await api.client.post(
        "/api/v1/publish",
        content=b"{not json hunter2",
        headers={**KEY, "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert "hunter2" not in response.text


async def test_bad_channel_is_400(api: Api) -> None:
    response = await api.client.post(
        "/api/v1/publish", json={"channel": "public:{x}", "event": "e", "data": 1}, headers=KEY
    )
    assert response.status_code == 400
    assert error_of(response)["code"] == "bad_channel"


async def test_oversized_message_is_413(api_factory: Callable[..., Any]) -> None:
    api: Api = await api_factory(max_message_bytes=256)
    response = await api.client.post(
        "/api/v1/publish",
        json={"channel": "public:a", "event": "e", "data": "x" * 300},
        headers=KEY,
    )
    assert response.status_code == 413
    assert error_of(response)["code"] == "message_too_large"
    batch = await api.client.post(
        "/api/v1/publish/batch",
        json={
            "messages": [
                {"channel": "public:a", "event": "e", "data": 1},
                {"channel": "public:a", "event": "e", "data": "x" * 300},
            ]
        },
        headers=KEY,
    )
    assert batch.status_code == 413
    assert (await api.hub.broker.position("public:a")).offset == 0  # all or nothing


async def test_batch_limit(api_factory: Callable[..., Any]) -> None:
    api: Api = await api_factory(max_batch_messages=2)
    message = {"channel": "public:a", "event": "e", "data": 1}
    response = await api.client.post(
        "/api/v1/publish/batch", json={"messages": [message] * 3}, headers=KEY
    )
    assert response.status_code == 400
    assert "at most 2" in error_of(response)["message"]
    assert (await api.hub.broker.position("public:a")).offset == 0
    ok = await api.client.post(
        "/api/v1/publish/batch", json={"messages": [message] * 2}, headers=KEY
    )
    assert ok.status_code == 200
    empty = await api.client.post("/api/v1/publish/batch", json={"messages": []}, headers=KEY)
    assert empty.status_code == 422


async def test_batch_is_refused_whole_if_one_message_is_forbidden(api: Api) -> None:
    response = await api.client.post(
        "/api/v1/publish/batch",
        json={
            "messages": [
                {"channel": "public:a", "event": "e", "data": 1},
                {"channel": "user:2", "event": "e", "data": 1},
            ]
        },
        headers=api.token("1", role="admin"),
    )
    assert response.status_code == 403
    assert (await api.hub.broker.position("public:a")).offset == 0


# -- request ids and error envelope ------------------------------------------------------------


async def test_well_formed_request_id_is_kept(api: Api) -> None:
    response = await api.client.post(
        "/api/v1/publish", json={}, headers={**KEY, "X-Request-ID": "req-2024.abc:DEF_1"}
    )
    assert response.headers["x-request-id"] == "req-2024.abc:DEF_1"
    assert error_of(response)["request_id"] == "req-2024.abc:DEF_1"


@pytest.mark.parametrize(
    "incoming", ["short", "has space in it", "x" * 129, "<script>alert</script>"]
)
async def test_malformed_request_id_is_replaced(api: Api, incoming: str) -> None:
    response = await api.client.get("/nope", headers={"X-Request-ID": incoming})
    assert response.status_code == 404
    request_id = response.headers["x-request-id"]
    assert request_id != incoming and re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert response.headers.get_list("x-request-id") == [request_id]
    assert error_of(response) == {
        "code": "not_found",
        "message": "Not Found",
        "request_id": request_id,
    }


async def test_every_response_gets_a_fresh_request_id(api: Api) -> None:
    first = (await api.client.get("/health")).headers["x-request-id"]
    second = (await api.client.get("/health")).headers["x-request-id"]
    assert first != second


async def test_method_not_allowed_uses_the_envelope(api: Api) -> None:
    response = await api.client.get("/api/v1/publish")
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"


# -- rate limit ---------------------------------------------------------------------------------


async def test_rate_limit_429_with_headers(api_factory: Callable[..., Any]) -> None:
    api: Api = await api_factory(publish_rate_per_second=0.5, publish_rate_burst=2)
    body = {"channel": "public:a", "event": "e", "data": 1}
    first = await api.client.post("/api/v1/publish", json=body, headers=KEY)
    second = await api.client.post("/api/v1/publish", json=body, headers=KEY)
    third = await api.client.post("/api/v1/publish", json=body, headers=KEY)
    assert [first.status_code, second.status_code, third.status_code] == [200, 200, 429]
    assert first.headers["x-ratelimit-limit"] == "2"
    assert first.headers["x-ratelimit-remaining"] == "1"
    assert second.headers["x-ratelimit-remaining"] == "0"
    assert third.headers["x-ratelimit-remaining"] == "0"
    assert 1 <= int(third.headers["retry-after"]) <= 2
    assert int(third.headers["x-ratelimit-reset"]) >= 1
    assert error_of(third)["code"] == "rate_limited"
    assert (await api.hub.broker.position("public:a")).offset == 2
    # The bucket is per principal: another key still publishes.
    other = await api.client.post(
        "/api/v1/publish", json=body, headers={"Authorization": f"Bearer {OTHER_SERVICE_KEY}"}
    )
    assert other.status_code == 200


# -- subscribe tokens and disconnect ------------------------------------------------------------


async def test_subscribe_token_for_a_user(api: Api) -> None:
    access = api.hub.authenticator.tokens.issue("5", channels=["room:*"], ttl=600)
    access_claims: dict[str, Any] = api.hub.authenticator.tokens.decode(access)
    access_exp = access_claims["exp"]
    response = await api.client.post(
        "/api/v1/tokens/subscribe", headers={"Authorization": f"Bearer {access}"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "subscribe" and body["expires_in"] == 60
    claims = api.hub.authenticator.tokens.decode(body["token"], token_type="subscribe")
    assert claims["sub"] == "5" and claims["channels"] == ["room:*"]
    assert claims["session_exp"] == access_exp
    principal = await api.hub.authenticator.authenticate_token(
        body["token"], token_type="subscribe"
    )
    assert principal.expires_at == float(access_exp)
    # It is single-purpose: not an access token.
    again = await api.client.post(
        "/api/v1/tokens/subscribe", headers={"Authorization": f"Bearer {body['token']}"}
    )
    assert again.status_code == 401


async def test_subscribe_token_is_not_issued_to_services(api: Api) -> None:
    response = await api.client.post("/api/v1/tokens/subscribe", headers=KEY)
    assert response.status_code == 403


async def test_disconnect_endpoint_is_admin_only(api: Api) -> None:
    url = "/api/v1/connections/users/9/disconnect"
    assert (await api.client.post(url)).status_code == 401
    assert (await api.client.post(url, headers=api.token("9"))).status_code == 403
    assert (await api.client.post(url, headers=KEY)).status_code == 403  # publish scope only
    response = await api.client.post(url, headers=api.token("1", role="admin"))
    assert response.status_code == 200
    assert response.json() == {"user": "9", "revoked": False}


async def test_disconnect_with_revoke_closes_and_refuses_old_tokens(api: Api) -> None:
    victim = api.token("9")
    conn = await api.hub.open_connection(
        await api.hub.authenticator.authenticate(victim["Authorization"][7:]), "websocket"
    )
    response = await api.client.post(
        "/api/v1/connections/users/9/disconnect?revoke=true", headers=api.token("1", role="admin")
    )
    assert response.json() == {"user": "9", "revoked": True}
    assert conn.closed is not None and conn.closed.reason == "user_disabled"
    api.hub.release_connection(conn)
    refused = await api.client.post("/api/v1/tokens/subscribe", headers=victim)
    assert refused.status_code == 401
    assert "revoked" in error_of(refused)["message"]


# -- health and metrics -------------------------------------------------------------------------


async def test_health(api: Api) -> None:
    response = await api.client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_ready_reports_checks_and_draining(api: Api) -> None:
    response = await api.client.get("/health/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"broker": "ok"}}
    await api.hub.drain(grace=0)
    response = await api.client.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["accepting"] == "draining"


async def test_ready_runs_extra_checks(api_factory: Callable[..., Any]) -> None:
    api: Api = await api_factory()

    async def database() -> bool:
        raise RuntimeError("db down: password=hunter2")

    api.app.state.readiness_checks["database"] = database
    response = await api.client.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["checks"] == {"broker": "ok", "database": "failing"}
    assert "hunter2" not in response.text


async def test_metrics_count_publishes_and_connections(api: Api) -> None:
    body = {"channel": "public:a", "event": "e", "data": 1}
    for _ in range(3):
        assert (await api.client.post("/api/v1/publish", json=body, headers=KEY)).status_code == 200
    conn = await api.hub.open_connection(user("1"), "sse")
    response = await api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "herald_messages_published_total 3.0" in text
    assert 'herald_connections{transport="sse"} 1.0' in text
    assert "herald_subscriptions 0.0" in text
    api.hub.release_connection(conn)
    assert 'herald_connections{transport="sse"} 0.0' in (await api.client.get("/metrics")).text


async def test_openapi_lists_the_publish_api(api: Api) -> None:
    paths = (await api.client.get("/openapi.json")).json()["paths"]
    assert {"/api/v1/publish", "/api/v1/publish/batch", "/api/v1/tokens/subscribe"} <= set(paths)


async def test_stats_are_admin_only_and_count_live_connections(api: Api) -> None:
    body = {"channel": "public:a", "event": "e", "data": 1}
    assert (await api.client.post("/api/v1/publish", json=body, headers=KEY)).status_code == 200
    conn = await api.hub.open_connection(user("1"), "websocket")
    refused = await api.client.get("/api/v1/stats", headers=api.token("1"))
    assert refused.status_code == 403
    assert (await api.client.get("/api/v1/stats")).status_code == 401
    response = await api.client.get("/api/v1/stats", headers=api.token("9", role="admin"))
    assert response.status_code == 200, response.text
    assert response.json() == {
        "connections": {"websocket": 1, "sse": 0},
        "subscriptions": 0,
        "published": 1,
        "delivered": {"websocket": 0, "sse": 0},
    }
    api.hub.release_connection(conn)


async def test_405_lists_every_method_of_the_path(api: Api) -> None:
    response = await api.client.put("/api/v1/publish", json={})
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"
