"""hub.auth: JWT issue/verify with a pinned algorithm, service keys, revocation."""

from __future__ import annotations

import base64
import time
import uuid
import warnings
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from hub import errors
from hub.auth import Authenticator, Principal, TokenService, bearer_credential
from hub.errors import HubError

from .conftest import SECRET, SERVICE_KEY

AUD = "herald"
ISS = "herald"


@pytest.fixture
def tokens() -> TokenService:
    return TokenService(
        SECRET, audience=AUD, issuer=ISS, access_ttl=900, subscribe_ttl=60, max_ttl=86_400
    )


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "sub": "42",
        "role": "user",
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "aud": AUD,
        "iss": ISS,
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def signed(payload: dict[str, Any], *, key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, key, algorithm=algorithm)


def b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(obj)).rstrip(b"=").decode()


def refused(tokens: TokenService, token: str, code: str = errors.UNAUTHORIZED, **kw: Any) -> str:
    with pytest.raises(HubError) as info:
        tokens.decode(token, **kw)
    assert info.value.code == code
    return info.value.message


# -- TokenService ---------------------------------------------------------------------------


def test_issue_then_decode_round_trip(tokens: TokenService) -> None:
    token = tokens.issue("42", role="admin", channels=["room:*"])
    decoded: dict[str, Any] = tokens.decode(token)
    assert decoded["sub"] == "42" and decoded["role"] == "admin"
    assert decoded["aud"] == AUD and decoded["iss"] == ISS and decoded["typ"] == "access"
    assert decoded["exp"] - decoded["iat"] == pytest.approx(900, abs=1)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    principal = tokens.principal_from_claims(decoded)
    assert principal == Principal(
        subject="42",
        role="admin",
        channels=("room:*",),
        expires_at=float(decoded["exp"]),
        issued_at=float(decoded["iat"]),
        token_id=decoded["jti"],
    )


def test_issue_gives_each_token_its_own_jti(tokens: TokenService) -> None:
    assert tokens.decode(tokens.issue("1"))["jti"] != tokens.decode(tokens.issue("1"))["jti"]


def test_issue_refuses_unknown_role_and_bad_ttl(tokens: TokenService) -> None:
    with pytest.raises(ValueError, match="role"):
        tokens.issue("1", role="root")
    with pytest.raises(ValueError, match="ttl"):
        tokens.issue("1", ttl=0)
    with pytest.raises(ValueError, match="ttl"):
        tokens.issue("1", ttl=86_401)


def test_expired_token_is_token_expired(tokens: TokenService) -> None:
    now = int(time.time())
    message = refused(tokens, signed(claims(iat=now - 100, exp=now - 30)), errors.TOKEN_EXPIRED)
    assert "expired" in message


def test_small_clock_skew_is_tolerated(tokens: TokenService) -> None:
    now = int(time.time())
    assert tokens.decode(signed(claims(iat=now - 100, exp=now - 2)))["sub"] == "42"


def test_wrong_audience_is_refused(tokens: TokenService) -> None:
    assert "audience" in refused(tokens, signed(claims(aud="someone-else")))


def test_wrong_issuer_is_refused(tokens: TokenService) -> None:
    assert "issuer" in refused(tokens, signed(claims(iss="evil")))


def test_bad_signature_is_refused(tokens: TokenService) -> None:
    assert "signature" in refused(tokens, signed(claims(), key="another-secret-" + "k" * 40))


def test_tampered_payload_is_refused(tokens: TokenService) -> None:
    header, _, signature = tokens.issue("42").split(".")
    forged = f"{header}.{b64(claims(role='admin'))}.{signature}"
    assert "signature" in refused(tokens, forged)


def test_alg_none_is_refused(tokens: TokenService) -> None:
    unsigned = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims(role='admin'))}."
    refused(tokens, unsigned)
    refused(tokens, unsigned + "x")


def test_alg_none_with_uppercase_variant_is_refused(tokens: TokenService) -> None:
    refused(tokens, f"{b64({'alg': 'None', 'typ': 'JWT'})}.{b64(claims())}.")


def test_hs512_token_with_the_right_key_is_refused(tokens: TokenService) -> None:
    with warnings.catch_warnings():  # PyJWT finds the key short for SHA-512
        warnings.simplefilter("ignore")
        token = signed(claims(), algorithm="HS512")
    assert "algorithm" in refused(tokens, token)


def test_rs256_token_is_refused(tokens: TokenService) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert "algorithm" in refused(tokens, signed(claims(), key=key, algorithm="RS256"))  # type: ignore[arg-type]


def test_rs256_header_with_hmac_signature_is_refused(tokens: TokenService) -> None:
    # Key confusion: declare RS256 but sign with the shared secret as an HMAC key.
    import hashlib
    import hmac

    signing_input = f"{b64({'alg': 'RS256', 'typ': 'JWT'})}.{b64(claims())}"
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    signature = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    refused(tokens, f"{signing_input}.{signature}")


def test_jku_and_jwk_headers_are_ignored(tokens: TokenService) -> None:
    evil = jwt.encode(
        claims(),
        "attacker-secret-" + "a" * 40,
        algorithm="HS256",
        headers={"jku": "https://evil.example/keys", "kid": "x"},
    )
    assert "signature" in refused(tokens, evil)


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "aud", "iss"])
def test_required_claims(tokens: TokenService, claim: str) -> None:
    assert claim in refused(tokens, signed(claims(**{claim: None})))


@pytest.mark.parametrize("token", ["", "x" * 8193])
def test_empty_or_oversized_token_is_refused(tokens: TokenService, token: str) -> None:
    assert "missing or oversized" in refused(tokens, token)


@pytest.mark.parametrize("token", ["abc", "a.b.c", "eyJ.eyJ.x", "eyJhbGciOiJIUzI1NiJ9.e30"])
def test_malformed_token_is_refused(tokens: TokenService, token: str) -> None:
    refused(tokens, token)


def test_subscribe_token_cannot_be_used_as_access(tokens: TokenService) -> None:
    token = tokens.issue("42", token_type="subscribe")
    assert "subscribe token" in refused(tokens, token)
    assert tokens.decode(token, token_type="subscribe")["typ"] == "subscribe"


def test_access_token_cannot_be_used_as_subscribe(tokens: TokenService) -> None:
    assert "access token" in refused(tokens, tokens.issue("42"), token_type="subscribe")


def test_refresh_token_cannot_be_used_as_access(tokens: TokenService) -> None:
    refused(tokens, tokens.issue("42", token_type="refresh", ttl=10_000_000))


def test_token_without_typ_counts_as_access(tokens: TokenService) -> None:
    token = signed(claims())
    assert tokens.decode(token)["sub"] == "42"
    refused(tokens, token, token_type="subscribe")


def test_subscribe_token_ttl_defaults_to_subscribe_ttl(tokens: TokenService) -> None:
    decoded: dict[str, Any] = tokens.decode(
        tokens.issue("1", token_type="subscribe"), token_type="subscribe"
    )
    assert decoded["exp"] - decoded["iat"] == pytest.approx(60, abs=1)


@pytest.mark.parametrize("role", ["root", "", 5, None])
def test_unknown_role_is_refused(tokens: TokenService, role: object) -> None:
    decoded = tokens.decode(signed({**claims(), "role": role}))
    with pytest.raises(HubError) as info:
        tokens.principal_from_claims(decoded)
    assert info.value.code == errors.UNAUTHORIZED and "role" in info.value.message


def test_missing_role_means_user(tokens: TokenService) -> None:
    assert tokens.principal_from_claims(tokens.decode(signed(claims(role=None)))).role == "user"


@pytest.mark.parametrize("channels", ["room:*", [1, 2], {"a": 1}, ["ok", None]])
def test_channels_claim_must_be_a_list_of_strings(tokens: TokenService, channels: object) -> None:
    decoded = tokens.decode(signed({**claims(), "channels": channels}))
    with pytest.raises(HubError) as info:
        tokens.principal_from_claims(decoded)
    assert "channels" in info.value.message


def test_session_exp_outlives_a_subscribe_token(tokens: TokenService) -> None:
    session_exp = int(time.time()) + 600
    token = tokens.issue("42", token_type="subscribe", extra={"session_exp": session_exp})
    principal = tokens.principal_from_claims(tokens.decode(token, token_type="subscribe"))
    assert principal.expires_at == float(session_exp)


# -- Authenticator ----------------------------------------------------------------------------


def authenticator(tokens: TokenService, **kw: Any) -> Authenticator:
    return Authenticator(tokens, static_service_keys=[SERVICE_KEY, "second-key-abcdef12345"], **kw)


async def test_static_service_key_is_a_publishing_service(tokens: TokenService) -> None:
    principal = await authenticator(tokens).authenticate(SERVICE_KEY)
    assert principal.kind == "service" and principal.is_service
    assert principal.subject == "service-key-0"
    assert principal.may_publish() and not principal.is_admin
    second = await authenticator(tokens).authenticate("second-key-abcdef12345")
    assert second.subject == "service-key-1"


@pytest.mark.parametrize(
    "key",
    [
        SERVICE_KEY[:-1] + "X",  # same length, last byte differs
        SERVICE_KEY[:-1],  # a prefix
        SERVICE_KEY + "x",  # longer
        SERVICE_KEY.upper(),
        "",
    ],
)
async def test_near_miss_service_keys_are_refused(tokens: TokenService, key: str) -> None:
    auth = authenticator(tokens)
    assert await auth.authenticate_service_key(key) is None
    with pytest.raises(HubError) as info:
        await auth.authenticate(key)
    assert info.value.code == errors.UNAUTHORIZED


async def test_service_keys_are_compared_in_constant_time(
    tokens: TokenService, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hmac

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert await authenticator(tokens).authenticate_service_key("nope-" + "x" * 20) is None
    assert [b for _, b in calls] == [SERVICE_KEY.encode(), b"second-key-abcdef12345"]


async def test_added_verifier_is_consulted_after_static_keys(tokens: TokenService) -> None:
    seen: list[str] = []
    stored = Principal(
        subject="svc-7", role="user", kind="service", scopes=frozenset({"publish", "admin"})
    )

    async def verifier(key: str) -> Principal | None:
        seen.append(key)
        return stored if key == "stored-key-0123456789" else None

    auth = authenticator(tokens)
    auth.add_service_key_verifier(verifier)
    assert await auth.authenticate("stored-key-0123456789") is stored
    assert (await auth.authenticate(SERVICE_KEY)).subject == "service-key-0"
    assert seen == ["stored-key-0123456789"]
    with pytest.raises(HubError):
        await auth.authenticate("unknown-key-0123456789")


async def test_jwt_shaped_credentials_go_to_token_verification(tokens: TokenService) -> None:
    auth = authenticator(tokens)
    assert (await auth.authenticate(tokens.issue("42"))).subject == "42"
    now = int(time.time())
    with pytest.raises(HubError) as info:
        await auth.authenticate(signed(claims(iat=now - 100, exp=now - 30)))
    assert info.value.code == errors.TOKEN_EXPIRED


async def test_revoked_user_tokens_are_refused(tokens: TokenService) -> None:
    marks: dict[str, float] = {}

    async def not_before(user_id: str) -> float | None:
        return marks.get(user_id)

    auth = authenticator(tokens, revocation=not_before)
    old = tokens.issue("42")
    other = tokens.issue("43")
    assert (await auth.authenticate(old)).subject == "42"
    marks["42"] = time.time()
    with pytest.raises(HubError) as info:
        await auth.authenticate(old)
    assert info.value.code == errors.UNAUTHORIZED and "revoked" in info.value.message
    assert (await auth.authenticate(other)).subject == "43"
    # A token issued after the mark is accepted again.
    marks["42"] = time.time() - 10
    assert (await auth.authenticate(tokens.issue("42"))).subject == "42"


async def test_revocation_is_checked_for_subscribe_tokens(tokens: TokenService) -> None:
    async def not_before(user_id: str) -> float | None:
        return time.time()

    auth = authenticator(tokens, revocation=not_before)
    token = tokens.issue("42", token_type="subscribe")
    with pytest.raises(HubError, match="revoked"):
        await auth.authenticate_token(token, token_type="subscribe")


async def test_revocation_does_not_apply_to_services(tokens: TokenService) -> None:
    async def not_before(user_id: str) -> float | None:
        return time.time() + 1000

    auth = authenticator(tokens, revocation=not_before)
    assert (await auth.authenticate(SERVICE_KEY)).is_service


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc  ", "abc"),
        ("BEARER abc", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer    ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_credential(header: str | None, expected: str | None) -> None:
    assert bearer_credential(header) == expected


def test_principal_roles_and_scopes() -> None:
    assert Principal("1", "admin").is_admin
    assert not Principal("1", "moderator").is_admin
    assert not Principal("1", "admin").may_publish()  # users publish through policy, not scope
    assert Principal("s", "user", kind="service", scopes=frozenset({"admin"})).is_admin
