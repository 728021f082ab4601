from __future__ import annotations

from api_helpers import bearer, user_with_token


async def test_me_returns_the_signed_in_user(client):
    user, token = await user_with_token(client)
    response = await client.get("/api/v1/users/me", headers=bearer(token))
    assert response.status_code == 200
    assert response.json()["id"] == user["id"]
