"""Request and response schemas (Pydantic v2).

Input models forbid unknown fields, so a client cannot smuggle ``role`` or ``status``
into ``PATCH /users/me`` (mass assignment): it gets a 422 naming the field.
"""

from __future__ import annotations

import math
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    computed_field,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from .models import ApiKeyScope, Role, UserStatus
from .validation import Email, FullName, Password, Phone, Username

AVATAR_PATH = "/api/v1/users/{id}/avatar"
PROFILE_FIELDS = 6  # email, username, full name, phone, avatar, verified

_INPUT = ConfigDict(extra="forbid", str_strip_whitespace=False)

USER_EXAMPLE: dict[str, Any] = {
    "id": "0b8f9a53-4f53-4c39-9d4d-3e3f0c3f1c11",
    "email": "ada@example.com",
    "username": "ada_l",
    "full_name": "Ada Lovelace",
    "phone": "+14155550123",
    "role": "user",
    "status": "active",
    "is_verified": False,
    "avatar_url": None,
    "created_at": "2026-01-31T09:30:00Z",
    "updated_at": "2026-01-31T09:30:00Z",
    "last_login_at": None,
    "is_active": True,
    "profile_completion": 67,
}


# -- users -------------------------------------------------------------------------------


class UserCreate(BaseModel):
    """Registration. The password is checked against its confirmation and the terms
    must be accepted; role and status cannot be chosen (new users are active users)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "email": "ada@example.com",
                    "username": "ada_l",
                    "password": "correct horse battery",
                    "password_confirm": "correct horse battery",
                    "accept_terms": True,
                    "full_name": "Ada Lovelace",
                    "phone": "+14155550123",
                }
            ]
        },
    )

    email: Email
    username: Username
    password: Password
    password_confirm: Password
    accept_terms: StrictBool = Field(description="must be true")
    full_name: FullName | None = None
    phone: Phone | None = None

    @field_validator("accept_terms")
    @classmethod
    def _terms(cls, accepted: bool) -> bool:
        if not accepted:
            raise ValueError("the terms must be accepted")
        return accepted

    @model_validator(mode="after")
    def _passwords_match(self) -> Self:
        if self.password != self.password_confirm:
            raise ValueError("password and password_confirm do not match")
        return self


def _require_some(model: BaseModel) -> None:
    if not model.model_fields_set:
        raise ValueError("at least one field must be given")


class UserUpdate(BaseModel):
    """A user's own profile change (``PATCH /users/me``); at least one field.

    ``full_name`` and ``phone`` may be set to null to clear them. Changing the e-mail
    address clears the verified flag.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"full_name": "Ada King", "phone": None}]},
    )

    # Not nullable in the schema; an explicit null is still refused by the validator.
    email: Email | SkipJsonSchema[None] = None
    username: Username | SkipJsonSchema[None] = None
    full_name: FullName | None = None
    phone: Phone | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        _require_some(self)
        for name in ("email", "username"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class UserAdminUpdate(BaseModel):
    """What an admin may change on any user (``PATCH /users/{id}``); at least one field."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"status": "suspended"}, {"role": "moderator"}]},
    )

    role: Role | SkipJsonSchema[None] = None
    status: UserStatus | SkipJsonSchema[None] = None
    is_verified: StrictBool | SkipJsonSchema[None] = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        _require_some(self)
        for name in self.model_fields_set:
            if getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class PasswordChange(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "current_password": "correct horse battery",
                    "new_password": "staple battery horse",
                    "new_password_confirm": "staple battery horse",
                }
            ]
        },
    )

    current_password: str = Field(max_length=1000, json_schema_extra={"format": "password"})
    new_password: Password
    new_password_confirm: Password

    @model_validator(mode="after")
    def _passwords_match(self) -> Self:
        if self.new_password != self.new_password_confirm:
            raise ValueError("new_password and new_password_confirm do not match")
        return self


class UserRead(BaseModel):
    """A user as the API shows it (never the password hash)."""

    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [USER_EXAMPLE]})

    id: uuid.UUID
    email: str
    username: str
    full_name: str | None
    phone: str | None
    role: Role
    status: UserStatus
    is_verified: bool
    created_at: datetime
    updated_at: datetime
    last_login_at: datetime | None
    avatar_file: str | None = Field(default=None, exclude=True)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def avatar_url(self) -> str | None:
        """Where the avatar is served, if the user uploaded one."""
        if not self.avatar_file:
            return None
        # The file name changes with every upload, so caches never serve a stale image.
        return AVATAR_PATH.format(id=self.id) + f"?v={self.avatar_file[:12]}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def is_active(self) -> bool:
        """Whether the account may sign in (status ``active``)."""
        return self.status == UserStatus.ACTIVE

    @computed_field  # type: ignore[prop-decorator]
    @property
    def profile_completion(self) -> int:
        """Percentage of the profile filled in: e-mail, username, full name, phone,
        avatar and a verified address count one sixth each."""
        filled = 2 + sum(
            (bool(self.full_name), bool(self.phone), bool(self.avatar_file), self.is_verified)
        )
        return round(100 * filled / PROFILE_FIELDS)


class UserPage(BaseModel):
    items: list[UserRead]
    total: int = Field(ge=0)
    page: int = Field(ge=1)
    size: int = Field(ge=1, le=100)
    pages: int = Field(ge=0)
    has_next: bool
    has_prev: bool

    @classmethod
    def build(cls, items: list[UserRead], *, total: int, page: int, size: int) -> UserPage:
        pages = math.ceil(total / size) if total else 0
        return cls(
            items=items,
            total=total,
            page=page,
            size=size,
            pages=pages,
            has_next=page < pages,
            has_prev=page > 1,
        )


def _iso_only(value: object) -> object:
    # Pydantic also reads numbers as Unix timestamps; the API documents RFC 3339 only.
    if not isinstance(value, str | datetime) or (
        isinstance(value, str) and not _ISO_DATETIME.match(value)
    ):
        raise ValueError("must be an RFC 3339 date-time with a time zone")
    return value


_ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _in_utc_range(value: datetime) -> datetime:
    """Normalise to UTC; a moment that leaves the representable range in UTC (year 1
    with a positive offset, year 9999 with a negative one) is a validation error, not
    an overflow deep in the database driver."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("date is out of the supported range") from None


IsoDatetime = Annotated[AwareDatetime, BeforeValidator(_iso_only), AfterValidator(_in_utc_range)]

UserSort = Literal["created_at", "-created_at", "username", "-username", "email", "-email"]


class UserFilters(BaseModel):
    """Search filters shared by ``GET /users`` and ``GET /users/export``."""

    model_config = ConfigDict(extra="forbid")

    q: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="case-insensitive substring of e-mail, username or full name",
    )
    role: Role | None = None
    status: UserStatus | None = None
    verified_only: bool = False
    created_after: IsoDatetime | None = Field(
        default=None, description="inclusive lower bound, with a time zone"
    )
    created_before: IsoDatetime | None = Field(
        default=None, description="exclusive upper bound, with a time zone"
    )
    sort: UserSort = "-created_at"

    @model_validator(mode="after")
    def _range(self) -> Self:
        if (
            self.created_after is not None
            and self.created_before is not None
            and self.created_after >= self.created_before
        ):
            raise ValueError("created_after must be earlier than created_before")
        return self


class UserQuery(UserFilters):
    page: int = Field(default=1, ge=1, le=1_000_000)
    size: int = Field(default=20, ge=1, le=100)


class ExportQuery(UserFilters):
    format: Literal["csv"] = "csv"


class BulkUpdate(BaseModel):
    """The same admin change applied to up to 100 users."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "ids": [
                        "0b8f9a53-4f53-4c39-9d4d-3e3f0c3f1c11",
                        "6f1c1b9e-2b7a-4a8e-9a43-0f6e5b8a7d22",
                    ],
                    "update": {"status": "suspended"},
                }
            ]
        },
    )

    ids: list[uuid.UUID] = Field(min_length=1, max_length=100)
    update: UserAdminUpdate

    @field_validator("ids")
    @classmethod
    def _unique(cls, ids: list[uuid.UUID]) -> list[uuid.UUID]:
        if len(set(ids)) != len(ids):
            raise ValueError("ids must not repeat")
        return ids


class ErrorInfo(BaseModel):
    code: str
    message: str


class BulkItemResult(BaseModel):
    id: uuid.UUID
    ok: bool
    error: ErrorInfo | None = None


class BulkUpdateResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "results": [
                        {"id": "0b8f9a53-4f53-4c39-9d4d-3e3f0c3f1c11", "ok": True, "error": None},
                        {
                            "id": "6f1c1b9e-2b7a-4a8e-9a43-0f6e5b8a7d22",
                            "ok": False,
                            "error": {"code": "not_found", "message": "user not found"},
                        },
                    ],
                    "succeeded": 1,
                    "failed": 1,
                    "success_rate": 0.5,
                }
            ]
        }
    )

    results: list[BulkItemResult]
    succeeded: int = Field(ge=0)
    failed: int = Field(ge=0)
    success_rate: float = Field(ge=0, le=1, description="succeeded / number of ids")


# -- tokens ------------------------------------------------------------------------------


class TokenPair(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "access_token": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9...",
                    "token_type": "bearer",
                    "expires_in": 900,
                    "refresh_token": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9...",
                    "refresh_expires_in": 1209600,
                }
            ]
        }
    )

    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="seconds")
    refresh_token: str
    refresh_expires_in: int = Field(description="seconds")


class RefreshRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refresh_token: str = Field(min_length=1, max_length=8192)


# -- API keys ----------------------------------------------------------------------------


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "billing-service", "scopes": ["publish"], "expires_in_days": 90}]
        },
    )

    name: str = Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")
    scopes: list[ApiKeyScope] = Field(min_length=1, max_length=10)
    expires_in_days: StrictInt | None = Field(default=None, ge=1, le=3650)

    @field_validator("scopes")
    @classmethod
    def _unique(cls, scopes: list[ApiKeyScope]) -> list[ApiKeyScope]:
        return sorted(set(scopes))


class ApiKeyRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    prefix: str = Field(description="the key's first characters, to recognise it")
    scopes: list[ApiKeyScope]
    created_by_id: uuid.UUID | None
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyRead):
    """The new key, with its secret: shown this once, stored only as a hash."""

    key: str = Field(examples=["hk_3q2-7f...Vt0"])


# The error envelope every 4xx/5xx uses is documented by hub.http_errors.ErrorResponse.
