"""One settings object for the whole product, read from ``HERALD_*`` variables and ``.env``.

Secure defaults: production refuses to start without a secret, and the embedded
memory broker refuses several workers (each would be an island).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIN_SECRET_LENGTH = 32
DEV_SECRET_FILE = "dev-secret"


class SettingsError(ValueError):
    """Settings that cannot run; the message names the offending ``HERALD_`` variable."""


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class NamespaceOptions(BaseModel):
    """Overrides for the channels of one namespace (the part of a name before ``:``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    history_size: int | None = Field(default=None, ge=0)
    history_ttl: int | None = Field(default=None, ge=1)
    presence: bool | None = None
    join_leave: bool = False


class ChannelOptions(BaseModel):
    """What applies to one channel once defaults and its namespace are combined."""

    model_config = ConfigDict(frozen=True)

    history_size: int
    history_ttl: int
    presence: bool
    join_leave: bool


class Settings(BaseSettings):
    """Every knob of the hub and the API. Field ``x`` is read from ``HERALD_X``."""

    model_config = SettingsConfigDict(
        env_prefix="HERALD_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    env: Literal["development", "production"] = "development"
    secret_key: SecretStr | None = None
    data_dir: Path = Path(".herald")
    redis_url: str | None = None
    redis_prefix: str = Field(default="herald", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # How long to wait for Redis: a TCP connect, one command; how often the pub/sub
    # connection is pinged and how long a ping may take before it counts as dead; how
    # many command connections each worker may open.
    redis_connect_timeout: float = Field(default=2.0, gt=0, le=60)
    redis_command_timeout: float = Field(default=5.0, gt=0, le=300)
    redis_health_check_interval: float = Field(default=5.0, gt=0, le=300)
    redis_health_check_timeout: float = Field(default=3.0, gt=0, le=60)
    redis_max_connections: int = Field(default=64, ge=2, le=10_000)
    database_url: str | None = None
    service_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool | None = None

    jwt_audience: str = "herald"
    jwt_issuer: str = "herald"
    access_token_ttl: int = Field(default=900, ge=10, le=86_400)
    refresh_token_ttl: int = Field(default=14 * 86_400, ge=60)
    subscribe_token_ttl: int = Field(default=60, ge=5, le=3600)
    max_token_ttl: int = Field(default=86_400, ge=10)

    outbox_max_messages: int = Field(default=1024, ge=8)
    outbox_max_bytes: int = Field(default=4 * 1024 * 1024, ge=4096)
    max_message_bytes: int = Field(default=64 * 1024, ge=256, le=16 * 1024 * 1024)
    max_channels_per_connection: int = Field(default=128, ge=1)
    max_connections_per_user: int = Field(default=32, ge=1)
    # How long a user's connection slot outlives a worker that died without freeing it.
    connection_slot_ttl: int = Field(default=30, ge=2, le=3600)
    max_batch_messages: int = Field(default=1000, ge=1)
    heartbeat_interval: float = Field(default=25.0, gt=0, le=300)
    heartbeat_timeout: float = Field(default=10.0, gt=0, le=300)
    auth_timeout: float = Field(default=10.0, gt=0, le=120)
    sse_retry_ms: int = Field(default=2000, ge=100)
    send_timeout: float = Field(default=10.0, gt=0)
    shutdown_grace: float = Field(default=5.0, ge=0)
    publish_rate_per_second: float = Field(default=1000.0, gt=0)
    publish_rate_burst: int = Field(default=2000, ge=1)

    history_size: int = Field(default=1000, ge=0)
    history_ttl: int = Field(default=24 * 3600, ge=1)
    presence: bool = False
    presence_ttl: int = Field(default=30, ge=1)
    # JSON, e.g. {"public": {"history_size": 100, "presence": true, "join_leave": true}}
    namespaces: dict[str, NamespaceOptions] = Field(default_factory=dict)

    # Garbage collector (hub/gc_tuning.py; figures in docs/performance.md).
    gc: Literal["tuned", "default"] = "tuned"
    # generation thresholds "g0,g1,g2"; empty: hub.gc_tuning.TUNED_THRESHOLDS
    gc_thresholds: Annotated[tuple[int, int, int] | None, NoDecode] = None
    gc_freeze_after: int = Field(default=250, ge=1)
    gc_thaw_after: int = Field(default=1000, ge=1)
    gc_check_interval: float = Field(default=0.25, ge=0)

    @field_validator("service_keys", "allowed_origins", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("gc_thresholds", mode="before")
    @classmethod
    def _gc_thresholds(cls, value: object) -> object:
        if isinstance(value, str):
            parts = _split_csv(value)
            if not parts:
                return None
            if not isinstance(parts, list) or len(parts) != 3:
                raise ValueError('three integers "gen0,gen1,gen2", e.g. "50000,20,100"')
            return tuple(parts)
        return value

    @field_validator("gc_thresholds")
    @classmethod
    def _gc_thresholds_positive(
        cls, value: tuple[int, int, int] | None
    ) -> tuple[int, int, int] | None:
        if value is not None and (value[0] < 1 or value[1] < 1 or value[2] < 1):
            raise ValueError("each threshold must be at least 1 (HERALD_GC=default for stock)")
        return value

    @field_validator("service_keys")
    @classmethod
    def _service_keys_long_enough(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for key in keys:
            if len(key.get_secret_value()) < 16:
                raise ValueError("each service key must be at least 16 characters")
        return keys

    @field_validator("secret_key")
    @classmethod
    def _secret_long_enough(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and len(key.get_secret_value()) < MIN_SECRET_LENGTH:
            raise ValueError(f"must be at least {MIN_SECRET_LENGTH} characters")
        return key

    @field_validator("namespaces")
    @classmethod
    def _namespace_names(cls, value: dict[str, NamespaceOptions]) -> dict[str, NamespaceOptions]:
        import re

        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_\-]{1,32}", name):
                raise ValueError(f"namespace {name!r} is not a valid channel kind")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return url or None

    @model_validator(mode="after")
    def _check_combination(self) -> Settings:
        if self.env == "production" and self.secret_key is None:
            raise ValueError(
                "HERALD_SECRET_KEY is required when HERALD_ENV=production "
                f"(at least {MIN_SECRET_LENGTH} random characters; "
                "for example: python -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        if self.outbox_max_bytes < self.max_frame_bytes:
            raise ValueError(
                "HERALD_OUTBOX_MAX_BYTES must be at least HERALD_MAX_MESSAGE_BYTES + 4096, "
                "or a single large message would disconnect even a fast reader"
            )
        if self.workers > 1 and self.redis_url is None:
            raise ValueError(
                "HERALD_WORKERS > 1 needs HERALD_REDIS_URL: with the in-memory broker every "
                "worker would be an island and messages would not reach other workers' subscribers"
            )
        return self

    # -- derived values -------------------------------------------------------------------

    def channel_options(self, channel: str) -> ChannelOptions:
        """History and presence settings of ``channel`` (its namespace's overrides first)."""
        ns = self.namespaces.get(channel.partition(":")[0])
        if ns is None:
            return ChannelOptions(
                history_size=self.history_size,
                history_ttl=self.history_ttl,
                presence=self.presence,
                join_leave=False,
            )
        return ChannelOptions(
            history_size=self.history_size if ns.history_size is None else ns.history_size,
            history_ttl=self.history_ttl if ns.history_ttl is None else ns.history_ttl,
            presence=self.presence if ns.presence is None else ns.presence,
            join_leave=ns.join_leave,
        )

    def history_overrides(self) -> dict[str, tuple[int, int]]:
        return {
            name: (opts.history_size, opts.history_ttl)
            for name in self.namespaces
            for opts in [self.channel_options(name)]
        }

    @property
    def broker_url(self) -> str:
        return self.redis_url or "memory://"

    def redis_tuning(self) -> dict[str, Any]:
        """The ``HERALD_REDIS_*`` timeouts and pool size, as :class:`BrokerConfig` fields."""
        return {
            "connect_timeout": self.redis_connect_timeout,
            "command_timeout": self.redis_command_timeout,
            "health_check_interval": self.redis_health_check_interval,
            "health_check_timeout": self.redis_health_check_timeout,
            "max_connections": self.redis_max_connections,
        }

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'herald.db').as_posix()}"

    @property
    def json_logs(self) -> bool:
        return self.log_json if self.log_json is not None else self.env == "production"

    @property
    def max_frame_bytes(self) -> int:
        """Largest client frame accepted: a message plus room for its envelope."""
        return self.max_message_bytes + 4096

    def signing_key(self) -> str:
        """The JWT signing secret.

        In development without ``HERALD_SECRET_KEY`` a random secret is created once in
        the data directory, so ``herald serve`` and ``herald token`` agree with no setup.
        """
        if self.secret_key is not None:
            return self.secret_key.get_secret_value()
        if self.env == "production":  # unreachable: validation refuses it
            raise SettingsError("HERALD_SECRET_KEY is required in production")
        path = self.data_dir / DEV_SECRET_FILE
        try:
            return _read_dev_secret(path)
        except FileNotFoundError:
            pass
        self.data_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(48)
        # Written in full to a private (0600 from creation) temporary file, then linked into
        # place: a concurrent reader sees no file or the whole secret, never an empty one.
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secret)
            os.link(tmp, path)
        except FileExistsError:  # another worker won the race
            return _read_dev_secret(path)
        finally:
            tmp.unlink(missing_ok=True)
        return secret


def _read_dev_secret(path: Path) -> str:
    secret = path.read_text().strip()
    if len(secret) < MIN_SECRET_LENGTH:
        raise SettingsError(
            f"{path} holds no usable secret (empty or shorter than {MIN_SECRET_LENGTH} "
            "characters): delete it to create a new one, or set HERALD_SECRET_KEY"
        )
    return secret


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning pydantic's report into one message naming each variable."""
    from pydantic import ValidationError

    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            name = f"HERALD_{field.upper()}" if field else "settings"
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{name}: {message}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
