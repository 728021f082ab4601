"""Avatar upload: streamed, typed by content, size-capped, served back."""

from __future__ import annotations

import pytest
from api_helpers import bearer, published, user_with_token

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 64
MB = 1024 * 1024


def _files(context) -> list[str]:
    root = context.avatars.root
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


@pytest.mark.parametrize(
    ("content", "declared", "expected"),
    [
        (PNG, "image/png", "image/png"),
        (JPEG, "image/jpeg", "image/jpeg"),
        (WEBP, "image/webp", "image/webp"),
        (PNG, "image/jpeg", "image/png"),  # the content decides, not the claim
        (JPEG, "application/octet-stream", "image/jpeg"),
    ],
    ids=["png", "jpeg", "webp", "png-claimed-jpeg", "jpeg-as-octet-stream"],
)
async def test_raw_upload_is_stored_and_served(client, context, content, declared, expected):
    user, token = await user_with_token(client)
    response = await client.put(
        "/api/v1/users/me/avatar",
        content=content,
        headers={**bearer(token), "Content-Type": declared},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["avatar_url"].startswith(f"/api/v1/users/{user['id']}/avatar?v=")
    assert body["profile_completion"] == 50
    served = await client.get(body["avatar_url"])  # public: no token
    assert served.status_code == 200
    assert served.headers["content-type"] == expected
    assert served.headers["x-content-type-options"] == "nosniff"
    assert served.content == content


async def test_multipart_upload_is_stored(client, context):
    _, token = await user_with_token(client)
    response = await client.put(
        "/api/v1/users/me/avatar",
        files={"file": ("me.png", PNG, "image/png")},
        data={"note": "ignored"},
        headers=bearer(token),
    )
    assert response.status_code == 200, response.text
    served = await client.get(response.json()["avatar_url"])
    assert served.content == PNG


async def test_multipart_without_a_file_part_is_422(client, context):
    _, token = await user_with_token(client)
    response = await client.put(
        "/api/v1/users/me/avatar",
        files={"other": ("me.png", PNG, "image/png")},
        headers=bearer(token),
    )
    assert response.status_code == 422
    assert _files(context) == []


async def test_malformed_multipart_is_400(client):
    _, token = await user_with_token(client)
    response = await client.put(
        "/api/v1/users/me/avatar",
        content=b"not multipart at all",
        headers={**bearer(token), "Content-Type": "multipart/form-data"},
    )
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("content", "declared"),
    [
        (b"GIF89a" + b"\x00" * 64, "image/png"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>" * 3, "image/png"),
        (b"\x89PN", "image/png"),  # shorter than any signature
    ],
    ids=["gif", "svg", "truncated"],
)
async def test_non_images_are_refused_with_415(client, context, content, declared):
    _, token = await user_with_token(client)
    response = await client.put(
        "/api/v1/users/me/avatar",
        content=content,
        headers={**bearer(token), "Content-Type": declared},
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert _files(context) == []


async def test_unsupported_content_type_header_is_415(client):
    _, token = await user_with_token(client)
    response = await client.put(
        "/api/v1/users/me/avatar",
        content=PNG,
        headers={**bearer(token), "Content-Type": "text/plain"},
    )
    assert response.status_code == 415


async def test_empty_upload_is_422(client, context):
    _, token = await user_with_token(client)
    response = await client.put(
        "/api/v1/users/me/avatar",
        content=b"",
        headers={**bearer(token), "Content-Type": "image/png"},
    )
    assert response.status_code == 422


async def test_exactly_the_limit_is_accepted(client, context):
    _, token = await user_with_token(client)
    content = PNG + b"\x00" * (5 * MB - len(PNG))
    response = await client.put(
        "/api/v1/users/me/avatar",
        content=content,
        headers={**bearer(token), "Content-Type": "image/png"},
    )
    assert response.status_code == 200


async def test_oversized_declared_upload_is_refused_before_reading(client, context):
    _, token = await user_with_token(client)
    consumed = 0

    async def body():
        nonlocal consumed
        for _ in range(100):
            consumed += 1
            yield b"\x00" * MB

    response = await client.put(
        "/api/v1/users/me/avatar",
        content=body(),
        headers={**bearer(token), "Content-Type": "image/png", "Content-Length": str(100 * MB)},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert _files(context) == []


async def test_oversized_streamed_upload_stops_at_the_limit(client, context):
    """Chunked, no Content-Length: the server stops reading just past 5 MB and keeps
    nothing, so a 50 MB body is never read (let alone held) whole."""
    _, token = await user_with_token(client)
    sent = 0

    async def body():
        nonlocal sent
        yield PNG
        for _ in range(50):
            sent += 1
            yield b"\x00" * MB

    response = await client.put(
        "/api/v1/users/me/avatar",
        content=body(),
        headers={**bearer(token), "Content-Type": "image/png"},
    )
    assert response.status_code == 413
    assert sent <= 7
    assert _files(context) == []


async def test_oversized_multipart_upload_is_413(client, context):
    _, token = await user_with_token(client)
    response = await client.put(
        "/api/v1/users/me/avatar",
        files={"file": ("big.png", PNG + b"\x00" * (5 * MB), "image/png")},
        headers=bearer(token),
    )
    assert response.status_code == 413
    assert _files(context) == []


async def test_replacing_and_removing_the_avatar_cleans_up_files(client, context):
    user, token = await user_with_token(client)
    headers = {**bearer(token), "Content-Type": "image/png"}
    first = (await client.put("/api/v1/users/me/avatar", content=PNG, headers=headers)).json()
    second = (await client.put("/api/v1/users/me/avatar", content=PNG, headers=headers)).json()
    assert first["avatar_url"] != second["avatar_url"]
    assert len(_files(context)) == 1
    removed = await client.delete("/api/v1/users/me/avatar", headers=bearer(token))
    assert removed.status_code == 200 and removed.json()["avatar_url"] is None
    assert _files(context) == []
    missing = await client.get(f"/api/v1/users/{user['id']}/avatar")
    assert missing.status_code == 404
    changes = [
        d["changes"]
        for e, d in await published(context, f"user:{user['id']}")
        if e == "user.updated"
    ]
    assert [list(c) for c in changes] == [["avatar_url"]] * 3


async def test_avatar_upload_needs_a_token(client):
    response = await client.put(
        "/api/v1/users/me/avatar", content=PNG, headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 401


async def test_avatar_of_unknown_user_is_404(client):
    response = await client.get("/api/v1/users/00000000-0000-0000-0000-000000000000/avatar")
    assert response.status_code == 404


async def test_multipart_upload_in_tiny_chunks_is_reassembled(client, context):
    """The multipart parser is fed as the body arrives: part headers and data split
    across chunks at every possible place must still give the exact file."""
    _, token = await user_with_token(client)
    boundary = "herald-test-boundary"
    image = JPEG + bytes(range(256)) * 40
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="note"\r\n\r\n'
            "hello\r\n"
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="me.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )

    async def chunks():
        for start in range(0, len(body), 7):
            yield body[start : start + 7]

    response = await client.put(
        "/api/v1/users/me/avatar",
        content=chunks(),
        headers={**bearer(token), "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 200, response.text
    served = await client.get(response.json()["avatar_url"])
    assert served.content == image
    assert served.headers["content-type"] == "image/jpeg"
