"""API keys: admin-managed, shown once, stored hashed, authenticating the publish API."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from api_helpers import bearer, make_admin
from sqlalchemy import select, update

from api.models import ApiKey
from api.security import hash_api_key


async def _create(client, admin_token, **body):
    payload = {"name": "billing", "scopes": ["publish"], **body}
    response = await client.post("/api/v1/api-keys", json=payload, headers=bearer(admin_token))
    assert response.status_code == 201, response.text
    return response.json()


async def _publish(client, key, channel="public:news"):
    return await client.post(
        "/api/v1/publish",
        json={"channel": channel, "event": "news.posted", "data": {"n": 1}},
        headers=bearer(key),
    )


async def test_create_shows_the_key_once_and_stores_only_its_hash(client, context):
    admin, admin_token = await make_admin(context, client)
    created = await _create(client, admin_token, scopes=["publish", "admin", "publish"])
    key = created["key"]
    assert key.startswith("hk_") and created["prefix"] == key[:11]
    assert created["scopes"] == ["admin", "publish"]
    assert created["created_by_id"] == str(admin.id)
    async with context.db.session() as session:
        record = await session.scalar(select(ApiKey))
    assert record.key_hash == hash_api_key(key)
    assert key not in (record.key_hash, record.prefix)
    listed = await client.get("/api/v1/api-keys", headers=bearer(admin_token))
    assert listed.status_code == 200
    assert [k["id"] for k in listed.json()] == [created["id"]]
    assert key not in listed.text and "key_hash" not in listed.text


@pytest.mark.parametrize(
    "body",
    [
        {"name": "", "scopes": ["publish"]},
        {"name": "x" * 101, "scopes": ["publish"]},
        {"name": "x", "scopes": []},
        {"name": "x", "scopes": ["root"]},
        {"name": "x", "scopes": ["publish"], "expires_in_days": 0},
        {"name": "x", "scopes": ["publish"], "key_hash": "chosen"},
        {"name": "line\nbreak", "scopes": ["publish"]},
    ],
)
async def test_create_refuses_invalid_bodies(client, context, body):
    _, admin_token = await make_admin(context, client)
    response = await client.post("/api/v1/api-keys", json=body, headers=bearer(admin_token))
    assert response.status_code == 422


async def test_key_authenticates_the_publish_api(client, context):
    _, admin_token = await make_admin(context, client)
    key = (await _create(client, admin_token))["key"]
    response = await _publish(client, key)
    assert response.status_code == 200, response.text
    assert response.json()["channel"] == "public:news"
    history = await context.hub.broker.history("public:news")
    assert [p.event for p in history.publications] == ["news.posted"]
    async with context.db.session() as session:
        record = await session.scalar(select(ApiKey))
    assert record.last_used_at is not None


async def test_unknown_and_malformed_keys_are_refused(client, context):
    for key in ("hk_" + "A" * 43, "hk_short", "not-a-key-at-all"):
        response = await _publish(client, key)
        assert response.status_code == 401, key


async def test_revoked_key_is_refused(client, context):
    _, admin_token = await make_admin(context, client)
    created = await _create(client, admin_token)
    assert (await _publish(client, created["key"])).status_code == 200
    response = await client.delete(f"/api/v1/api-keys/{created['id']}", headers=bearer(admin_token))
    assert response.status_code == 204
    assert (await _publish(client, created["key"])).status_code == 401
    again = await client.delete(f"/api/v1/api-keys/{created['id']}", headers=bearer(admin_token))
    assert again.status_code == 204  # idempotent
    assert (await client.get("/api/v1/api-keys", headers=bearer(admin_token))).json() == []
    with_revoked = await client.get(
        "/api/v1/api-keys", params={"include_revoked": "true"}, headers=bearer(admin_token)
    )
    assert with_revoked.json()[0]["revoked_at"] is not None


async def test_revoking_an_unknown_key_is_404(client, context):
    _, admin_token = await make_admin(context, client)
    response = await client.delete(f"/api/v1/api-keys/{uuid.uuid4()}", headers=bearer(admin_token))
    assert response.status_code == 404


async def test_expired_key_is_refused(client, context):
    _, admin_token = await make_admin(context, client)
    created = await _create(client, admin_token, expires_in_days=1)
    assert (await _publish(client, created["key"])).status_code == 200
    async with context.db.session() as session:
        await session.execute(
            update(ApiKey).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        await session.commit()
    assert (await _publish(client, created["key"])).status_code == 401


async def test_admin_scope_lets_a_service_publish_where_admins_may(client, context):
    _, admin_token = await make_admin(context, client)
    admin_key = (await _create(client, admin_token, scopes=["admin"]))["key"]
    assert (await _publish(client, admin_key)).status_code == 200


async def test_api_keys_do_not_authenticate_user_endpoints(client, context):
    _, admin_token = await make_admin(context, client)
    key = (await _create(client, admin_token, scopes=["admin"]))["key"]
    response = await client.get("/api/v1/users", headers=bearer(key))
    assert response.status_code == 401
