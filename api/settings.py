"""Settings of the REST sidecar, read from the same ``HERALD_*`` variables as the hub's.

Only what the API alone needs lives here; everything shared (data directory, database
URL, secrets, token lifetimes) stays in :class:`hub.settings.Settings`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from hub.settings import Settings


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip().lower() for item in value.split(",") if item.strip()]
    return value


class ApiSettings(BaseSettings):
    """Knobs of the users API. Field ``x`` is read from ``HERALD_X``."""

    model_config = SettingsConfigDict(
        env_prefix="HERALD_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # None: migrate at start in development, refuse an outdated schema in production.
    auto_migrate: bool | None = None
    database_echo: bool = False
    database_pool_size: int = Field(default=10, ge=1, le=200)

    # Argon2id cost; the defaults follow RFC 9106's second recommendation.
    argon2_time_cost: int = Field(default=3, ge=1, le=20)
    argon2_memory_kib: int = Field(default=65536, ge=1024)
    argon2_parallelism: int = Field(default=4, ge=1, le=16)

    avatar_max_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)

    # Token buckets shared by all workers through the broker (rate per second, burst).
    login_rate_per_minute: float = Field(default=10.0, gt=0)
    login_burst: int = Field(default=10, ge=1)
    register_rate_per_minute: float = Field(default=5.0, gt=0)
    register_burst: int = Field(default=5, ge=1)

    # The event outbox (api/outbox.py): how often each worker looks for entries to retry
    # or to take over, after how long without an attempt an entry is taken over from its
    # (presumably dead) worker, and how long a request waits for its events to go out.
    event_outbox_poll_interval: float = Field(default=1.0, gt=0, le=60)
    event_outbox_takeover_after: float = Field(default=30.0, gt=0)
    event_outbox_flush_timeout: float = Field(default=5.0, ge=0, le=60)

    # Extra disposable e-mail domains refused at registration (the built-in list stays).
    disposable_email_domains: Annotated[list[str], NoDecode] = Field(default_factory=list)

    def auto_migrate_for(self, settings: Settings) -> bool:
        """Whether to run migrations at start-up for this deployment."""
        if self.auto_migrate is not None:
            return self.auto_migrate
        return settings.env == "development"

    @field_validator("disposable_email_domains", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)
