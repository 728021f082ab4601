"""Password hashing (Argon2id) and API key material.

Hashing is CPU-bound (tens of milliseconds by design), so it runs in a worker thread
and never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

API_KEY_PREFIX = "hk_"
API_KEY_RE = re.compile(r"^hk_[A-Za-z0-9_\-]{43}$")
API_KEY_DISPLAY_LENGTH = 11  # "hk_" and eight characters


class Passwords:
    """Argon2id hashing with a constant-time answer for unknown users."""

    def __init__(self, *, time_cost: int = 3, memory_kib: int = 65536, parallelism: int = 4):
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism
        )
        self._dummy: str | None = None

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """Whether ``password`` matches. With no hash (unknown user) a dummy hash is
        checked anyway, so the answer takes as long as for a real user."""
        if password_hash is None:
            if self._dummy is None:
                self._dummy = await self.hash(secrets.token_urlsafe(16))
            password_hash = self._dummy
            await asyncio.to_thread(self._check, password_hash, password)
            return False
        return await asyncio.to_thread(self._check, password_hash, password)

    def _check(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        return self._hasher.check_needs_rehash(password_hash)


def new_api_key() -> str:
    """A fresh key: ``hk_`` and 256 random bits (43 URL-safe characters)."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def looks_like_api_key(candidate: str) -> bool:
    return API_KEY_RE.match(candidate) is not None


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def same_digest(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
