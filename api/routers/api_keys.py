"""``/api/v1/api-keys``: service credentials for the publish API (admin only)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from ..deps import AdminUser, SessionDep
from ..schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyRead
from ..services import api_keys
from .responses import AUTHENTICATED, errors

router = APIRouter(prefix="/api/v1/api-keys", tags=["api keys"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create an API key (admin)",
    description="The key is in the response this once; only its hash is stored. Send it "
    "as `Authorization: Bearer <key>` to `POST /api/v1/publish` (scope `publish`); "
    "scope `admin` makes the service an admin in the hub.",
    responses=errors(*AUTHENTICATED),
)
async def create_api_key(
    body: ApiKeyCreate, admin: AdminUser, session: SessionDep
) -> ApiKeyCreated:
    record, secret = await api_keys.create(session=session, actor=admin, api_key_create=body)
    return ApiKeyCreated.model_validate(
        {**ApiKeyRead.model_validate(record).model_dump(), "key": secret}
    )


@router.get("", summary="List API keys (admin)", responses=errors(*AUTHENTICATED))
async def list_api_keys(
    admin: AdminUser, session: SessionDep, include_revoked: bool = False
) -> list[ApiKeyRead]:
    records = await api_keys.list_keys(session=session, include_revoked=include_revoked)
    return [ApiKeyRead.model_validate(record) for record in records]


@router.delete(
    "/{key_id:uuid}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Revoke an API key (admin)",
    description="Refused from the next request on, on every worker. Idempotent.",
    responses=errors(*AUTHENTICATED, 404),
)
async def revoke_api_key(key_id: uuid.UUID, admin: AdminUser, session: SessionDep) -> None:
    await api_keys.revoke(session=session, key_id=key_id)
