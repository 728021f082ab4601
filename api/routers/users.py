"""``/api/v1/users``: own profile, avatar, and the admin directory.

Fixed paths (``/me``, ``/export``, ``/bulk-update``) are declared before
``/{user_id}`` so that they are always reachable.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import FileResponse, StreamingResponse

from ..deps import (
    AdminUser,
    AvatarsDep,
    ContextDep,
    CurrentUser,
    PasswordsDep,
    PublisherDep,
    SessionDep,
)
from ..errors import NotFound, PayloadTooLarge, UnsupportedMediaType
from ..schemas import (
    BulkUpdate,
    BulkUpdateResult,
    ExportQuery,
    PasswordChange,
    UserAdminUpdate,
    UserPage,
    UserQuery,
    UserRead,
    UserUpdate,
)
from ..services import users
from ..services.export import users_csv
from ..storage import AVATAR_TYPES, MAX_FORM_OVERHEAD, multipart_file
from .responses import AUTHENTICATED, errors

router = APIRouter(prefix="/api/v1/users", tags=["users"])

_BINARY = {"schema": {"type": "string", "format": "binary"}}
AVATAR_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The image, either as the raw body (`Content-Type: image/png`, "
        "`image/jpeg` or `image/webp`) or as the `file` part of a `multipart/form-data` "
        "form. The type is decided by the content's magic bytes; at most 5 MB.",
        "content": {
            **{media: _BINARY for media in AVATAR_TYPES},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
        },
    }
}


# -- own account -------------------------------------------------------------------------


@router.get("/me", summary="The signed-in user", responses=errors(*AUTHENTICATED))
async def read_me(user: CurrentUser) -> UserRead:
    return UserRead.model_validate(user)


@router.patch(
    "/me",
    summary="Change your own profile",
    description="E-mail, username, full name, phone; at least one. Role, status and the "
    "verified flag cannot be set here (422). Publishes `user.updated` with the changes.",
    responses=errors(*AUTHENTICATED, 409),
)
async def update_me(
    user_update: UserUpdate,
    user: CurrentUser,
    context: ContextDep,
    session: SessionDep,
    publisher: PublisherDep,
) -> UserRead:
    updated = await users.update_profile(
        session=session,
        publisher=publisher,
        user=user,
        user_update=user_update,
        disposable_domains=context.disposable_domains,
    )
    return UserRead.model_validate(updated)


@router.post(
    "/me/password",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Change your password",
    description="Revokes every refresh token of the account.",
    responses=errors(*AUTHENTICATED),
)
async def change_password(
    body: PasswordChange, user: CurrentUser, session: SessionDep, passwords: PasswordsDep
) -> None:
    await users.change_password(
        session=session,
        passwords=passwords,
        user=user,
        current_password=body.current_password,
        new_password=body.new_password,
    )


@router.put(
    "/me/avatar",
    summary="Upload your avatar (JPEG, PNG or WebP, at most 5 MB)",
    description="Streamed to disk as it arrives, never held in memory whole.",
    openapi_extra=AVATAR_BODY,
    responses=errors(*AUTHENTICATED, 400, 413, 415),
)
async def upload_avatar(
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    publisher: PublisherDep,
    avatars: AvatarsDep,
) -> UserRead:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > avatars.max_bytes + MAX_FORM_OVERHEAD:
        raise PayloadTooLarge(f"avatar is larger than {avatars.max_bytes} bytes")
    content_type = request.headers.get("content-type", "")
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        chunks = multipart_file(request.stream(), content_type)
    elif media_type in AVATAR_TYPES or media_type == "application/octet-stream":
        chunks = request.stream()
    else:
        raise UnsupportedMediaType(
            "send the image as image/jpeg, image/png, image/webp or multipart/form-data"
        )
    stored = await avatars.save(chunks)
    updated = await users.set_avatar(
        session=session, publisher=publisher, avatars=avatars, user=user, stored=stored
    )
    return UserRead.model_validate(updated)


@router.delete("/me/avatar", summary="Remove your avatar", responses=errors(*AUTHENTICATED))
async def delete_avatar(
    user: CurrentUser, session: SessionDep, publisher: PublisherDep, avatars: AvatarsDep
) -> UserRead:
    updated = await users.set_avatar(
        session=session, publisher=publisher, avatars=avatars, user=user, stored=None
    )
    return UserRead.model_validate(updated)


# -- admin directory (fixed paths first) -------------------------------------------------


@router.get(
    "",
    summary="List users (admin)",
    description="Paginated and filtered; `created_after` is inclusive, `created_before` "
    "exclusive, and must be later.",
    responses=errors(*AUTHENTICATED),
)
async def list_users(
    query: Annotated[UserQuery, Query()], admin: AdminUser, session: SessionDep
) -> UserPage:
    return await users.list_users(session=session, query=query)


@router.get(
    "/export",
    summary="Export users as CSV (admin)",
    description="Streamed; honours the same filters as the list.",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "CSV, one header row then one row per user",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        },
        **errors(*AUTHENTICATED),
    },
)
async def export_users(
    query: Annotated[ExportQuery, Query()], admin: AdminUser, context: ContextDep
) -> StreamingResponse:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(
        await users_csv(context.db, query),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="users-{stamp}.csv"',
            "Cache-Control": "no-store",
        },
    )


@router.post(
    "/bulk-update",
    summary="Apply one change to up to 100 users (admin)",
    description="Each id gets its own result; the change is committed for those that "
    "succeeded. Events as for `PATCH /users/{id}`.",
    responses=errors(*AUTHENTICATED),
)
async def bulk_update(
    body: BulkUpdate, admin: AdminUser, session: SessionDep, publisher: PublisherDep
) -> BulkUpdateResult:
    return await users.bulk_update(
        session=session, publisher=publisher, actor=admin, ids=body.ids, change=body.update
    )


# -- one user ----------------------------------------------------------------------------


@router.get(
    "/{user_id:uuid}",
    summary="Read a user (yourself, or anyone as an admin)",
    responses=errors(*AUTHENTICATED, 404),
)
async def read_user(user_id: uuid.UUID, user: CurrentUser, session: SessionDep) -> UserRead:
    found = await users.read_user(session=session, actor=user, user_id=user_id)
    return UserRead.model_validate(found)


@router.patch(
    "/{user_id:uuid}",
    summary="Change a user's role, status or verified flag (admin)",
    description="Publishes `user.updated` and/or `user.status_changed`. A new role, or a "
    "status other than `active`, closes the user's live connections on every worker and "
    "revokes their tokens. Admins cannot change their own role or status.",
    responses=errors(*AUTHENTICATED, 404),
)
async def admin_update_user(
    user_id: uuid.UUID,
    change: UserAdminUpdate,
    admin: AdminUser,
    session: SessionDep,
    publisher: PublisherDep,
) -> UserRead:
    updated = await users.admin_update(
        session=session, publisher=publisher, actor=admin, user_id=user_id, change=change
    )
    return UserRead.model_validate(updated)


@router.delete(
    "/{user_id:uuid}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a user (admin; admins cannot be deleted)",
    description="Publishes `user.deleted`, closes the user's live connections on every "
    "worker and revokes their tokens.",
    responses=errors(*AUTHENTICATED, 404),
)
async def delete_user(
    user_id: uuid.UUID,
    admin: AdminUser,
    session: SessionDep,
    publisher: PublisherDep,
    avatars: AvatarsDep,
) -> None:
    await users.delete_user(session=session, publisher=publisher, avatars=avatars, user_id=user_id)


@router.get(
    "/{user_id:uuid}/avatar",
    summary="A user's avatar image (public)",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The image",
            "content": {media: _BINARY for media in AVATAR_TYPES},
        },
        **errors(404),
    },
)
async def read_avatar(user_id: uuid.UUID, session: SessionDep, avatars: AvatarsDep) -> FileResponse:
    user = await users.get_user(session=session, user_id=user_id)
    if not user.avatar_file or not user.avatar_content_type:
        raise NotFound("this user has no avatar")
    path = avatars.path_of(user.avatar_file)
    if not path.is_file():
        raise NotFound("this user has no avatar")
    return FileResponse(
        path,
        media_type=user.avatar_content_type,
        headers={
            "Cache-Control": "public, max-age=300",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'",
        },
    )
