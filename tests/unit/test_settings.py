"""hub.settings: secure defaults, clear messages naming the HERALD_ variable."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from hub.settings import DEV_SECRET_FILE, MIN_SECRET_LENGTH, Settings, SettingsError, load_settings

from .conftest import SECRET


def test_defaults_are_development_with_memory_broker() -> None:
    settings = load_settings()
    assert settings.env == "development"
    assert settings.broker_url == "memory://"
    assert settings.workers == 1
    assert settings.service_keys == [] and settings.allowed_origins == []
    assert not settings.json_logs


def test_production_without_secret_refuses_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HERALD_ENV", "production")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "HERALD_SECRET_KEY" in str(info.value)
    assert "production" in str(info.value)


def test_production_with_secret_starts_with_json_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_ENV", "production")
    monkeypatch.setenv("HERALD_SECRET_KEY", SECRET)
    settings = load_settings()
    assert settings.signing_key() == SECRET
    assert settings.json_logs


def test_short_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_SECRET_KEY", "x" * (MIN_SECRET_LENGTH - 1))
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "HERALD_SECRET_KEY" in str(info.value)
    assert str(MIN_SECRET_LENGTH) in str(info.value)
    assert "x" * (MIN_SECRET_LENGTH - 1) not in str(info.value)  # never echo the secret


def test_several_workers_need_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_WORKERS", "4")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "HERALD_REDIS_URL" in str(info.value)
    monkeypatch.setenv("HERALD_REDIS_URL", "redis://localhost:6379/0")
    settings = load_settings()
    assert settings.workers == 4 and settings.broker_url == "redis://localhost:6379/0"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HERALD_PORT", "eighty"),
        ("HERALD_PORT", "70000"),
        ("HERALD_WORKERS", "1.5"),
        ("HERALD_MAX_MESSAGE_BYTES", "12"),
        ("HERALD_OUTBOX_MAX_MESSAGES", "-1"),
    ],
)
def test_invalid_number_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert name in str(info.value)


def test_every_problem_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_PORT", "x")
    monkeypatch.setenv("HERALD_LOG_LEVEL", "loud")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "HERALD_PORT" in str(info.value) and "HERALD_LOG_LEVEL" in str(info.value)


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


def test_redis_url_scheme_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_REDIS_URL", "http://localhost:6379")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "HERALD_REDIS_URL" in str(info.value)


def test_service_keys_and_origins_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_SERVICE_KEYS", " key-one-0123456789ab , key-two-0123456789ab,,")
    monkeypatch.setenv("HERALD_ALLOWED_ORIGINS", "https://a.example, https://b.example:8443")
    settings = load_settings()
    assert [k.get_secret_value() for k in settings.service_keys] == [
        "key-one-0123456789ab",
        "key-two-0123456789ab",
    ]
    assert settings.allowed_origins == ["https://a.example", "https://b.example:8443"]


def test_single_values_and_empty_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_SERVICE_KEYS", "")
    monkeypatch.setenv("HERALD_ALLOWED_ORIGINS", "*")
    settings = load_settings()
    assert settings.service_keys == [] and settings.allowed_origins == ["*"]


def test_short_service_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_SERVICE_KEYS", "key-one-0123456789ab,short")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "HERALD_SERVICE_KEYS" in str(info.value)
    assert "short" not in str(info.value).replace("HERALD_", "")  # the key is not echoed


def test_service_keys_are_hidden_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_SERVICE_KEYS", "key-one-0123456789ab")
    monkeypatch.setenv("HERALD_SECRET_KEY", SECRET)
    text = repr(load_settings())
    assert "key-one-0123456789ab" not in text and SECRET not in text


def test_dotenv_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HERALD_PORT=9123\n")
    assert load_settings().port == 9123


def test_dev_secret_is_created_once_private_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    first = Settings(_env_file=None, data_dir=data_dir)
    secret = first.signing_key()
    path = data_dir / DEV_SECRET_FILE
    assert len(secret) >= MIN_SECRET_LENGTH
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == secret
    assert first.signing_key() == secret
    again = Settings(_env_file=None, data_dir=data_dir)
    assert again.signing_key() == secret
    other = Settings(_env_file=None, data_dir=tmp_path / "elsewhere")
    assert other.signing_key() != secret


def test_dev_secret_file_is_never_world_readable_even_with_a_lax_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0)
    try:
        settings = Settings(_env_file=None, data_dir=tmp_path / "lax")
        settings.signing_key()
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "lax" / DEV_SECRET_FILE).stat().st_mode)
    assert mode == 0o600


def test_configured_secret_wins_over_the_dev_file(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, secret_key=SECRET)
    assert settings.signing_key() == SECRET
    assert not (tmp_path / DEV_SECRET_FILE).exists()


def test_derived_values(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, max_message_bytes=1000)
    assert settings.max_frame_bytes > settings.max_message_bytes
    assert settings.effective_database_url.endswith("/herald.db")
    assert settings.effective_database_url.startswith("sqlite+aiosqlite:///")


@pytest.mark.parametrize("content", ["", "\n", "short"])
def test_empty_or_short_dev_secret_file_is_refused_not_used(tmp_path: Path, content: str) -> None:
    # An empty file is what a concurrent reader used to see while another process was
    # still writing it: signing with an empty key would accept forged tokens.
    (tmp_path / DEV_SECRET_FILE).write_text(content)
    settings = Settings(_env_file=None, data_dir=tmp_path)
    with pytest.raises(SettingsError, match=DEV_SECRET_FILE):
        settings.signing_key()


def test_dev_secret_leaves_no_temporary_files(tmp_path: Path) -> None:
    Settings(_env_file=None, data_dir=tmp_path).signing_key()
    assert [p.name for p in tmp_path.iterdir()] == [DEV_SECRET_FILE]


def test_outbox_smaller_than_one_message_is_refused() -> None:
    with pytest.raises(SettingsError, match="HERALD_OUTBOX_MAX_BYTES"):
        load_settings(_env_file=None, outbox_max_bytes=8192, max_message_bytes=65536)


def test_a_bad_redis_timeout_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HERALD_REDIS_COMMAND_TIMEOUT", "0")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "HERALD_REDIS_COMMAND_TIMEOUT" in str(info.value)


async def test_redis_timeouts_reach_the_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis that accepts connections but never answers: a command gives up after
    HERALD_REDIS_COMMAND_TIMEOUT, not the default 5 s."""
    import asyncio
    import socket
    import time

    from hub.app import build_hub
    from hub.broker import BrokerUnavailable

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    monkeypatch.setenv("HERALD_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setenv("HERALD_REDIS_COMMAND_TIMEOUT", "0.3")
    monkeypatch.setenv("HERALD_REDIS_MAX_CONNECTIONS", "3")
    try:
        broker = build_hub(load_settings()).broker
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await asyncio.wait_for(broker.get_user_not_before("u"), 4)
        assert time.monotonic() - started < 2.0
        await broker.aclose()
    finally:
        silent.close()
