"""Token and service-key verification -> :class:`Principal`. Called before ``accept()``.

JWTs are HS256 with the algorithm pinned; ``exp``, ``iat``, ``sub`` and ``aud`` are
required; headers such as ``jku``/``jwk`` are never consulted. A token of a user
whose tokens were revoked (suspended or deleted) is refused through the broker's
shared "not before" mark, so every worker agrees.
"""

from __future__ import annotations

import hmac
import math
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import jwt

from . import errors
from .broker.base import BrokerUnavailable
from .errors import HubError

ALGORITHM = "HS256"
ROLES = ("admin", "moderator", "user", "guest")
TokenType = Literal["access", "subscribe", "refresh"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is connected or calling.

    ``kind`` is ``user`` (JWT) or ``service`` (API key). ``channels`` are extra channel
    grants from the token's ``channels`` claim (exact names or ``prefix:*``).
    """

    subject: str
    role: str
    kind: Literal["user", "service"] = "user"
    channels: tuple[str, ...] = ()
    scopes: frozenset[str] = field(default_factory=frozenset)
    expires_at: float | None = None
    issued_at: float | None = None
    token_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin" or "admin" in self.scopes

    @property
    def is_service(self) -> bool:
        return self.kind == "service"

    def may_publish(self) -> bool:
        return self.is_service and ("publish" in self.scopes or "admin" in self.scopes)


ServiceKeyVerifier = Callable[[str], Awaitable[Principal | None]]
RevocationLookup = Callable[[str], Awaitable[float | None]]


class TokenService:
    """Issues and verifies the hub's JWTs."""

    def __init__(
        self,
        secret: str,
        *,
        audience: str,
        issuer: str,
        access_ttl: int,
        subscribe_ttl: int,
        max_ttl: int,
    ) -> None:
        self._secret = secret
        self._audience = audience
        self._issuer = issuer
        self.access_ttl = access_ttl
        self.subscribe_ttl = subscribe_ttl
        self.max_ttl = max_ttl

    def issue(
        self,
        subject: str,
        *,
        role: str = "user",
        channels: Sequence[str] = (),
        ttl: int | None = None,
        token_type: TokenType = "access",
        extra: dict[str, object] | None = None,
    ) -> str:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        if ttl is None:
            ttl = self.subscribe_ttl if token_type == "subscribe" else self.access_ttl
        if not 0 < ttl <= self.max_ttl and token_type != "refresh":
            raise ValueError(f"ttl must be between 1 and {self.max_ttl} seconds")
        now = time.time()
        claims: dict[str, object] = {
            "sub": str(subject),
            "role": role,
            # Fractional: a revocation at time T must not refuse a token issued at T + 0.2 s.
            # Rounded down, never up: a revocation right after issuing must still apply.
            "iat": math.floor(now * 1000) / 1000,
            "nbf": int(now) - 1,
            "exp": int(now) + ttl,
            "jti": uuid.uuid4().hex,
            "aud": self._audience,
            "iss": self._issuer,
            "typ": token_type,
        }
        if channels:
            claims["channels"] = list(channels)
        if extra:
            claims.update(extra)
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def decode(self, token: str, *, token_type: TokenType = "access") -> dict[str, object]:
        """Verify signature, algorithm, ``exp``, ``aud`` and ``iss``; return the claims."""
        if not token or len(token) > 8192:
            raise HubError(errors.UNAUTHORIZED, "missing or oversized token")
        try:
            claims: dict[str, object] = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "iat", "sub", "aud", "iss"]},
                leeway=5,
            )
        except jwt.ExpiredSignatureError:
            raise HubError(errors.TOKEN_EXPIRED, "token has expired") from None
        except jwt.InvalidAudienceError:
            raise HubError(errors.UNAUTHORIZED, "token audience is not accepted") from None
        except jwt.InvalidIssuerError:
            raise HubError(errors.UNAUTHORIZED, "token issuer is not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise HubError(errors.UNAUTHORIZED, f"token lacks the '{exc.claim}' claim") from None
        except jwt.InvalidAlgorithmError:
            raise HubError(errors.UNAUTHORIZED, "token algorithm is not accepted") from None
        except jwt.InvalidSignatureError:
            raise HubError(errors.UNAUTHORIZED, "token signature is invalid") from None
        except jwt.PyJWTError:
            raise HubError(errors.UNAUTHORIZED, "token is malformed") from None
        actual_type = claims.get("typ", "access")
        if actual_type != token_type:
            raise HubError(errors.UNAUTHORIZED, f"a {actual_type} token cannot be used here")
        return claims

    def principal_from_claims(self, claims: dict[str, object]) -> Principal:
        role = claims.get("role", "user")
        if not isinstance(role, str) or role not in ROLES:
            raise HubError(errors.UNAUTHORIZED, "token has an unknown role")
        raw_channels = claims.get("channels", [])
        if not isinstance(raw_channels, list) or not all(isinstance(c, str) for c in raw_channels):
            raise HubError(errors.UNAUTHORIZED, "token 'channels' claim must be a list of strings")
        exp = claims.get("session_exp", claims.get("exp"))
        iat = claims.get("iat")
        jti = claims.get("jti")
        return Principal(
            subject=str(claims["sub"]),
            role=role,
            channels=tuple(raw_channels),
            expires_at=float(exp) if isinstance(exp, int | float) else None,
            issued_at=float(iat) if isinstance(iat, int | float) else None,
            token_id=jti if isinstance(jti, str) else None,
        )


class Authenticator:
    """Turns a bearer credential into a :class:`Principal`: JWT first, then service keys.

    ``revocation`` returns the "not before" timestamp of a user (tokens issued earlier
    are refused); the hub wires it to the broker so every worker sees the same marks.
    More service-key verifiers (the API's stored keys) can be added at start-up.
    """

    def __init__(
        self,
        tokens: TokenService,
        *,
        static_service_keys: Sequence[str] = (),
        revocation: RevocationLookup | None = None,
    ) -> None:
        self.tokens = tokens
        self._static_keys = [key.encode() for key in static_service_keys]
        self._verifiers: list[ServiceKeyVerifier] = []
        self._revocation = revocation

    def add_service_key_verifier(self, verifier: ServiceKeyVerifier) -> None:
        self._verifiers.append(verifier)

    @staticmethod
    def looks_like_jwt(credential: str) -> bool:
        return credential.count(".") == 2 and credential.startswith("eyJ")

    async def authenticate(self, credential: str, *, token_type: TokenType = "access") -> Principal:
        """Verify a bearer credential or raise ``HubError(unauthorized|token_expired)``
        (``unavailable``, temporary, when revocation cannot be checked)."""
        if self.looks_like_jwt(credential):
            return await self.authenticate_token(credential, token_type=token_type)
        principal = await self.authenticate_service_key(credential)
        if principal is None:
            raise HubError(errors.UNAUTHORIZED, "credential is neither a valid token nor a key")
        return principal

    async def authenticate_token(
        self, token: str, *, token_type: TokenType = "access"
    ) -> Principal:
        principal = self.tokens.principal_from_claims(
            self.tokens.decode(token, token_type=token_type)
        )
        await self.check_not_revoked(principal)
        return principal

    async def check_not_revoked(self, principal: Principal) -> None:
        if self._revocation is None or principal.kind != "user":
            return
        try:
            not_before = await self._revocation(principal.subject)
        except BrokerUnavailable:
            # Fail closed, but as a temporary error: the client should retry, not give up.
            raise HubError(
                errors.UNAVAILABLE, "cannot check the token now, retry shortly", temporary=True
            ) from None
        if not_before is not None and (principal.issued_at or 0) <= not_before:
            raise HubError(errors.UNAUTHORIZED, "token was revoked")

    async def authenticate_service_key(self, key: str) -> Principal | None:
        candidate = key.encode()
        for index, static in enumerate(self._static_keys):
            if hmac.compare_digest(candidate, static):
                return Principal(
                    subject=f"service-key-{index}",
                    role="user",
                    kind="service",
                    scopes=frozenset({"publish"}),
                )
        for verifier in self._verifiers:
            principal = await verifier(key)
            if principal is not None:
                return principal
        return None


def bearer_credential(header_value: str | None) -> str | None:
    """The credential from an ``Authorization: Bearer ...`` header, if present."""
    if not header_value:
        return None
    scheme, _, credential = header_value.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return None
    return credential.strip()


def new_secret() -> str:
    return secrets.token_urlsafe(48)
