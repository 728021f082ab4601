"""Every bad client gets its documented error or close code, and nobody else notices.

One single-worker server (embedded mode) with a short auth deadline, a small message
limit and an Origin allow-list. Each test keeps a good subscriber connected while a
bad client misbehaves, then proves the good one still receives.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import orjson
import pytest
from websockets.exceptions import InvalidStatus

from .conftest import running_herald
from .helpers import (
    SECRET,
    SERVICE_HEADERS,
    HeraldProcess,
    WSClient,
    publish_fresh,
    sse_request,
    token,
    ws_connect,
    ws_connect_first_frame,
    ws_open,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

MAX_MESSAGE_BYTES = 1024
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES + 4096  # Settings.max_frame_bytes
GOOD_ORIGIN = "http://good.example"


@pytest.fixture(scope="module")
def herald() -> Iterator[HeraldProcess]:
    env = {
        "HERALD_AUTH_TIMEOUT": "1",
        "HERALD_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
        "HERALD_ALLOWED_ORIGINS": GOOD_ORIGIN,
    }
    with running_herald(env=env) as server:
        yield server


class Witness:
    """A well-behaved subscriber that must keep receiving whatever others do."""

    def __init__(self, herald: HeraldProcess, client: WSClient, channel: str) -> None:
        self.herald = herald
        self.client = client
        self.channel = channel

    async def assert_receives(self) -> None:
        marker = uuid.uuid4().hex
        response = await publish_fresh(self.herald.base_url, self.channel, "alive", marker)
        assert response.status_code == 200, response.text
        message = await self.client.recv_until(lambda obj: obj.get("op") == "message")
        assert message["data"] == marker
        assert message["channel"] == self.channel


@pytest.fixture
async def witness(herald: HeraldProcess) -> Any:
    client = await ws_connect(herald.ws_url, token("witness"))
    channel = "user:witness"
    await client.subscribe(channel)
    try:
        yield Witness(herald, client, channel)
    finally:
        await client.aclose()


# -- bad tokens -------------------------------------------------------------------------------


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(obj)).rstrip(b"=").decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "42",
        "role": "user",
        "iat": now,
        "exp": now + 600,
        "aud": "herald",
        "iss": "herald",
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def bad_signature() -> str:
    return jwt.encode(_claims(), "another-secret-" + "y" * 40, algorithm="HS256")


def expired() -> str:
    now = int(time.time())
    return jwt.encode(_claims(iat=now - 3600, exp=now - 600), SECRET, algorithm="HS256")


def wrong_audience() -> str:
    return jwt.encode(_claims(aud="someone-else"), SECRET, algorithm="HS256")


def alg_none() -> str:
    # Crafted by hand: a library would refuse to produce it.
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}."


def missing_exp() -> str:
    return jwt.encode(_claims(exp=None), SECRET, algorithm="HS256")


BAD_TOKENS = [
    pytest.param(bad_signature, "unauthorized", id="bad-signature"),
    pytest.param(expired, "token_expired", id="expired"),
    pytest.param(wrong_audience, "unauthorized", id="wrong-audience"),
    pytest.param(alg_none, "unauthorized", id="alg-none"),
    pytest.param(missing_exp, "unauthorized", id="missing-exp"),
]


def _assert_refused(seen: list[dict[str, Any]], close_code: int | None, code: str) -> None:
    errors = [obj for obj in seen if obj.get("op") == "error"]
    byes = [obj for obj in seen if obj.get("op") == "bye"]
    assert [e["code"] for e in errors] == [code], seen
    assert len(byes) == 1, seen
    assert byes[0]["code"] == "unauthorized"
    assert byes[0]["close_code"] == 4501
    assert byes[0]["reconnect"] is False
    assert close_code == 4501
    assert not [obj for obj in seen if obj.get("op") == "connected"], seen


@pytest.mark.parametrize(("make", "code"), BAD_TOKENS)
async def test_ws_header_auth_refuses_bad_token(
    herald: HeraldProcess, witness: Witness, make: Any, code: str
) -> None:
    client = await ws_open(herald.ws_url, make())
    seen, close_code = await client.wait_closed()
    _assert_refused(seen, close_code, code)
    await witness.assert_receives()


@pytest.mark.parametrize(("make", "code"), BAD_TOKENS)
async def test_ws_first_frame_auth_refuses_bad_token(
    herald: HeraldProcess, witness: Witness, make: Any, code: str
) -> None:
    client = await ws_open(herald.ws_url)
    await client.send_raw(orjson.dumps({"op": "auth", "token": make(), "id": 7}).decode())
    seen, close_code = await client.wait_closed()
    _assert_refused(seen, close_code, code)
    assert seen[0]["id"] == 7, "the error answers the auth frame's id"
    await witness.assert_receives()


@pytest.mark.parametrize(("make", "code"), BAD_TOKENS)
async def test_sse_refuses_bad_token_with_401(
    herald: HeraldProcess, witness: Witness, make: Any, code: str
) -> None:
    client, response = await sse_request(herald.base_url, ["user:42"], make())
    try:
        body = orjson.loads(await response.aread())
    finally:
        await response.aclose()
        await client.aclose()
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    await witness.assert_receives()


async def test_first_frame_auth_accepts_good_token(herald: HeraldProcess) -> None:
    client = await ws_connect_first_frame(herald.ws_url, token("42"))
    try:
        await client.subscribe("user:42")
        response = await publish_fresh(herald.base_url, "user:42", "hello", {"n": 1})
        assert response.status_code == 200
        message = await client.recv_until(lambda obj: obj.get("op") == "message")
        assert message["data"] == {"n": 1}
    finally:
        await client.aclose()


async def test_ws_without_credentials_is_refused_when_first_frame_is_not_auth(
    herald: HeraldProcess, witness: Witness
) -> None:
    client = await ws_open(herald.ws_url)
    await client.send_raw('{"op":"subscribe","channel":"public:x","id":3}')
    seen, close_code = await client.wait_closed()
    assert close_code == 4501
    assert [obj["code"] for obj in seen if obj["op"] == "error"] == ["unauthorized"]
    await witness.assert_receives()


async def test_ws_auth_timeout_closes_with_4502(herald: HeraldProcess, witness: Witness) -> None:
    client = await ws_open(herald.ws_url)
    started = time.monotonic()
    seen, close_code = await client.wait_closed(timeout=5)
    elapsed = time.monotonic() - started
    assert close_code == 4502
    assert [obj["code"] for obj in seen if obj["op"] == "bye"] == ["auth_timeout"]
    assert 0.5 < elapsed < 3.0, elapsed
    await witness.assert_receives()


# -- channel policy -------------------------------------------------------------------------


async def test_ws_forbidden_channel_gets_forbidden_and_stays_open(
    herald: HeraldProcess, witness: Witness
) -> None:
    client = await ws_connect(herald.ws_url, token("42"))
    try:
        reply = await client.request({"op": "subscribe", "channel": "user:43"})
        assert reply["op"] == "error" and reply["code"] == "forbidden", reply
        reply = await client.request({"op": "subscribe", "channel": "users"})
        assert reply["op"] == "error" and reply["code"] == "forbidden", reply
        reply = await client.request({"op": "subscribe", "channel": "bad channel!"})
        assert reply["op"] == "error" and reply["code"] == "bad_channel", reply
        # A user may not publish to someone's channel either.
        reply = await client.request(
            {"op": "publish", "channel": "user:43", "event": "x", "data": 1}
        )
        assert reply["op"] == "error" and reply["code"] == "forbidden", reply
        # The connection survived all of it.
        await client.subscribe("user:42")
        response = await publish_fresh(herald.base_url, "user:42", "after", 1)
        assert response.status_code == 200
        message = await client.recv_until(lambda obj: obj.get("op") == "message")
        assert message["event"] == "after"
    finally:
        await client.aclose()
    await witness.assert_receives()


async def test_sse_forbidden_channel_gets_403(herald: HeraldProcess, witness: Witness) -> None:
    client, response = await sse_request(herald.base_url, ["user:43"], token("42"))
    try:
        body = orjson.loads(await response.aread())
    finally:
        await response.aclose()
        await client.aclose()
    assert response.status_code == 403
    assert body["error"]["code"] == "forbidden"
    await witness.assert_receives()


# -- malformed and oversized frames ---------------------------------------------------------


async def test_ws_malformed_json_gets_bad_request(herald: HeraldProcess, witness: Witness) -> None:
    client = await ws_connect(herald.ws_url, token("42"))
    try:
        await client.send_raw("{this is not json")
        reply = await client.recv_until(lambda obj: obj.get("op") == "error")
        assert reply["code"] == "bad_request"
        assert reply["id"] is None
        await client.send_raw("[1, 2, 3]")
        reply = await client.recv_until(lambda obj: obj.get("op") == "error")
        assert reply["code"] == "bad_request"
        pong = await client.request({"op": "ping"})
        assert pong == {"op": "pong", "id": pong["id"]}, "the connection is still usable"
    finally:
        await client.aclose()
    await witness.assert_receives()


async def test_ws_unknown_op_gets_unknown_op(herald: HeraldProcess, witness: Witness) -> None:
    client = await ws_connect(herald.ws_url, token("42"))
    try:
        reply = await client.request({"op": "dance"})
        assert reply["op"] == "error" and reply["code"] == "unknown_op", reply
        assert reply["temporary"] is False
        await client.subscribe("user:42")
    finally:
        await client.aclose()
    await witness.assert_receives()


async def test_ws_oversized_frame_closes_with_1009(herald: HeraldProcess, witness: Witness) -> None:
    client = await ws_connect(herald.ws_url, token("42"))
    padding = "x" * (MAX_FRAME_BYTES + 100)
    await client.send_raw(orjson.dumps({"op": "ping", "pad": padding}).decode())
    _, close_code = await client.wait_closed()
    assert close_code == 1009
    await witness.assert_receives()


async def test_oversized_publish_gets_message_too_large(
    herald: HeraldProcess, witness: Witness
) -> None:
    big = "x" * (MAX_MESSAGE_BYTES + 10)  # over the message limit, under the frame limit
    client = await ws_connect(herald.ws_url, token("admin-1", role="admin"))
    try:
        reply = await client.request(
            {"op": "publish", "channel": "public:big", "event": "big", "data": big}
        )
        assert reply["op"] == "error" and reply["code"] == "message_too_large", reply
        reply = await client.request(
            {"op": "publish", "channel": "public:big", "event": "small", "data": "ok"}
        )
        assert reply["op"] == "ack", reply
    finally:
        await client.aclose()
    response = await publish_fresh(herald.base_url, "user:witness", "big", big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "message_too_large"
    async with httpx.AsyncClient(base_url=herald.base_url, trust_env=False) as http:
        response = await http.post(
            "/api/v1/publish/batch",
            json={"messages": [{"channel": "user:witness", "event": "big", "data": big}]},
            headers=SERVICE_HEADERS,
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "message_too_large"
    await witness.assert_receives()


# -- origin ---------------------------------------------------------------------------------


async def test_ws_forbidden_origin_refused_at_handshake(
    herald: HeraldProcess, witness: Witness
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await ws_open(herald.ws_url, token("42"), origin="http://evil.example")
    assert refused.value.response.status_code == 403
    client = await ws_connect(herald.ws_url, token("42"), origin=GOOD_ORIGIN)
    await client.aclose()
    await witness.assert_receives()
