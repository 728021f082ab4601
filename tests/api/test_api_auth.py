"""Registration, login, refresh and logout: success and failure paths."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from api_helpers import PASSWORD, bearer, login, new_user_body, register, user_with_token
from sqlalchemy import func, select

from api.app import UsersApi
from api.models import RefreshToken, User
from hub.app import create_app as create_hub_app


async def _user_count(context) -> int:
    async with context.db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(User)) or 0)


# -- registration ------------------------------------------------------------------------


async def test_register_creates_an_active_unverified_user(client):
    body = new_user_body(full_name="  Ada Lovelace ", phone="+44 20 7946 0958")
    body["email"] = "Ada.L@Example.COM"
    response = await client.post("/api/v1/auth/register", json=body)
    assert response.status_code == 201, response.text
    user = response.json()
    assert user["email"] == "ada.l@example.com"
    assert user["full_name"] == "Ada Lovelace"
    assert user["phone"] == "+442079460958"
    assert user["role"] == "user"
    assert user["status"] == "active"
    assert user["is_active"] is True
    assert user["is_verified"] is False
    assert user["profile_completion"] == 67  # email, username, name, phone of six
    assert user["created_at"].endswith("Z")
    assert response.headers["location"] == f"/api/v1/users/{user['id']}"
    assert "password" not in response.text and "hash" not in response.text


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"username": "ab"}, "username"),
        ({"username": "has space"}, "username"),
        ({"username": "x" * 51}, "username"),
        ({"username": "tëst"}, "username"),
        ({"email": "not-an-email"}, "email"),
        ({"email": "nul\x00@example.com"}, "email"),
        ({"email": "someone@mailinator.com"}, "email"),
        ({"email": "someone@sub.yopmail.com"}, "email"),
        ({"phone": "0123"}, "phone"),
        ({"phone": "+1 555"}, "phone"),
        ({"full_name": "   "}, "full_name"),
        ({"full_name": "bad\x00name"}, "full_name"),
        ({"password": "short", "password_confirm": "short"}, "password"),
        ({"password": "p" * 101, "password_confirm": "p" * 101}, "password"),
        ({"accept_terms": False}, "accept_terms"),
        ({"accept_terms": 1}, "accept_terms"),  # a boolean, not something truthy
        ({"role": "admin"}, "role"),
        ({"status": "active"}, "status"),
        ({"is_verified": True}, "is_verified"),
    ],
)
async def test_register_refuses_invalid_input(client, context, overrides, field):
    response = await client.post("/api/v1/auth/register", json=new_user_body(**overrides))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["request_id"] == response.headers["x-request-id"]
    assert any(field in detail["loc"] for detail in error["details"]), error
    assert await _user_count(context) == 0


async def test_register_refuses_mismatched_password_confirmation(client):
    body = new_user_body(password_confirm="something else entirely")
    response = await client.post("/api/v1/auth/register", json=body)
    assert response.status_code == 422
    assert "do not match" in response.text
    assert PASSWORD not in response.text  # never echoed


async def test_register_refuses_configured_disposable_domains(client):
    response = await client.post(
        "/api/v1/auth/register", json=new_user_body(email="me@throwaway.example")
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["loc"] == ["body", "email"]


async def test_register_refuses_an_email_taken_in_another_case(client, context):
    await register(client, email="grace@example.com")
    response = await client.post(
        "/api/v1/auth/register", json=new_user_body(email="GRACE@example.com")
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "email_taken"
    assert await _user_count(context) == 1


async def test_register_refuses_a_username_taken_in_another_case(client, context):
    await register(client, username="Grace_H")
    response = await client.post("/api/v1/auth/register", json=new_user_body(username="grace_h"))
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "username_taken"
    assert await _user_count(context) == 1


async def test_register_concurrent_duplicates_give_one_201_and_one_409(client, context):
    body = new_user_body()
    other = {**new_user_body(), "email": body["email"].upper()}
    first, second = await asyncio.gather(
        client.post("/api/v1/auth/register", json=body),
        client.post("/api/v1/auth/register", json=other),
    )
    assert sorted([first.status_code, second.status_code]) == [201, 409]
    loser = first if first.status_code == 409 else second
    assert loser.json()["error"]["code"] == "email_taken"
    assert await _user_count(context) == 1


async def test_register_many_concurrent_duplicates_leave_one_row(client, context):
    email = new_user_body()["email"]
    responses = await asyncio.gather(
        *(
            client.post("/api/v1/auth/register", json={**new_user_body(), "email": email})
            for _ in range(6)
        )
    )
    assert sorted(r.status_code for r in responses) == [201] + [409] * 5
    assert await _user_count(context) == 1


# -- login -------------------------------------------------------------------------------


async def test_login_by_username_or_email_in_any_case(client):
    user = await register(client)
    for name in (user["username"], user["username"].upper(), user["email"].upper()):
        tokens = await login(client, name)
        assert tokens["token_type"] == "bearer"
        assert tokens["expires_in"] > 0 and tokens["refresh_expires_in"] > tokens["expires_in"]
    me = await client.get("/api/v1/users/me", headers=bearer(tokens["access_token"]))
    assert me.json()["last_login_at"] is not None


async def test_login_response_is_not_cached(client):
    user = await register(client)
    response = await client.post(
        "/api/v1/auth/token", data={"username": user["username"], "password": PASSWORD}
    )
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("username", ["known", "nobody_here", "nul\x00byte", " "])
async def test_login_refuses_wrong_credentials_alike(client, username):
    await register(client, username="known")
    response = await client.post(
        "/api/v1/auth/token", data={"username": username, "password": "wrong password"}
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_credentials"
    assert response.headers["www-authenticate"] == "Bearer"


async def test_login_needs_the_form_fields(client):
    response = await client.post("/api/v1/auth/token", data={"username": "x"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"


async def test_login_refuses_a_suspended_user(client, context):
    from api_helpers import make_admin

    user = await register(client)
    _, admin_token = await make_admin(context, client)
    r = await client.patch(
        f"/api/v1/users/{user['id']}", json={"status": "suspended"}, headers=bearer(admin_token)
    )
    assert r.status_code == 200
    response = await client.post(
        "/api/v1/auth/token", data={"username": user["username"], "password": PASSWORD}
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "user_disabled"


async def test_requests_without_or_with_bad_tokens_get_401(client):
    assert (await client.get("/api/v1/users/me")).status_code == 401
    for header in ("Bearer nonsense", "Bearer eyJ.a.b", "Basic abc", "Bearer hk_" + "a" * 43):
        response = await client.get("/api/v1/users/me", headers={"Authorization": header})
        assert response.status_code == 401, header
        assert response.json()["error"]["code"] == "unauthorized"


async def test_refresh_token_is_not_an_access_token(client):
    user = await register(client)
    tokens = await login(client, user["username"])
    response = await client.get("/api/v1/users/me", headers=bearer(tokens["refresh_token"]))
    assert response.status_code == 401


async def test_token_of_a_deleted_user_is_refused(client, context):
    from api_helpers import make_admin

    user, token = await user_with_token(client)
    _, admin_token = await make_admin(context, client)
    assert (
        await client.delete(f"/api/v1/users/{user['id']}", headers=bearer(admin_token))
    ).status_code == 204
    response = await client.get("/api/v1/users/me", headers=bearer(token))
    assert response.status_code == 401


# -- refresh and logout ------------------------------------------------------------------


async def test_refresh_rotates_the_pair(client):
    user = await register(client)
    first = await login(client, user["username"])
    response = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}
    )
    assert response.status_code == 200, response.text
    second = response.json()
    assert second["refresh_token"] != first["refresh_token"]
    me = await client.get("/api/v1/users/me", headers=bearer(second["access_token"]))
    assert me.status_code == 200


async def test_refresh_token_reuse_revokes_the_family(client):
    user = await register(client)
    first = await login(client, user["username"])
    second = (
        await client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    ).json()
    replay = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}
    )
    assert replay.status_code == 401
    # The legitimate holder's newer token is now revoked too.
    after = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": second["refresh_token"]}
    )
    assert after.status_code == 401
    # Another login (another family) is untouched.
    other = await login(client, user["username"])
    ok = await client.post("/api/v1/auth/refresh", json={"refresh_token": other["refresh_token"]})
    assert ok.status_code == 200


async def test_concurrent_refreshes_with_one_token_give_one_pair(client):
    user = await register(client)
    tokens = await login(client, user["username"])
    responses = await asyncio.gather(
        *(
            client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
            for _ in range(4)
        )
    )
    assert sorted(r.status_code for r in responses).count(200) == 1


@pytest.mark.parametrize("token", ["", "garbage", "eyJhbGciOiJIUzI1NiJ9.e30.x"])
async def test_refresh_refuses_invalid_tokens(client, token):
    response = await client.post("/api/v1/auth/refresh", json={"refresh_token": token})
    assert response.status_code in (401, 422)
    assert response.json()["error"]["code"] in ("unauthorized", "validation_error")


async def test_refresh_refuses_an_access_token(client):
    user = await register(client)
    tokens = await login(client, user["username"])
    response = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": tokens["access_token"]}
    )
    assert response.status_code == 401


async def test_refresh_refuses_a_suspended_user(client, context):
    from api_helpers import make_admin

    user = await register(client)
    tokens = await login(client, user["username"])
    _, admin_token = await make_admin(context, client)
    await client.patch(
        f"/api/v1/users/{user['id']}", json={"status": "inactive"}, headers=bearer(admin_token)
    )
    response = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    assert response.status_code == 401
    async with context.db.session() as session:
        records = list(await session.scalars(select(RefreshToken)))
    assert records and all(
        r.revoked_at is not None for r in records if str(r.user_id) == user["id"]
    )


async def test_logout_revokes_the_refresh_token(client):
    user = await register(client)
    tokens = await login(client, user["username"])
    response = await client.post(
        "/api/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]}
    )
    assert response.status_code == 204
    again = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    assert again.status_code == 401
    bad = await client.post("/api/v1/auth/logout", json={"refresh_token": "garbage"})
    assert bad.status_code == 401


# -- rate limits -------------------------------------------------------------------------


@pytest.fixture
def limited_settings(api_settings):
    return api_settings.model_copy(
        update={
            "login_rate_per_minute": 1.0,
            "login_burst": 3,
            "register_rate_per_minute": 1.0,
            "register_burst": 2,
        }
    )


@pytest.fixture
async def limited_client(settings, limited_settings):
    application = create_hub_app(settings, extensions=[UsersApi(limited_settings)])
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://herald.test") as c:
            yield c


async def test_login_is_rate_limited_with_retry_after(limited_client):
    form = {"username": "someone", "password": "whatever1"}
    codes = []
    for _ in range(4):
        response = await limited_client.post("/api/v1/auth/token", data=form)
        codes.append(response.status_code)
    assert codes == [401, 401, 401, 429]
    assert response.json()["error"]["code"] == "rate_limited"
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-limit"] == "3"
    assert response.headers["x-ratelimit-remaining"] == "0"


async def test_registration_is_rate_limited(limited_client):
    codes = []
    for _ in range(3):
        response = await limited_client.post("/api/v1/auth/register", json=new_user_body())
        codes.append(response.status_code)
    assert codes == [201, 201, 429]
    assert "retry-after" in response.headers


async def test_successful_responses_carry_rate_limit_headers(limited_client):
    response = await limited_client.post("/api/v1/auth/register", json=new_user_body())
    assert response.headers["x-ratelimit-limit"] == "2"
    assert response.headers["x-ratelimit-remaining"] == "1"
