"""hub.policy: the channel grammar and the DefaultChannelPolicy table of DESIGN.md."""

from __future__ import annotations

import pytest

from hub import errors
from hub.errors import HubError
from hub.policy import (
    MAX_CHANNEL_LENGTH,
    DefaultChannelPolicy,
    check_publish,
    check_subscribe,
    grant_matches,
    validate_channel,
)

from .conftest import service, user

POLICY = DefaultChannelPolicy()


@pytest.mark.parametrize(
    "channel",
    [
        "users",
        "user:42",
        "public:news",
        "room:a.b-c_d@e=f+g/h",
        "k" * 32,
        "k:" + "n" * 95,
        "A-Z_09:x",
    ],
)
def test_validate_channel_accepts_the_grammar(channel: str) -> None:
    assert validate_channel(channel) == channel


@pytest.mark.parametrize(
    "channel",
    [
        "user:{42}",  # braces are Redis Cluster hash tags
        "{users}",
        "user:4 2",
        "user:42\n",  # a trailing newline must not slip past '$'
        "user:42\r",
        "public:*",
        "user:",
        ":name",
        "a:b:c",  # ':' separates kind from name, once
        "k" * 33,
        "k:" + "n" * 96,
        "ünï:code",
        "user:42;DROP",
        "user:\x00",
    ],
)
def test_validate_channel_refuses_bad_charset_and_shape(channel: str) -> None:
    with pytest.raises(HubError) as info:
        validate_channel(channel)
    assert info.value.code == errors.BAD_CHANNEL
    assert "kind" in info.value.message or "longer" in info.value.message


@pytest.mark.parametrize("channel", ["", None, 5, ["user:1"], b"user:1"])
def test_validate_channel_refuses_empty_and_non_strings(channel: object) -> None:
    with pytest.raises(HubError) as info:
        validate_channel(channel)
    assert info.value.code == errors.BAD_CHANNEL
    assert "non-empty string" in info.value.message


def test_validate_channel_names_the_length_limit() -> None:
    with pytest.raises(HubError) as info:
        validate_channel("x:" + "y" * MAX_CHANNEL_LENGTH)
    assert str(MAX_CHANNEL_LENGTH) in info.value.message


def test_grant_matches_exact_and_prefix() -> None:
    assert grant_matches("room:1", "room:1")
    assert not grant_matches("room:1", "room:10")
    assert grant_matches("room:*", "room:10")
    assert not grant_matches("room:*", "room:")  # the prefix alone is not a channel
    assert not grant_matches("room:*", "roomx:1")
    assert not grant_matches("room:*", "other:room:1")


# -- subscribe -------------------------------------------------------------------------------


def test_user_channel_is_for_that_user_only() -> None:
    assert POLICY.can_subscribe(user("42"), "user:42")
    assert not POLICY.can_subscribe(user("43"), "user:42")
    assert not POLICY.can_subscribe(user("4"), "user:42")


def test_user_channel_is_open_to_admins() -> None:
    assert POLICY.can_subscribe(user("1", role="admin"), "user:42")


@pytest.mark.parametrize("role", ["moderator", "guest"])
def test_other_roles_do_not_read_other_users(role: str) -> None:
    assert not POLICY.can_subscribe(user("1", role=role), "user:42")
    assert POLICY.can_subscribe(user("42", role=role), "user:42")


def test_user_channel_is_not_for_a_service_named_like_the_user() -> None:
    svc = service("publish")
    assert not POLICY.can_subscribe(svc, f"user:{svc.subject}")
    assert not POLICY.can_subscribe(svc, "user:42")
    assert POLICY.can_subscribe(service("admin"), "user:42")


def test_grants_cannot_open_another_users_channel() -> None:
    sneaky = user("1", channels=("user:*", "user:42", "users"))
    assert not POLICY.can_subscribe(sneaky, "user:42")
    assert not POLICY.can_subscribe(sneaky, "users")


def test_users_directory_is_admin_only() -> None:
    assert POLICY.can_subscribe(user("1", role="admin"), "users")
    assert not POLICY.can_subscribe(user("1"), "users")
    assert not POLICY.can_subscribe(user("1", role="moderator"), "users")
    assert not POLICY.can_subscribe(service("publish"), "users")


def test_public_channels_are_open_to_any_authenticated_principal() -> None:
    for who in (user("1"), user("1", role="guest"), user("1", role="admin"), service()):
        assert POLICY.can_subscribe(who, "public:news")


def test_bare_kinds_without_a_name_are_not_public_or_user() -> None:
    assert not POLICY.can_subscribe(user("1"), "public")
    assert not POLICY.can_subscribe(user("1"), "user")


def test_token_grants_exact_and_prefix() -> None:
    holder = user("1", channels=("team:blue", "room:*"))
    assert POLICY.can_subscribe(holder, "team:blue")
    assert not POLICY.can_subscribe(holder, "team:red")
    assert POLICY.can_subscribe(holder, "room:7")
    assert not POLICY.can_subscribe(holder, "rooms:7")
    assert not POLICY.can_subscribe(user("2"), "team:blue")


# -- publish ---------------------------------------------------------------------------------


@pytest.mark.parametrize("channel", ["user:42", "users", "public:news", "team:blue"])
def test_services_with_publish_or_admin_scope_publish_anywhere(channel: str) -> None:
    assert POLICY.can_publish(service("publish"), channel)
    assert POLICY.can_publish(service("admin"), channel)


def test_service_without_scope_cannot_publish() -> None:
    assert not POLICY.can_publish(service("read"), "public:news")


def test_admins_publish_on_public_channels_only() -> None:
    admin = user("1", role="admin")
    assert POLICY.can_publish(admin, "public:news")
    assert not POLICY.can_publish(admin, "user:42")
    assert not POLICY.can_publish(admin, "users")
    assert not POLICY.can_publish(admin, "public")


@pytest.mark.parametrize("channel", ["user:42", "users", "public:news", "team:blue"])
def test_plain_users_publish_nowhere(channel: str) -> None:
    holder = user("42", channels=("team:blue",))
    assert not POLICY.can_publish(holder, channel)


def test_check_helpers_validate_then_authorise() -> None:
    with pytest.raises(HubError) as info:
        check_subscribe(POLICY, user("1"), "user:{1}")
    assert info.value.code == errors.BAD_CHANNEL
    with pytest.raises(HubError) as info:
        check_subscribe(POLICY, user("1"), "user:2")
    assert info.value.code == errors.FORBIDDEN and "user:2" in info.value.message
    with pytest.raises(HubError) as info:
        check_publish(POLICY, user("1"), "public:x")
    assert info.value.code == errors.FORBIDDEN
    assert check_subscribe(POLICY, user("1"), "user:1") == "user:1"
    assert check_publish(POLICY, service(), "user:1") == "user:1"
