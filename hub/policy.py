"""Channel grammar and the pluggable :class:`ChannelPolicy`.

Transports never decide access themselves: they ask the policy. The default policy
implements the table in DESIGN.md; a deployment can pass its own object.
"""

from __future__ import annotations

import re
from typing import Protocol

from . import errors
from .auth import Principal
from .errors import HubError

MAX_CHANNEL_LENGTH = 128
# kind:rest with a conservative charset; no braces (Redis Cluster hash tags), no
# whitespace, no '*' (reserved for grants).
CHANNEL_RE = re.compile(r"^[A-Za-z0-9_\-]{1,32}(:[A-Za-z0-9_\-.@=+/]{1,95})?$")


def validate_channel(channel: object) -> str:
    """Return the channel name or raise ``HubError(bad_channel)`` saying what is wrong."""
    if not isinstance(channel, str) or not channel:
        raise HubError(errors.BAD_CHANNEL, "channel must be a non-empty string")
    if len(channel) > MAX_CHANNEL_LENGTH:
        raise HubError(
            errors.BAD_CHANNEL, f"channel name longer than {MAX_CHANNEL_LENGTH} characters"
        )
    if not CHANNEL_RE.fullmatch(channel):  # match()+'$' accepts a trailing newline
        raise HubError(
            errors.BAD_CHANNEL,
            "channel must look like 'kind' or 'kind:name' (kind: letters, digits, _ -; "
            "name: letters, digits and _ - . @ = + /)",
        )
    return channel


def grant_matches(grant: str, channel: str) -> bool:
    """A token grant is an exact channel name or ``prefix*`` (``prefix:*`` in practice)."""
    if grant.endswith("*"):
        return channel.startswith(grant[:-1]) and len(channel) > len(grant) - 1
    return grant == channel


class ChannelPolicy(Protocol):
    """Who may subscribe to and publish on which channel."""

    def can_subscribe(self, principal: Principal, channel: str) -> bool:
        """Whether ``principal`` may receive publications of ``channel`` (already valid)."""

    def can_publish(self, principal: Principal, channel: str) -> bool:
        """Whether ``principal`` may publish to ``channel`` (already valid)."""


class DefaultChannelPolicy:
    """The table of DESIGN.md.

    ============== ================================ ==========================
    channel        subscribe                        publish
    ============== ================================ ==========================
    user:{id}      that user; admins                services
    users          admins                           services (the API itself)
    public:{name}  any authenticated user           services, admins
    token grants   the token holder                 services
    ============== ================================ ==========================
    """

    def can_subscribe(self, principal: Principal, channel: str) -> bool:
        kind, _, name = channel.partition(":")
        if kind == "user" and name:
            return principal.is_admin or (principal.kind == "user" and name == principal.subject)
        if channel == "users":
            return principal.is_admin
        if kind == "public" and name:
            return True
        return any(grant_matches(grant, channel) for grant in principal.channels)

    def can_publish(self, principal: Principal, channel: str) -> bool:
        if principal.may_publish():
            return True
        kind, _, name = channel.partition(":")
        return kind == "public" and bool(name) and principal.is_admin


def check_subscribe(policy: ChannelPolicy, principal: Principal, channel: object) -> str:
    name = validate_channel(channel)
    if not policy.can_subscribe(principal, name):
        raise HubError(errors.FORBIDDEN, f"not allowed to subscribe to {name!r}")
    return name


def check_publish(policy: ChannelPolicy, principal: Principal, channel: object) -> str:
    name = validate_channel(channel)
    if not policy.can_publish(principal, name):
        raise HubError(errors.FORBIDDEN, f"not allowed to publish to {name!r}")
    return name
