"""WebSocket /ws against a real uvicorn on this event loop, with the websockets client."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from hub import errors
from hub.protocol import SUBPROTOCOL

from .conftest import SERVICE_KEY, LiveServer, json_lines, wait_until

TIMEOUT = 5.0


class Client:
    """A test client: splits multi-line server frames and remembers how they were framed."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pending: deque[dict[str, Any]] = deque()
        self.frames: list[list[dict[str, Any]]] = []

    async def send(self, obj: dict[str, Any] | str) -> None:
        await self.ws.send(obj if isinstance(obj, str) else orjson.dumps(obj).decode())

    async def recv_frame(self) -> list[dict[str, Any]]:
        raw = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
        frame = json_lines(raw)
        self.frames.append(frame)
        return frame

    async def next(self) -> dict[str, Any]:
        while not self.pending:
            self.pending.extend(await self.recv_frame())
        return self.pending.popleft()

    async def expect(self, op: str, **fields: Any) -> dict[str, Any]:
        """The next object that is not a heartbeat; it must be ``op`` with ``fields``."""
        obj = await self.next()
        while obj.get("op") == "ping" and op != "ping":
            obj = await self.next()
        assert obj.get("op") == op, obj
        for key, value in fields.items():
            assert obj.get(key) == value, (key, obj)
        return obj

    async def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        await self.send(obj)
        reply = await self.next()
        assert reply.get("id") == obj.get("id"), reply
        return reply

    async def closed(self) -> tuple[int | None, str | None]:
        try:
            await asyncio.wait_for(self.ws.wait_closed(), TIMEOUT)
        except TimeoutError:
            pytest.fail("server did not close the connection")
        return self.ws.close_code, self.ws.close_reason


async def open_client(
    server: LiveServer, token: str | None = None, *, welcome: bool = True, **kw: Any
) -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    ws = await connect(
        server.ws_url,
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        additional_headers=headers,
        open_timeout=TIMEOUT,
        **kw,
    )
    client = Client(ws)
    if welcome:
        await client.expect("connected")
    return client


def issue(server: LiveServer, subject: str = "42", **kw: Any) -> str:
    return server.hub.authenticator.tokens.issue(subject, **kw)


@pytest.fixture
async def server(live: Callable[..., Any]) -> LiveServer:
    result: LiveServer = await live()
    return result


# -- handshake and auth ------------------------------------------------------------------------


async def test_header_auth_gets_a_welcome_frame(server: LiveServer) -> None:
    client = await open_client(server, issue(server), welcome=False)
    assert client.ws.subprotocol == SUBPROTOCOL
    welcome = await client.expect("connected", subject="42", id=None, node=server.hub.node_id)
    assert isinstance(welcome["connection"], int)
    assert welcome["expires_at"] > time.time()
    assert welcome["heartbeat"] == server.hub.settings.heartbeat_interval
    await client.ws.close()


async def test_auth_by_first_frame(server: LiveServer) -> None:
    client = await open_client(server, welcome=False)
    await client.send({"op": "auth", "token": issue(server, "7"), "id": 1})
    await client.expect("connected", id=1, subject="7")
    assert (await client.request({"op": "ping", "id": 2})) == {"op": "pong", "id": 2}
    await client.ws.close()


async def test_service_key_in_header(server: LiveServer) -> None:
    client = await open_client(server, SERVICE_KEY, welcome=False)
    await client.expect("connected", subject="service-key-0")
    await client.ws.close()


async def test_bad_first_frame_token_is_refused_with_error_then_bye(server: LiveServer) -> None:
    client = await open_client(server, welcome=False)
    await client.send({"op": "auth", "token": "eyJnope.eyJnope.sig", "id": 3})
    error = await client.expect("error", id=3, code="unauthorized")
    assert error["temporary"] is False
    bye = await client.expect("bye", code="unauthorized", reconnect=False)
    assert bye["close_code"] == 4501
    assert await client.closed() == (4501, "unauthorized")


async def test_first_frame_must_be_auth(server: LiveServer) -> None:
    client = await open_client(server, welcome=False)
    await client.send({"op": "subscribe", "channel": "public:x", "id": 1})
    assert "auth" in (await client.expect("error", id=1, code="unauthorized"))["message"]
    await client.expect("bye", code="unauthorized")
    assert (await client.closed())[0] == 4501


async def test_bad_header_token_is_refused(server: LiveServer) -> None:
    client = await open_client(server, "not-a-valid-key-at-all", welcome=False)
    await client.expect("error", code="unauthorized")
    await client.expect("bye", code="unauthorized")
    assert (await client.closed())[0] == 4501


async def test_expired_header_token_says_token_expired(server: LiveServer) -> None:
    token = issue(server, extra={"exp": int(time.time()) - 60, "iat": int(time.time()) - 120})
    client = await open_client(server, token, welcome=False)
    await client.expect("error", code="token_expired")
    assert (await client.closed())[0] == 4501


async def test_auth_timeout(live: Callable[..., Any]) -> None:
    server: LiveServer = await live(auth_timeout=0.2)
    client = await open_client(server, welcome=False)
    await client.expect("bye", code="auth_timeout", reconnect=False)
    assert (await client.closed())[0] == 4502


async def test_forbidden_origin_is_refused_before_accept(live: Callable[..., Any]) -> None:
    server: LiveServer = await live(allowed_origins=["https://app.example"])
    with pytest.raises(InvalidStatus) as info:
        await open_client(server, issue(server), origin="https://evil.example")
    assert info.value.response.status_code == 403
    client = await open_client(server, issue(server), origin="https://app.example")
    await client.ws.close()


async def test_same_origin_is_allowed_without_an_allow_list(server: LiveServer) -> None:
    same = f"http://127.0.0.1:{server.port}"
    client = await open_client(server, issue(server), origin=same)
    await client.ws.close()
    with pytest.raises(InvalidStatus):
        await open_client(server, issue(server), origin="http://other.example")


async def test_connection_limit_says_bye(live: Callable[..., Any]) -> None:
    server: LiveServer = await live(max_connections_per_user=1)
    first = await open_client(server, issue(server))
    second = await open_client(server, issue(server), welcome=False)
    await second.expect("bye", code="connection_limit", reconnect=True)
    assert (await second.closed())[0] == 4006
    await first.ws.close()


# -- requests ----------------------------------------------------------------------------------


async def test_subscribe_ack_then_message_delivery(server: LiveServer) -> None:
    client = await open_client(server, issue(server))
    ack = await client.request({"op": "subscribe", "channel": "user:42", "id": 1})
    assert ack["op"] == "ack" and ack["channel"] == "user:42"
    epoch = (await server.hub.broker.position("user:42")).epoch
    assert ack["offset"] == f"0:{epoch}"
    assert "recovered" not in ack
    pub = await server.hub.publish("user:42", "user.updated", {"name": "Ada"})
    message = await client.expect("message")
    assert message == {
        "op": "message",
        "channel": "user:42",
        "offset": pub.position.token(),
        "event": "user.updated",
        "data": {"name": "Ada"},
        "ts": pub.ts,
    }
    await client.ws.close()


async def test_many_queued_messages_arrive_as_one_multi_line_frame(server: LiveServer) -> None:
    client = await open_client(server, issue(server))
    await client.request({"op": "subscribe", "channel": "user:42", "id": 1})
    # Published in one synchronous step: the writer finds all of them queued at once.
    await server.hub.publish_many([("user:42", "e", n) for n in range(5)])
    frame = await client.recv_frame()
    assert [obj["data"] for obj in frame] == [0, 1, 2, 3, 4]
    assert all(obj["op"] == "message" for obj in frame)
    await client.ws.close()


async def test_subscribe_with_since_replays_after_the_ack(server: LiveServer) -> None:
    for n in range(4):
        await server.hub.publish("public:x", "e", n)
    epoch = (await server.hub.broker.position("public:x")).epoch
    client = await open_client(server, issue(server))
    await client.send({"op": "subscribe", "channel": "public:x", "since": f"2:{epoch}", "id": 5})
    await client.expect("ack", id=5, recovered=True, offset=f"4:{epoch}")
    assert (await client.expect("message"))["data"] == 2
    assert (await client.expect("message"))["data"] == 3
    await client.send({"op": "subscribe", "channel": "public:y", "since": "9:nope", "id": 6})
    await client.expect("ack", id=6, recovered=False)
    await client.ws.close()


async def test_bad_frames_get_errors_and_the_connection_stays_open(server: LiveServer) -> None:
    client = await open_client(server, issue(server))
    await client.send("this is not json")
    await client.expect("error", code="bad_request", id=None)
    await client.send('["op"]')
    await client.expect("error", code="bad_request")
    await client.send({"op": "dance", "id": 1})
    await client.expect("error", code="unknown_op", id=1)
    await client.send({"op": "ping", "id": -1})
    await client.expect("error", code="bad_request", id=None)
    await client.ws.send(b"\x00binary")
    await client.expect("error", code="bad_request")
    await client.send({"op": "subscribe", "channel": "user:43", "id": 2})
    await client.expect("error", code="forbidden", id=2)
    await client.send({"op": "subscribe", "channel": "user:{42}", "id": 3})
    await client.expect("error", code="bad_channel", id=3)
    await client.send({"op": "unsubscribe", "channel": "public:x", "id": 4})
    await client.expect("error", code="not_subscribed", id=4)
    await client.send({"op": "publish", "channel": "public:x", "event": "e", "data": 1, "id": 5})
    await client.expect("error", code="forbidden", id=5)
    await client.send({"op": "auth", "token": issue(server), "id": 6})
    await client.expect("error", code="already_authenticated", id=6)
    assert await client.request({"op": "ping", "id": 7}) == {"op": "pong", "id": 7}
    await client.ws.close()


async def test_subscribe_twice_and_unsubscribe(server: LiveServer) -> None:
    client = await open_client(server, issue(server))
    await client.request({"op": "subscribe", "channel": "public:x", "id": 1})
    again = await client.request({"op": "subscribe", "channel": "public:x", "id": 2})
    assert again["code"] == "already_subscribed"
    assert await client.request({"op": "unsubscribe", "channel": "public:x", "id": 3}) == {
        "op": "ack",
        "id": 3,
        "channel": "public:x",
    }
    await server.hub.publish("public:x", "e", 1)
    assert await client.request({"op": "ping", "id": 4}) == {"op": "pong", "id": 4}
    await client.ws.close()


async def test_publish_op_for_a_service(server: LiveServer) -> None:
    client = await open_client(server, SERVICE_KEY)
    await client.request({"op": "subscribe", "channel": "public:x", "id": 1})
    await client.send(
        {"op": "publish", "channel": "public:x", "event": "e", "data": {"a": 1}, "id": 2}
    )
    # The publisher's own copy is fanned out while the publish runs, so it may come first.
    by_op = {obj["op"]: obj for obj in [await client.next(), await client.next()]}
    ack, message = by_op["ack"], by_op["message"]
    assert ack["id"] == 2 and ack["channel"] == "public:x"
    assert ack["offset"] == message["offset"] and ack["offset"].startswith("1:")
    assert message["data"] == {"a": 1}
    await client.ws.close()


async def test_oversized_publish_is_message_too_large(live: Callable[..., Any]) -> None:
    server: LiveServer = await live(max_message_bytes=256)
    client = await open_client(server, SERVICE_KEY)
    await client.send(
        {"op": "publish", "channel": "public:x", "event": "e", "data": "x" * 300, "id": 1}
    )
    await client.expect("error", id=1, code="message_too_large")
    assert await client.request({"op": "ping", "id": 2}) == {"op": "pong", "id": 2}
    await client.ws.close()


async def test_frame_over_the_size_limit_closes_the_connection(live: Callable[..., Any]) -> None:
    server: LiveServer = await live(max_message_bytes=256)
    client = await open_client(server, issue(server))
    with pytest.raises(ConnectionClosed):
        await client.send("x" * (server.hub.settings.max_frame_bytes + 10))
        await client.next()
    assert client.ws.close_code == 1009  # message too big
    await wait_until(lambda: len(server.hub.registry) == 0)


async def test_refresh_op_extends_an_expiring_connection(server: LiveServer) -> None:
    soon = time.time() + 1.0
    client = await open_client(server, issue(server, extra={"exp": soon}))
    ack = await client.request({"op": "refresh", "token": issue(server, ttl=600), "id": 9})
    assert ack["op"] == "ack" and ack["expires_at"] > soon + 60
    await asyncio.sleep(max(0.0, soon - time.time()) + 0.3)
    assert await client.request({"op": "ping", "id": 10}) == {"op": "pong", "id": 10}
    other = await client.request({"op": "refresh", "token": issue(server, "43"), "id": 11})
    assert other["code"] == "forbidden"
    await client.ws.close()


async def test_token_expiry_closes_with_token_expired(server: LiveServer) -> None:
    client = await open_client(
        server, issue(server, extra={"exp": time.time() + 0.5}), welcome=False
    )
    first = await client.next()
    # On a slow machine the token may expire before the welcome is written.
    bye = await client.expect("bye") if first["op"] == "connected" else first
    assert bye["op"] == "bye" and bye["code"] == "token_expired" and bye["reconnect"] is True
    assert bye["close_code"] == errors.TOKEN_EXPIRED_DISCONNECT.code
    assert (await client.closed())[0] == 4003


async def test_disconnect_user_closes_live_websockets(server: LiveServer) -> None:
    victim = await open_client(server, issue(server, "9"))
    bystander = await open_client(server, issue(server, "10"))
    await server.hub.disconnect_user("9")
    await victim.expect("bye", code="user_disabled", reconnect=False)
    assert (await victim.closed())[0] == 4504
    assert await bystander.request({"op": "ping", "id": 1}) == {"op": "pong", "id": 1}
    await bystander.ws.close()


async def test_drain_says_bye_with_reconnect_and_1001(server: LiveServer) -> None:
    client = await open_client(server, issue(server))
    await server.hub.drain(grace=2)
    await client.expect("bye", code="shutdown", reconnect=True)
    assert (await client.closed())[0] == 1001
    assert len(server.hub.registry) == 0


async def test_heartbeat_ping_when_idle(live: Callable[..., Any]) -> None:
    server: LiveServer = await live(heartbeat_interval=0.1)
    client = await open_client(server, issue(server))
    assert await client.next() == {"op": "ping"}
    await client.ws.close()


async def test_client_close_releases_the_connection(server: LiveServer) -> None:
    client = await open_client(server, issue(server))
    await client.request({"op": "subscribe", "channel": "public:x", "id": 1})
    assert len(server.hub.registry) == 1
    await client.ws.close()
    await wait_until(lambda: len(server.hub.registry) == 0)
    await wait_until(lambda: not server.hub.registry.has_subscribers("public:x"))
