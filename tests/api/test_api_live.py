"""The users API on a real deployment: ``herald serve --workers 2`` on real Redis.

Subscribers on both workers (a WebSocket on ``users``, SSE on ``user:{id}``) receive
each event after the change and none for a failed request; suspending a user closes
their connections on both workers within a second and their token is refused after;
the login rate limit holds across workers.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_helpers import PASSWORD, new_user_body
from e2e.helpers import (
    SERVICE_HEADERS,
    HeraldProcess,
    SSEClient,
    WSClient,
    bearer,
    connect_on_nodes,
    pinned_publishers,
    publish_fresh,
    sse_connect,
    ws_connect,
)
from websockets.exceptions import InvalidStatus

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

APP = "api.app:create_app"
FAST_HASHING = {"HERALD_ARGON2_MEMORY_KIB": "1024", "HERALD_ARGON2_TIME_COST": "1"}
ADMIN_PASSWORD = "live admin password"


def _create_admin(herald: HeraldProcess) -> dict[str, str]:
    email = f"root_{uuid.uuid4().hex[:8]}@example.com"
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", "users", "create-admin", "--email", email],
        env={**herald.env, "HERALD_ADMIN_PASSWORD": ADMIN_PASSWORD},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return {"email": email}


@pytest.fixture(scope="module")
def deployment(redis_server) -> Iterator[HeraldProcess]:
    herald = HeraldProcess(
        workers=2,
        redis_url=redis_server.url,
        app=APP,
        env={
            **FAST_HASHING,
            "HERALD_REGISTER_RATE_PER_MINUTE": "6000",
            "HERALD_REGISTER_BURST": "1000",
            "HERALD_LOGIN_RATE_PER_MINUTE": "6000",
            "HERALD_LOGIN_BURST": "1000",
        },
    )
    with herald:
        yield herald


@pytest.fixture(scope="module")
def admin(deployment) -> dict[str, str]:
    return _create_admin(deployment)


async def _login(base_url: str, username: str, password: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=10, trust_env=False) as client:
        response = await client.post(
            "/api/v1/auth/token", data={"username": username, "password": password}
        )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


async def _register(base_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url, timeout=10, trust_env=False) as client:
        response = await client.post("/api/v1/auth/register", json=new_user_body())
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def _call(base_url: str, method: str, path: str, token: str, **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url, timeout=10, trust_env=False) as client:
        return await client.request(method, path, headers=bearer(token), **kw)


async def _ws_events(ws: WSClient, until: str, timeout: float = 5.0) -> list[tuple[str, Any]]:
    """Messages received up to and including the event ``until``."""
    seen: list[tuple[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        obj = await ws.recv_until(lambda o: o.get("op") == "message", deadline - time.monotonic())
        seen.append((obj["event"], obj["data"]))
        if obj["event"] == until:
            return seen


async def _sse_events(sse: SSEClient, until: str, timeout: float = 5.0) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        event = await sse.next(deadline - time.monotonic())
        assert event is not None, f"stream ended; saw {seen}"
        if event.event in ("connected", "ping"):
            continue
        payload = event.json()
        seen.append((event.event, payload.get("data")))
        if event.event == until:
            return seen


async def _close(*groups: dict[str, Any]) -> None:
    for group in groups:
        for client in group.values():
            await client.aclose()


async def test_subscribers_on_both_workers_receive_each_event_after_the_change(deployment, admin):
    base = deployment.base_url
    admin_token = await _login(base, admin["email"], ADMIN_PASSWORD)
    user = await _register(base)
    user_token = await _login(base, user["username"], PASSWORD)
    channel = f"user:{user['id']}"

    async def directory_ws() -> WSClient:
        client = await ws_connect(deployment.ws_url, admin_token)
        await client.subscribe("users")
        return client

    async def own_sse() -> SSEClient:
        return await sse_connect(base, [channel], user_token)

    ws_clients = await connect_on_nodes(directory_ws, 2)
    sse_clients = await connect_on_nodes(own_sse, 2)
    try:
        # A request that fails validation, and one that rolls back: no event. The
        # marker, published afterwards, must be the very next thing everyone sees.
        bad = await _call(base, "PATCH", "/api/v1/users/me", user_token, json={"role": "admin"})
        assert bad.status_code == 422
        clash = await _call(
            base, "PATCH", "/api/v1/users/me", user_token, json={"username": "x" * 2}
        )
        assert clash.status_code == 422
        taken = await _call(
            base,
            "PATCH",
            "/api/v1/users/me",
            user_token,
            json={"email": admin["email"]},
        )
        assert taken.status_code == 409
        marker = uuid.uuid4().hex
        for target in ("users", channel):
            response = await publish_fresh(base, target, "test.marker", marker)
            assert response.status_code == 200, response.text
        for ws in ws_clients.values():
            assert await _ws_events(ws, "test.marker") == [("test.marker", marker)]
        for sse in sse_clients.values():
            assert await _sse_events(sse, "test.marker") == [("test.marker", marker)]

        # A successful change reaches every subscriber, with the changed fields.
        changed = await _call(
            base, "PATCH", "/api/v1/users/me", user_token, json={"full_name": "Live Wire"}
        )
        assert changed.status_code == 200
        for ws in ws_clients.values():
            [(event, data)] = await _ws_events(ws, "user.updated")
            assert data["id"] == user["id"]
            assert data["changes"] == {"full_name": {"old": None, "new": "Live Wire"}}
        for sse in sse_clients.values():
            [(event, data)] = await _sse_events(sse, "user.updated")
            assert data["user"]["full_name"] == "Live Wire"

        # A new registration appears in the directory.
        newcomer = await _register(base)
        for ws in ws_clients.values():
            [(event, data)] = await _ws_events(ws, "user.created")
            assert data["user"]["id"] == newcomer["id"]
    finally:
        await _close(ws_clients, sse_clients)


async def test_suspension_disconnects_the_user_on_both_workers(deployment, admin):
    base = deployment.base_url
    admin_token = await _login(base, admin["email"], ADMIN_PASSWORD)
    user = await _register(base)
    user_token = await _login(base, user["username"], PASSWORD)
    channel = f"user:{user['id']}"

    async def own_ws() -> WSClient:
        client = await ws_connect(deployment.ws_url, user_token)
        await client.subscribe(channel)
        return client

    async def own_sse() -> SSEClient:
        return await sse_connect(base, [channel], user_token)

    ws_clients = await connect_on_nodes(own_ws, 2)
    sse_clients = await connect_on_nodes(own_sse, 2)
    try:
        started = time.monotonic()
        response = await _call(
            base,
            "PATCH",
            f"/api/v1/users/{user['id']}",
            admin_token,
            json={"status": "suspended"},
        )
        assert response.status_code == 200, response.text
        for node, ws in ws_clients.items():
            seen, code = await ws.wait_closed(timeout=3)
            events = [o["event"] for o in seen if o.get("op") == "message"]
            assert events == ["user.status_changed"], (node, seen)
            assert [o["code"] for o in seen if o.get("op") == "bye"] == ["user_disabled"]
            assert code == 4504, (node, code)
        for sse in sse_clients.values():
            changed = await sse.next_named("user.status_changed", timeout=3)
            assert changed.json()["data"]["new"] == "suspended"
            assert (await sse.next_named("disconnect", timeout=3)).json()["code"] == "user_disabled"
        elapsed = time.monotonic() - started
        assert elapsed < 1.5, elapsed  # DESIGN.md: within a second (slack for a busy host)

        # The token is refused afterwards: by the API, the hub's WebSocket and SSE.
        me = await _call(base, "GET", "/api/v1/users/me", user_token)
        assert me.status_code == 401
        with pytest.raises((InvalidStatus, AssertionError)):
            refused = await ws_connect(deployment.ws_url, user_token)
            await refused.aclose()
        with pytest.raises(AssertionError, match="SSE refused: 401"):
            await sse_connect(base, [channel], user_token)
        # Nor can the user log in again.
        async with httpx.AsyncClient(base_url=base, timeout=10, trust_env=False) as client:
            login = await client.post(
                "/api/v1/auth/token", data={"username": user["username"], "password": PASSWORD}
            )
        assert login.status_code == 403
    finally:
        await _close(ws_clients, sse_clients)


async def test_deletion_disconnects_and_announces(deployment, admin):
    base = deployment.base_url
    admin_token = await _login(base, admin["email"], ADMIN_PASSWORD)
    user = await _register(base)
    user_token = await _login(base, user["username"], PASSWORD)
    directory = await ws_connect(deployment.ws_url, admin_token)
    await directory.subscribe("users")
    own = await ws_connect(deployment.ws_url, user_token)
    await own.subscribe(f"user:{user['id']}")
    try:
        response = await _call(base, "DELETE", f"/api/v1/users/{user['id']}", admin_token)
        assert response.status_code == 204
        [(event, data)] = await _ws_events(directory, "user.deleted")
        assert data == {"id": user["id"]}
        seen, code = await own.wait_closed(timeout=3)
        assert [o["event"] for o in seen if o.get("op") == "message"] == ["user.deleted"]
        assert code == 4504
    finally:
        await directory.aclose()
        await own.aclose()


async def test_login_rate_limit_holds_across_workers(redis_server):
    herald = HeraldProcess(
        workers=2,
        redis_url=redis_server.url,
        app=APP,
        env={**FAST_HASHING, "HERALD_LOGIN_RATE_PER_MINUTE": "0.6", "HERALD_LOGIN_BURST": "3"},
    )
    with herald:
        clients = await pinned_publishers(herald.base_url, 2)
        try:
            a, b = clients.values()
            form = {"username": f"nobody_{uuid.uuid4().hex[:6]}", "password": "wrong password"}
            codes = []
            for client in (a, b, a, b):
                response = await client.post("/api/v1/auth/token", data=form)
                codes.append(response.status_code)
            # Three attempts in the shared bucket, whichever worker took them.
            assert codes == [401, 401, 401, 429], codes
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["code"] == "rate_limited"
        finally:
            for client in clients.values():
                await client.aclose()


async def test_api_keys_authenticate_publishing_on_every_worker(deployment, admin):
    base = deployment.base_url
    admin_token = await _login(base, admin["email"], ADMIN_PASSWORD)
    created = await _call(
        base, "POST", "/api/v1/api-keys", admin_token, json={"name": "live", "scopes": ["publish"]}
    )
    assert created.status_code == 201
    key = created.json()["key"]
    clients = await pinned_publishers(base, 2)
    try:
        for client in clients.values():
            response = await client.post(
                "/api/v1/publish",
                json={"channel": "public:live", "event": "e", "data": 1},
                headers=bearer(key),
            )
            assert response.status_code == 200, response.text
        revoked = await _call(
            base, "DELETE", f"/api/v1/api-keys/{created.json()['id']}", admin_token
        )
        assert revoked.status_code == 204
        for client in clients.values():
            response = await client.post(
                "/api/v1/publish",
                json={"channel": "public:live", "event": "e", "data": 1},
                headers=bearer(key),
            )
            assert response.status_code == 401
            # The static service key still works there (the client is fine).
            ok = await client.post(
                "/api/v1/publish",
                json={"channel": "public:live", "event": "e", "data": 1},
                headers=SERVICE_HEADERS,
            )
            assert ok.status_code == 200
    finally:
        for client in clients.values():
            await client.aclose()
