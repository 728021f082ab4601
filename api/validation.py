"""Field rules shared by the schemas: e-mail, username, phone, names, passwords.

Each rule is an ``Annotated`` type so the same rule applies wherever the field appears.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated

import phonenumbers
from pydantic import AfterValidator, EmailStr, Field, StringConstraints

USERNAME_PATTERN = r"^[A-Za-z0-9_]{3,50}$"
PASSWORD_MIN = 8
PASSWORD_MAX = 100

# A small built-in list of throwaway-mailbox providers; deployments extend it with
# HERALD_DISPOSABLE_EMAIL_DOMAINS. Subdomains of a listed domain are refused too.
DISPOSABLE_DOMAINS = frozenset(
    {
        "10minutemail.com",
        "10minutemail.net",
        "dispostable.com",
        "emailondeck.com",
        "fakeinbox.com",
        "getairmail.com",
        "getnada.com",
        "guerrillamail.com",
        "guerrillamail.net",
        "guerrillamail.org",
        "maildrop.cc",
        "mailinator.com",
        "mailinator.net",
        "mailnesia.com",
        "mintemail.com",
        "mohmal.com",
        "moakt.com",
        "sharklasers.com",
        "spamgourmet.com",
        "temp-mail.org",
        "tempmail.com",
        "tempmail.net",
        "tempmailo.com",
        "throwawaymail.com",
        "trashmail.com",
        "trashmail.de",
        "yopmail.com",
        "yopmail.fr",
        "yopmail.net",
    }
)


def email_domain(email: str) -> str:
    return email.rpartition("@")[2].lower()


def is_disposable(email: str, extra: frozenset[str] | set[str] = frozenset()) -> bool:
    """Whether the address's domain (or a parent of it) is a disposable-mail provider."""
    labels = email_domain(email).split(".")
    candidates = {".".join(labels[i:]) for i in range(len(labels) - 1)}
    return bool(candidates & DISPOSABLE_DOMAINS) or bool(candidates & set(extra))


def _normalise_email(value: str) -> str:
    email = value.strip().lower()
    if is_disposable(email):
        raise ValueError("disposable e-mail addresses are not accepted")
    return email


def _e164(value: str) -> str:
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        raise ValueError("phone must be in international E.164 form, e.g. +14155550123") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("phone is not a valid number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _clean_name(value: str) -> str:
    value = unicodedata.normalize("NFC", value).strip()
    if not value:
        raise ValueError("full name must not be blank")
    if _CONTROL.search(value):
        raise ValueError("full name must not contain control characters")
    return value


Email = Annotated[
    EmailStr,
    AfterValidator(_normalise_email),
    Field(max_length=320, examples=["ada@example.com"]),
]
Username = Annotated[
    str,
    StringConstraints(pattern=USERNAME_PATTERN),
    Field(
        description="3-50 letters, digits or underscores; unique regardless of case",
        examples=["ada_l"],
    ),
]
Phone = Annotated[
    str,
    StringConstraints(min_length=3, max_length=32),
    AfterValidator(_e164),
    Field(description="international E.164 form", examples=["+14155550123"]),
]
FullName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=100),
    AfterValidator(_clean_name),
    Field(examples=["Ada Lovelace"]),
]
Password = Annotated[
    str,
    StringConstraints(min_length=PASSWORD_MIN, max_length=PASSWORD_MAX),
    Field(json_schema_extra={"format": "password", "writeOnly": True}),
]
