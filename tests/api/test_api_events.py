"""Events: published after the commit, on ``user:{id}`` and ``users``, never for a
request that failed validation or rolled back. (What happens when the broker fails is
in test_api_outbox.py.)"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from api_helpers import bearer, make_admin, new_user_body, published, register, user_with_token
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from api.events import Event
from api.models import User
from api.outbox import HubSink


class CommitCheckingSink:
    """Wraps the real sink the outbox relay delivers to; before passing each event on,
    reads the database through a separate connection and records whether the change it
    announces is committed."""

    def __init__(self, hub: Any) -> None:
        self.inner = HubSink(hub)
        self.hub = hub
        self.app: Any = None
        self.seen: list[tuple[str, str, bool]] = []
        self.revoked: list[str] = []

    async def publish(self, events: Sequence[Event]) -> None:
        context = self.app.state.api
        for event in events:
            user_id = uuid.UUID(event.data["id"])
            async with context.db.session() as session:
                row = await session.scalar(select(User).where(User.id == user_id))
            if event.event == "user.deleted":
                committed = row is None
            elif event.event == "user.status_changed":
                committed = row is not None and row.status.value == event.data["new"]
            else:
                committed = row is not None and all(
                    _committed_value(row, field) == change["new"]
                    for field, change in event.data.get("changes", {}).items()
                )
            self.seen.append((event.channel, event.event, committed))
        await self.inner.publish(events)

    async def revoke_user(self, user_id: str, not_before: float) -> None:
        self.revoked.append(user_id)
        await self.inner.revoke_user(user_id, not_before)


def _committed_value(row: User, field: str) -> Any:
    if field == "avatar_url":
        from api.schemas import UserRead

        return UserRead.model_validate(row).avatar_url
    value = getattr(row, field)
    return getattr(value, "value", value)


@pytest.fixture
def checking() -> list[CommitCheckingSink]:
    return []


@pytest.fixture
def sink_factory(checking):
    def build(hub):
        sink = CommitCheckingSink(hub)
        checking.append(sink)
        return sink

    return build


@pytest.fixture
def recorder(app, checking) -> CommitCheckingSink:
    checking[0].app = app
    return checking[0]


async def test_created_is_published_on_both_channels_after_commit(client, context, recorder):
    user = await register(client)
    assert recorder.seen == [
        (f"user:{user['id']}", "user.created", True),
        ("users", "user.created", True),
    ]
    [(event, data)] = await published(context, f"user:{user['id']}")
    assert event == "user.created"
    assert data["user"]["email"] == user["email"]
    assert "password" not in str(data) and "hash" not in str(data)
    assert await published(context, "users") == [(event, data)]


async def test_updated_carries_the_changed_fields(client, context, recorder):
    user, token = await user_with_token(client, full_name="Ada")
    response = await client.patch(
        "/api/v1/users/me",
        json={"full_name": "Ada King", "phone": None},  # phone unchanged (already null)
        headers=bearer(token),
    )
    events = await published(context, f"user:{user['id']}")
    assert [e for e, _ in events] == ["user.created", "user.updated"]
    data = events[1][1]
    assert data["changes"] == {"full_name": {"old": "Ada", "new": "Ada King"}}
    assert data["user"]["full_name"] == "Ada King"
    # The event is built after the change is written: it carries the new updated_at.
    assert data["user"]["updated_at"] == response.json()["updated_at"]
    assert data["user"]["updated_at"] != events[0][1]["user"]["updated_at"]
    assert all(committed for _, _, committed in recorder.seen)


async def test_no_event_when_nothing_changes(client, context, recorder):
    user, token = await user_with_token(client, full_name="Ada")
    response = await client.patch(
        "/api/v1/users/me", json={"full_name": "Ada"}, headers=bearer(token)
    )
    assert response.status_code == 200
    assert [e for e, _ in await published(context, f"user:{user['id']}")] == ["user.created"]


async def test_status_change_publishes_old_and_new_then_revokes(client, context, recorder):
    user, token = await user_with_token(client)
    _, admin_token = await make_admin(context, client)
    recorder.seen.clear()
    response = await client.patch(
        f"/api/v1/users/{user['id']}",
        json={"status": "suspended", "role": "guest"},
        headers=bearer(admin_token),
    )
    assert response.status_code == 200
    events = dict(await published(context, f"user:{user['id']}"))
    assert events["user.status_changed"]["old"] == "active"
    assert events["user.status_changed"]["new"] == "suspended"
    assert events["user.updated"]["changes"] == {"role": {"old": "user", "new": "guest"}}
    assert {e for _, e, _ in recorder.seen} == {"user.updated", "user.status_changed"}
    assert all(committed for _, _, committed in recorder.seen)
    assert recorder.revoked == [user["id"]]
    # The hub recorded the revocation: tokens issued before now are refused everywhere.
    assert await context.hub.broker.get_user_not_before(user["id"]) is not None
    assert (await client.get("/api/v1/users/me", headers=bearer(token))).status_code == 401


async def test_verifying_a_user_does_not_revoke_their_sessions(client, context, recorder):
    user, token = await user_with_token(client)
    _, admin_token = await make_admin(context, client)
    await client.patch(
        f"/api/v1/users/{user['id']}", json={"is_verified": True}, headers=bearer(admin_token)
    )
    assert recorder.revoked == []
    assert (await client.get("/api/v1/users/me", headers=bearer(token))).status_code == 200


async def test_reactivation_does_not_revive_old_tokens(client, context, recorder):
    user, token = await user_with_token(client)
    _, admin_token = await make_admin(context, client)
    url = f"/api/v1/users/{user['id']}"
    await client.patch(url, json={"status": "suspended"}, headers=bearer(admin_token))
    await client.patch(url, json={"status": "active"}, headers=bearer(admin_token))
    assert recorder.revoked == [user["id"]]  # only leaving "active" revokes
    assert (await client.get("/api/v1/users/me", headers=bearer(token))).status_code == 401
    fresh = await client.post(
        "/api/v1/auth/token",
        data={"username": user["username"], "password": "correct horse battery"},
    )
    me = await client.get("/api/v1/users/me", headers=bearer(fresh.json()["access_token"]))
    assert me.status_code == 200


async def test_delete_publishes_deleted_after_commit_and_revokes(client, context, recorder):
    user = await register(client)
    _, admin_token = await make_admin(context, client)
    await client.delete(f"/api/v1/users/{user['id']}", headers=bearer(admin_token))
    assert (f"user:{user['id']}", "user.deleted", True) in recorder.seen
    assert ("users", "user.deleted", True) in recorder.seen
    assert recorder.revoked == [user["id"]]
    events = await published(context, "users")
    assert events[-1] == ("user.deleted", {"id": user["id"]})


async def test_bulk_update_publishes_for_each_changed_user(client, context, recorder):
    a = await register(client)
    b = await register(client)
    _, admin_token = await make_admin(context, client)
    recorder.seen.clear()
    await client.post(
        "/api/v1/users/bulk-update",
        json={"ids": [a["id"], b["id"], str(uuid.uuid4())], "update": {"status": "suspended"}},
        headers=bearer(admin_token),
    )
    changed = [(c, e) for c, e, ok in recorder.seen if ok]
    assert (f"user:{a['id']}", "user.status_changed") in changed
    assert (f"user:{b['id']}", "user.status_changed") in changed
    assert len(recorder.seen) == 4
    assert sorted(recorder.revoked) == sorted([a["id"], b["id"]])


async def test_no_event_for_a_request_that_failed_validation(client, context, recorder):
    user, token = await user_with_token(client)
    _, admin_token = await make_admin(context, client)
    before = await published(context, "users")
    recorder.seen.clear()
    responses = [
        await client.post("/api/v1/auth/register", json=new_user_body(accept_terms=False)),
        await client.patch("/api/v1/users/me", json={"role": "admin"}, headers=bearer(token)),
        await client.patch(
            f"/api/v1/users/{user['id']}", json={"status": "gone"}, headers=bearer(admin_token)
        ),
    ]
    assert [r.status_code for r in responses] == [422, 422, 422]
    assert recorder.seen == [] and recorder.revoked == []
    assert await published(context, "users") == before


async def test_no_event_for_a_change_that_rolled_back(client, context, recorder):
    taken = await register(client)
    user, token = await user_with_token(client)
    before = await published(context, "users")
    recorder.seen.clear()
    duplicate = await client.post("/api/v1/auth/register", json=new_user_body(email=taken["email"]))
    conflict = await client.patch(
        "/api/v1/users/me", json={"username": taken["username"]}, headers=bearer(token)
    )
    assert (duplicate.status_code, conflict.status_code) == (409, 409)
    assert recorder.seen == []
    assert await published(context, "users") == before
    me = await client.get("/api/v1/users/me", headers=bearer(token))
    assert me.json()["username"] == user["username"]


async def test_no_event_when_the_commit_fails(client, context, recorder, monkeypatch):
    user, token = await user_with_token(client)
    recorder.seen.clear()

    async def failing_commit(self):
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    with monkeypatch.context() as patch:
        patch.setattr(AsyncSession, "commit", failing_commit)
        response = await client.patch(
            "/api/v1/users/me", json={"full_name": "Never Saved"}, headers=bearer(token)
        )
    # The database failed: 503 (retry), no internals in the answer, and no event.
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "unavailable"
    assert response.headers["retry-after"] == "1"
    assert "disk" not in response.text and "COMMIT" not in response.text
    assert recorder.seen == []
    assert [e for e, _ in await published(context, f"user:{user['id']}")] == ["user.created"]
    me = await client.get("/api/v1/users/me", headers=bearer(token))
    assert me.json()["full_name"] is None
