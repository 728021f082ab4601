"""/users: own profile, authorisation, admin directory, bulk update, export, delete."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from api_helpers import (
    PASSWORD,
    bearer,
    login,
    make_admin,
    new_user_body,
    published_events,
    register,
    user_with_token,
)
from sqlalchemy import update

from api.models import User

# -- own profile -------------------------------------------------------------------------


async def test_patch_me_changes_only_the_given_fields(client):
    user, token = await user_with_token(client, full_name="Ada", phone="+14155550123")
    response = await client.patch(
        "/api/v1/users/me", json={"full_name": "Ada King"}, headers=bearer(token)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["full_name"] == "Ada King"
    assert body["phone"] == "+14155550123"
    assert body["updated_at"] > user["updated_at"]


async def test_patch_me_clears_nullable_fields(client):
    _, token = await user_with_token(client, full_name="Ada", phone="+14155550123")
    response = await client.patch(
        "/api/v1/users/me", json={"full_name": None, "phone": None}, headers=bearer(token)
    )
    assert response.status_code == 200
    assert response.json()["full_name"] is None and response.json()["phone"] is None


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"email": None},
        {"username": None},
        {"username": "no spaces allowed"},
        {"phone": "12"},
        {"email": "x@mailinator.com"},
        {"email": "x@throwaway.example"},
    ],
)
async def test_patch_me_refuses_invalid_changes(client, body):
    _, token = await user_with_token(client)
    response = await client.patch("/api/v1/users/me", json=body, headers=bearer(token))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"


@pytest.mark.parametrize(
    "body",
    [
        {"role": "admin"},
        {"status": "active"},
        {"is_verified": True},
        {"full_name": "Eve", "role": "admin"},
        {"id": str(uuid.uuid4())},
        {"password_hash": "x"},
        {"created_at": "2020-01-01T00:00:00Z"},
    ],
)
async def test_patch_me_refuses_mass_assignment(client, body):
    user, token = await user_with_token(client, full_name="Mallory")
    response = await client.patch("/api/v1/users/me", json=body, headers=bearer(token))
    assert response.status_code == 422
    me = (await client.get("/api/v1/users/me", headers=bearer(token))).json()
    assert (me["role"], me["status"], me["is_verified"], me["full_name"]) == (
        "user",
        "active",
        False,
        "Mallory",
    )
    assert me["id"] == user["id"]


async def test_patch_me_email_change_clears_verified(client, context):
    user, token = await user_with_token(client)
    async with context.db.session() as session:
        await session.execute(
            update(User).where(User.id == uuid.UUID(user["id"])).values(is_verified=True)
        )
        await session.commit()
    response = await client.patch(
        "/api/v1/users/me", json={"email": "New.Address@Example.com"}, headers=bearer(token)
    )
    assert response.status_code == 200
    assert response.json()["email"] == "new.address@example.com"
    assert response.json()["is_verified"] is False


async def test_patch_me_refuses_taken_email_and_username(client):
    other = await register(client)
    _, token = await user_with_token(client)
    r1 = await client.patch(
        "/api/v1/users/me", json={"email": other["email"].upper()}, headers=bearer(token)
    )
    assert r1.status_code == 409 and r1.json()["error"]["code"] == "email_taken"
    r2 = await client.patch(
        "/api/v1/users/me", json={"username": other["username"].upper()}, headers=bearer(token)
    )
    assert r2.status_code == 409 and r2.json()["error"]["code"] == "username_taken"


async def test_patch_me_may_change_the_case_of_its_own_username(client):
    user, token = await user_with_token(client)
    response = await client.patch(
        "/api/v1/users/me", json={"username": user["username"].upper()}, headers=bearer(token)
    )
    assert response.status_code == 200
    assert response.json()["username"] == user["username"].upper()


async def test_change_password(client):
    user, token = await user_with_token(client)
    tokens = await login(client, user["username"])
    wrong = await client.post(
        "/api/v1/users/me/password",
        json={
            "current_password": "not it at all",
            "new_password": "a brand new one",
            "new_password_confirm": "a brand new one",
        },
        headers=bearer(token),
    )
    assert wrong.status_code == 422
    mismatch = await client.post(
        "/api/v1/users/me/password",
        json={
            "current_password": PASSWORD,
            "new_password": "a brand new one",
            "new_password_confirm": "another new one",
        },
        headers=bearer(token),
    )
    assert mismatch.status_code == 422
    ok = await client.post(
        "/api/v1/users/me/password",
        json={
            "current_password": PASSWORD,
            "new_password": "a brand new one",
            "new_password_confirm": "a brand new one",
        },
        headers=bearer(token),
    )
    assert ok.status_code == 204
    old = await client.post(
        "/api/v1/auth/token", data={"username": user["username"], "password": PASSWORD}
    )
    assert old.status_code == 401
    await login(client, user["username"], "a brand new one")
    # Refresh tokens issued before the change are revoked.
    stale = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    assert stale.status_code == 401


# -- authorisation between users ---------------------------------------------------------


async def test_a_user_cannot_read_another_user(client):
    alice, alice_token = await user_with_token(client)
    bob, _ = await user_with_token(client)
    response = await client.get(f"/api/v1/users/{bob['id']}", headers=bearer(alice_token))
    assert response.status_code == 403
    assert bob["email"] not in response.text
    own = await client.get(f"/api/v1/users/{alice['id']}", headers=bearer(alice_token))
    assert own.status_code == 200


async def test_a_user_cannot_change_or_delete_another_user(client):
    _, alice_token = await user_with_token(client)
    bob, bob_token = await user_with_token(client)
    for method, body in (("PATCH", {"status": "suspended"}), ("DELETE", None)):
        response = await client.request(
            method, f"/api/v1/users/{bob['id']}", json=body, headers=bearer(alice_token)
        )
        assert response.status_code == 403, method
    me = (await client.get("/api/v1/users/me", headers=bearer(bob_token))).json()
    assert me["status"] == "active"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/v1/users", None),
        ("GET", "/api/v1/users/export", None),
        (
            "POST",
            "/api/v1/users/bulk-update",
            {"ids": [str(uuid.uuid4())], "update": {"is_verified": True}},
        ),
        ("PATCH", f"/api/v1/users/{uuid.uuid4()}", {"role": "admin"}),
        ("DELETE", f"/api/v1/users/{uuid.uuid4()}", None),
        ("GET", "/api/v1/api-keys", None),
        ("POST", "/api/v1/api-keys", {"name": "x", "scopes": ["publish"]}),
        ("DELETE", f"/api/v1/api-keys/{uuid.uuid4()}", None),
    ],
)
async def test_admin_routes_refuse_non_admins(client, method, path, body):
    _, token = await user_with_token(client)
    response = await client.request(method, path, json=body, headers=bearer(token))
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "forbidden"
    anonymous = await client.request(method, path, json=body)
    assert anonymous.status_code == 401


async def test_a_moderator_is_not_an_admin(client, context):
    user, _ = await user_with_token(client)
    _, admin_token = await make_admin(context, client)
    await client.patch(
        f"/api/v1/users/{user['id']}", json={"role": "moderator"}, headers=bearer(admin_token)
    )
    token = (await login(client, user["username"]))["access_token"]
    assert (await client.get("/api/v1/users", headers=bearer(token))).status_code == 403


async def test_admin_reads_any_user_and_gets_404_for_unknown(client, context):
    user = await register(client)
    _, admin_token = await make_admin(context, client)
    found = await client.get(f"/api/v1/users/{user['id']}", headers=bearer(admin_token))
    assert found.status_code == 200 and found.json()["email"] == user["email"]
    missing = await client.get(f"/api/v1/users/{uuid.uuid4()}", headers=bearer(admin_token))
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    malformed = await client.get("/api/v1/users/not-a-uuid", headers=bearer(admin_token))
    assert malformed.status_code == 404  # ids are UUIDs: anything else is no resource


# -- admin changes -----------------------------------------------------------------------


async def test_admin_changes_role_status_and_verified(client, context):
    user = await register(client)
    _, admin_token = await make_admin(context, client)
    response = await client.patch(
        f"/api/v1/users/{user['id']}",
        json={"role": "moderator", "status": "pending", "is_verified": True},
        headers=bearer(admin_token),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["role"], body["status"], body["is_verified"], body["is_active"]) == (
        "moderator",
        "pending",
        True,
        False,
    )


@pytest.mark.parametrize(
    "body", [{}, {"role": None}, {"role": "emperor"}, {"status": "gone"}, {"email": "a@b.com"}]
)
async def test_admin_update_refuses_invalid_bodies(client, context, body):
    user = await register(client)
    _, admin_token = await make_admin(context, client)
    response = await client.patch(
        f"/api/v1/users/{user['id']}", json=body, headers=bearer(admin_token)
    )
    assert response.status_code == 422


async def test_admin_cannot_demote_or_suspend_themself(client, context):
    admin, admin_token = await make_admin(context, client)
    for body in ({"role": "user"}, {"status": "suspended"}):
        response = await client.patch(
            f"/api/v1/users/{admin.id}", json=body, headers=bearer(admin_token)
        )
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "admin_protected"
    ok = await client.patch(
        f"/api/v1/users/{admin.id}", json={"is_verified": True}, headers=bearer(admin_token)
    )
    assert ok.status_code == 200


async def test_admin_update_of_unknown_user_is_404(client, context):
    _, admin_token = await make_admin(context, client)
    response = await client.patch(
        f"/api/v1/users/{uuid.uuid4()}", json={"role": "user"}, headers=bearer(admin_token)
    )
    assert response.status_code == 404


async def test_suspension_refuses_existing_tokens(client, context):
    user, token = await user_with_token(client)
    _, admin_token = await make_admin(context, client)
    await client.patch(
        f"/api/v1/users/{user['id']}", json={"status": "suspended"}, headers=bearer(admin_token)
    )
    response = await client.get("/api/v1/users/me", headers=bearer(token))
    assert response.status_code == 401  # the hub's revocation mark refuses the token
    # ... and the hub's own endpoints refuse it too (shared authenticator).
    hub_response = await client.post("/api/v1/tokens/subscribe", headers=bearer(token))
    assert hub_response.status_code == 401


async def test_disabled_user_is_refused_even_without_a_revocation_mark(client, context):
    """The database status is checked on every request, not only the token."""
    user, token = await user_with_token(client)
    async with context.db.session() as session:
        await session.execute(
            update(User).where(User.id == uuid.UUID(user["id"])).values(status="inactive")
        )
        await session.commit()
    response = await client.get("/api/v1/users/me", headers=bearer(token))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "user_disabled"


# -- bulk update -------------------------------------------------------------------------


async def test_bulk_update_reports_each_id(client, context):
    a = await register(client)
    b = await register(client)
    admin, admin_token = await make_admin(context, client)
    missing = str(uuid.uuid4())
    response = await client.post(
        "/api/v1/users/bulk-update",
        json={"ids": [a["id"], missing, b["id"], str(admin.id)], "update": {"status": "inactive"}},
        headers=bearer(admin_token),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    results = {r["id"]: r for r in body["results"]}
    assert [r["id"] for r in body["results"]] == [a["id"], missing, b["id"], str(admin.id)]
    assert results[a["id"]]["ok"] and results[b["id"]]["ok"]
    assert results[missing]["error"]["code"] == "not_found"
    assert results[str(admin.id)]["error"]["code"] == "admin_protected"
    assert (body["succeeded"], body["failed"], body["success_rate"]) == (2, 2, 0.5)
    for user in (a, b):
        found = await client.get(f"/api/v1/users/{user['id']}", headers=bearer(admin_token))
        assert found.json()["status"] == "inactive"


@pytest.mark.parametrize(
    "body",
    [
        {"ids": [], "update": {"status": "active"}},
        {"ids": [str(uuid.uuid4()) for _ in range(101)], "update": {"status": "active"}},
        {"ids": ["not-a-uuid"], "update": {"status": "active"}},
        {"ids": [str(uuid.uuid4())], "update": {}},
        {"ids": [str(uuid.uuid4())], "update": {"email": "x@example.com"}},
        {"ids": ["00000000-0000-0000-0000-000000000001"] * 2, "update": {"status": "active"}},
    ],
)
async def test_bulk_update_refuses_invalid_bodies(client, context, body):
    _, admin_token = await make_admin(context, client)
    response = await client.post(
        "/api/v1/users/bulk-update", json=body, headers=bearer(admin_token)
    )
    assert response.status_code == 422


async def test_bulk_update_accepts_100_ids(client, context):
    _, admin_token = await make_admin(context, client)
    ids = [str(uuid.uuid4()) for _ in range(100)]
    response = await client.post(
        "/api/v1/users/bulk-update",
        json={"ids": ids, "update": {"is_verified": True}},
        headers=bearer(admin_token),
    )
    assert response.status_code == 200
    assert response.json()["failed"] == 100 and response.json()["success_rate"] == 0


# -- delete ------------------------------------------------------------------------------


async def test_admin_deletes_a_user(client, context):
    user, token = await user_with_token(client)
    _, admin_token = await make_admin(context, client)
    response = await client.delete(f"/api/v1/users/{user['id']}", headers=bearer(admin_token))
    assert response.status_code == 204 and response.content == b""
    gone = await client.get(f"/api/v1/users/{user['id']}", headers=bearer(admin_token))
    assert gone.status_code == 404
    again = await client.delete(f"/api/v1/users/{user['id']}", headers=bearer(admin_token))
    assert again.status_code == 404
    assert (await client.get("/api/v1/users/me", headers=bearer(token))).status_code == 401
    # The address is free again.
    await register(client, email=user["email"])


async def test_admins_cannot_be_deleted(client, context):
    admin, admin_token = await make_admin(context, client)
    other = await register(client)
    await client.patch(
        f"/api/v1/users/{other['id']}", json={"role": "admin"}, headers=bearer(admin_token)
    )
    for target in (str(admin.id), other["id"]):
        response = await client.delete(f"/api/v1/users/{target}", headers=bearer(admin_token))
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "admin_protected"
    assert "user.deleted" not in await published_events(context, "users")


# -- listing -----------------------------------------------------------------------------


async def _seed(client, context):
    admin, admin_token = await make_admin(context, client)
    created = [await register(client, full_name=f"Person {i}") for i in range(5)]
    return admin, admin_token, created


async def test_list_users_paginates(client, context):
    _, admin_token, created = await _seed(client, context)
    page1 = (
        await client.get("/api/v1/users", params={"size": 2}, headers=bearer(admin_token))
    ).json()
    assert (page1["total"], page1["pages"], page1["page"], page1["size"]) == (6, 3, 1, 2)
    assert (page1["has_prev"], page1["has_next"]) == (False, True)
    page3 = (
        await client.get(
            "/api/v1/users", params={"size": 2, "page": 3}, headers=bearer(admin_token)
        )
    ).json()
    assert (page3["has_prev"], page3["has_next"], len(page3["items"])) == (True, False, 2)
    beyond = (
        await client.get(
            "/api/v1/users", params={"size": 2, "page": 9}, headers=bearer(admin_token)
        )
    ).json()
    assert beyond["items"] == [] and beyond["total"] == 6
    everyone = (
        await client.get("/api/v1/users", params={"size": 100}, headers=bearer(admin_token))
    ).json()
    ids = [u["id"] for u in everyone["items"]]
    assert len(set(ids)) == 6
    # Default order: newest first.
    assert ids.index(created[-1]["id"]) < ids.index(created[0]["id"])


@pytest.mark.parametrize(
    "params",
    [
        {"size": 0},
        {"size": 101},
        {"page": 0},
        {"role": "emperor"},
        {"status": "gone"},
        {"created_after": "2020-01-01T00:00:00"},  # no time zone
        {"created_after": "2021-01-01T00:00:00Z", "created_before": "2020-01-01T00:00:00Z"},
        {"q": ""},
        {"q": "x" * 101},
        {"q": "nul\x00byte"},
        {"created_before": "0.5"},  # not a Unix timestamp: RFC 3339 only
        {"sort": "password_hash"},
        {"unknown": "1"},
    ],
)
async def test_list_users_refuses_bad_parameters(client, context, params):
    _, admin_token = await make_admin(context, client)
    response = await client.get("/api/v1/users", params=params, headers=bearer(admin_token))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"


async def test_list_users_filters(client, context):
    admin, admin_token, created = await _seed(client, context)
    target = created[2]
    await client.patch(
        f"/api/v1/users/{target['id']}",
        json={"status": "suspended", "is_verified": True},
        headers=bearer(admin_token),
    )

    async def ids(**params):
        response = await client.get("/api/v1/users", params=params, headers=bearer(admin_token))
        assert response.status_code == 200, response.text
        return {u["id"] for u in response.json()["items"]}

    assert await ids(status="suspended") == {target["id"]}
    assert await ids(role="admin") == {str(admin.id)}
    assert await ids(verified_only="true") == {target["id"], str(admin.id)}
    assert await ids(q="PERSON 2") == {target["id"]}
    assert await ids(q=target["username"][5:].upper()) == {target["id"]}
    assert await ids(q="%") == set()  # wildcards are literal
    assert await ids(q="_") == {u["id"] for u in created} | {str(admin.id)}  # in usernames
    now = datetime.now(UTC)
    assert len(await ids(created_after=(now - timedelta(hours=1)).isoformat())) == 6
    assert await ids(created_before=(now - timedelta(hours=1)).isoformat()) == set()
    assert await ids(created_after=(now + timedelta(hours=1)).isoformat()) == set()


async def test_list_users_sorts(client, context):
    _, admin_token, _ = await _seed(client, context)
    response = await client.get(
        "/api/v1/users", params={"sort": "username", "size": 100}, headers=bearer(admin_token)
    )
    names = [u["username"].lower() for u in response.json()["items"]]
    assert names == sorted(names)
    response = await client.get(
        "/api/v1/users", params={"sort": "-email", "size": 100}, headers=bearer(admin_token)
    )
    emails = [u["email"] for u in response.json()["items"]]
    assert emails == sorted(emails, reverse=True)


# -- export ------------------------------------------------------------------------------


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


async def test_export_is_reachable_and_streams_csv(client, context):
    _, admin_token, created = await _seed(client, context)
    response = await client.get("/api/v1/users/export", headers=bearer(admin_token))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = _csv(response.text)
    assert len(rows) == 6
    assert {r["id"] for r in rows} >= {u["id"] for u in created}
    assert "password_hash" not in response.text
    assert rows[0]["created_at"].endswith("+00:00")


async def test_export_honours_filters(client, context):
    _, admin_token, created = await _seed(client, context)
    response = await client.get(
        "/api/v1/users/export",
        params={"q": "person 4", "format": "csv"},
        headers=bearer(admin_token),
    )
    assert [r["id"] for r in _csv(response.text)] == [created[4]["id"]]
    bad = await client.get(
        "/api/v1/users/export", params={"format": "xlsx"}, headers=bearer(admin_token)
    )
    assert bad.status_code == 422


async def test_export_neutralises_spreadsheet_formulas(client, context):
    _, admin_token = await make_admin(context, client)
    await register(client, full_name='=HYPERLINK("http://evil")')
    response = await client.get("/api/v1/users/export", headers=bearer(admin_token))
    names = [r["full_name"] for r in _csv(response.text)]
    assert '\'=HYPERLINK("http://evil")' in names


async def test_export_of_many_users_is_complete(client, context):
    _, admin_token = await make_admin(context, client)
    async with context.db.session() as session:
        now = datetime.now(UTC)
        for i in range(450):
            session.add(
                User(
                    email=f"bulk{i}@example.com",
                    username=f"bulk_{i}",
                    password_hash="x",
                    created_at=now,
                    updated_at=now,
                )
            )
        await session.commit()
    chunks = []
    async with client.stream(
        "GET", "/api/v1/users/export", headers=bearer(admin_token)
    ) as response:
        async for chunk in response.aiter_text():
            chunks.append(chunk)
    rows = _csv("".join(chunks))
    assert len(rows) == 451
    assert len({r["id"] for r in rows}) == 451


async def test_new_user_body_helper_is_valid():
    body = new_user_body()
    assert body["password"] == body["password_confirm"] == PASSWORD


async def test_filter_dates_outside_the_utc_range_are_a_validation_error(client, context):
    # Year 1 at +00:01 is before year 1 in UTC: refused, not a database overflow.
    _, admin_token = await make_admin(context, client)
    for path in ("/api/v1/users", "/api/v1/users/export"):
        response = await client.get(
            path,
            params={"created_after": "0001-01-01T00:00:00+00:01"},
            headers=bearer(admin_token),
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "validation_error"
