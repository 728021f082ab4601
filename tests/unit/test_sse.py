"""SSE /sse against a real uvicorn on this event loop, read with httpx streaming."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from hub import errors

from .conftest import SERVICE_KEY, LiveServer, wait_until

TIMEOUT = 5.0


@dataclass
class Event:
    event: str
    data: Any
    id: str | None


class Stream:
    """Parses an SSE body into events; remembers ``retry:`` and comment lines."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()
        self.retry: int | None = None
        self.comments: list[str] = []

    async def next(self) -> Event:
        return await asyncio.wait_for(self._next(), TIMEOUT)

    async def _next(self) -> Event:
        fields: dict[str, str] = {}
        data: list[str] = []
        async for line in self._lines:
            if not line:
                if data or fields:
                    return Event(
                        fields.get("event", "message"),
                        orjson.loads("\n".join(data)),
                        fields.get("id"),
                    )
                continue
            if line.startswith(":"):
                self.comments.append(line)
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "retry":
                self.retry = int(value)
            else:
                fields[name] = value
        raise EOFError("stream ended")

    async def expect(self, event: str) -> Event:
        got = await self.next()
        assert got.event == event, got
        return got


@contextlib.asynccontextmanager
async def sse(
    server: LiveServer,
    channels: list[str],
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> AsyncIterator[Stream]:
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    query: list[tuple[str, str | int | float | bool | None]] = [("channel", c) for c in channels]
    query += list((params or {}).items())
    async with (
        httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT) as client,
        client.stream("GET", "/sse", params=query, headers=all_headers) as response,
    ):
        yield Stream(response)


def issue(server: LiveServer, subject: str = "42", **kw: Any) -> str:
    return server.hub.authenticator.tokens.issue(subject, **kw)


@pytest.fixture
async def server(live: Callable[..., Any]) -> LiveServer:
    result: LiveServer = await live(sse_retry_ms=1500)
    return result


async def test_headers_retry_and_connected_event(server: LiveServer) -> None:
    async with sse(server, ["user:42", "public:news"], token=issue(server)) as stream:
        response = stream.response
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in response.headers
        connected = await stream.expect("connected")
        assert stream.retry == 1500
        assert connected.id  # even the first event carries a resume cursor
        assert connected.data["op"] == "connected"
        assert connected.data["subject"] == "42"
        assert set(connected.data["channels"]) == {"user:42", "public:news"}
        for status in connected.data["channels"].values():
            assert "recovered" not in status  # nothing was asked
            assert status["offset"].startswith("0:")


async def test_messages_carry_id_event_and_the_envelope(server: LiveServer) -> None:
    async with sse(server, ["user:42", "public:news"], token=issue(server)) as stream:
        connected = await stream.expect("connected")
        pub = await server.hub.publish("user:42", "user.updated", {"name": "Ada"})
        await server.hub.publish("public:news", "headline", "hi")
        first = await stream.expect("user.updated")
        assert first.data == {
            "op": "message",
            "channel": "user:42",
            "offset": pub.position.token(),
            "event": "user.updated",
            "data": {"name": "Ada"},
            "ts": pub.ts,
        }
        second = await stream.expect("headline")
        ids = [connected.id, first.id, second.id]
        assert all(ids) and len(set(ids)) == 3


async def test_resume_with_last_event_id_across_two_channels(server: LiveServer) -> None:
    hub = server.hub
    channels = ["user:42", "public:news"]
    token = issue(server)
    async with sse(server, channels, token=token) as stream:
        await stream.expect("connected")
        await hub.publish_many(
            [
                ("user:42", "u", 1),
                ("public:news", "n", 1),
                ("user:42", "u", 2),
                ("public:news", "n", 2),
            ]
        )
        received = [await stream.next() for _ in range(3)]
        assert [(e.event, e.data["data"]) for e in received] == [("u", 1), ("n", 1), ("u", 2)]
        last_id = received[-1].id
        # The fourth event (n 2) is "lost" with the connection.
    await wait_until(lambda: len(hub.registry) == 0)
    await hub.publish_many([("user:42", "u", 3), ("public:news", "n", 3)])
    async with sse(server, channels, token=token, headers={"Last-Event-ID": last_id or ""}) as s:
        connected = await s.expect("connected")
        assert {ch: st["recovered"] for ch, st in connected.data["channels"].items()} == {
            "user:42": True,
            "public:news": True,
        }
        replayed = [await s.next() for _ in range(3)]
        per_channel: dict[str, list[int]] = {}
        for event in replayed:
            per_channel.setdefault(event.data["channel"], []).append(event.data["data"])
        assert per_channel == {"public:news": [2, 3], "user:42": [3]}
        # Nothing more: a live message is the next thing to arrive.
        await hub.publish("user:42", "u", 4)
        assert (await s.next()).data["data"] == 4


async def test_resume_cursor_of_the_connected_event_loses_nothing(server: LiveServer) -> None:
    """A client that drops right after ``connected`` (before the replay reached it) and
    resumes from that event's id must still get the replayed messages."""
    hub = server.hub
    channels = ["public:a", "public:b"]
    token = issue(server)
    async with sse(server, channels, token=token) as stream:
        start = (await stream.expect("connected")).id
    await wait_until(lambda: len(hub.registry) == 0)
    await hub.publish_many([("public:a", "e", 1), ("public:b", "e", 1), ("public:a", "e", 2)])
    async with sse(server, channels, token=token, headers={"Last-Event-ID": start or ""}) as s:
        resumed_at = (await s.expect("connected")).id
    await wait_until(lambda: len(hub.registry) == 0)
    async with sse(server, channels, token=token, headers={"Last-Event-ID": resumed_at or ""}) as s:
        await s.expect("connected")
        got = sorted(
            (e.data["channel"], e.data["data"]) for e in [await s.next() for _ in range(3)]
        )
        assert got == [("public:a", 1), ("public:a", 2), ("public:b", 1)]


async def test_garbage_cursor_reports_not_recovered(server: LiveServer) -> None:
    await server.hub.publish("user:42", "u", 1)
    async with sse(
        server, ["user:42", "public:news"], token=issue(server), headers={"Last-Event-ID": "junk"}
    ) as stream:
        connected = await stream.expect("connected")
        statuses = connected.data["channels"]
        assert statuses["user:42"] == {"recovered": False, "offset": statuses["user:42"]["offset"]}
        assert statuses["public:news"]["recovered"] is False
        await server.hub.publish("user:42", "u", 2)
        assert (await stream.next()).data["data"] == 2  # live only, no replay


async def test_cursor_for_other_channels_is_not_applied(server: LiveServer) -> None:
    token = issue(server)
    async with sse(server, ["public:a"], token=token) as stream:
        cursor = (await stream.expect("connected")).id
    await server.hub.publish("public:b", "e", 1)
    async with sse(server, ["public:b"], token=token, params={"lastEventId": cursor or ""}) as s:
        connected = await s.expect("connected")
        assert connected.data["channels"]["public:b"]["recovered"] is False


async def test_last_event_id_query_parameter_resumes(server: LiveServer) -> None:
    token = issue(server)
    async with sse(server, ["public:a"], token=token) as stream:
        cursor = (await stream.expect("connected")).id
    await server.hub.publish("public:a", "e", 1)
    async with sse(server, ["public:a"], token=token, params={"lastEventId": cursor or ""}) as s:
        assert (await s.expect("connected")).data["channels"]["public:a"]["recovered"] is True
        assert (await s.next()).data["data"] == 1


async def test_subscribe_token_in_the_query_string(server: LiveServer) -> None:
    tokens = server.hub.authenticator.tokens
    sub = tokens.issue("42", token_type="subscribe")
    async with sse(server, ["user:42"], params={"token": sub}) as stream:
        assert stream.response.status_code == 200
        assert (await stream.expect("connected")).data["subject"] == "42"
    async with sse(server, ["user:42"], params={"token": issue(server)}) as stream:
        assert stream.response.status_code == 401  # an access token is not accepted there
        await stream.response.aread()
        assert stream.response.json()["error"]["code"] == "unauthorized"


async def test_cookie_auth_checks_the_origin(live: Callable[..., Any]) -> None:
    server: LiveServer = await live(allowed_origins=["https://app.example"])
    cookie = {"Cookie": f"herald_token={issue(server)}"}
    async with sse(
        server, ["user:42"], headers={**cookie, "Origin": "https://evil.example"}
    ) as stream:
        assert stream.response.status_code == 403
    async with sse(server, ["user:42"], headers={**cookie, "Origin": "https://app.example"}) as s:
        assert s.response.status_code == 200


@pytest.mark.parametrize(
    ("channels", "status", "code"),
    [
        ([], 400, "bad_request"),
        (["user:43"], 403, "forbidden"),
        (["bad channel"], 400, "bad_channel"),
        (["public:1", "public:2", "public:3"], 400, "too_many_channels"),
    ],
)
async def test_refusals_are_plain_http_errors(
    live: Callable[..., Any], channels: list[str], status: int, code: str
) -> None:
    server: LiveServer = await live(max_channels_per_connection=2)
    async with sse(server, channels, token=issue(server)) as stream:
        assert stream.response.status_code == status
        await stream.response.aread()
        assert stream.response.json()["error"]["code"] == code
    await wait_until(lambda: len(server.hub.registry) == 0)
    await wait_until(lambda: server.hub.registry.channel_count == 0)


async def test_missing_credentials_is_401(server: LiveServer) -> None:
    async with sse(server, ["public:a"]) as stream:
        assert stream.response.status_code == 401
        assert stream.response.headers["www-authenticate"] == "Bearer"


async def test_errors_and_streams_carry_the_request_id(server: LiveServer) -> None:
    # /sse is dispatched past the middleware stack; it must keep the request id.
    incoming = "trace-0123456789"
    async with sse(server, ["public:a"], headers={"X-Request-ID": incoming}) as stream:
        assert stream.response.status_code == 401
        assert stream.response.headers["x-request-id"] == incoming
        await stream.response.aread()
        assert stream.response.json()["error"]["request_id"] == incoming
    async with sse(server, ["public:a"], token=issue(server)) as stream:
        await stream.expect("connected")
        assert len(stream.response.headers["x-request-id"]) >= 8


async def test_service_key_can_stream_public_channels(server: LiveServer) -> None:
    async with sse(server, ["public:a"], token=SERVICE_KEY) as stream:
        assert (await stream.expect("connected")).data["subject"] == "service-key-0"


async def test_disconnect_ends_the_stream_with_a_disconnect_event(server: LiveServer) -> None:
    async with sse(server, ["user:42"], token=issue(server)) as stream:
        await stream.expect("connected")
        await server.hub.disconnect_user("42")
        bye = await stream.expect("disconnect")
        assert bye.data == {
            "op": "bye",
            "code": "user_disabled",
            "close_code": 4504,
            "message": "user was disabled or deleted",
            "reconnect": False,
        }
        with pytest.raises(EOFError):
            await stream.next()


async def test_subscribe_token_stream_lives_until_session_exp(server: LiveServer) -> None:
    import time

    tokens = server.hub.authenticator.tokens
    sub = tokens.issue("42", token_type="subscribe", extra={"session_exp": time.time() + 0.4})
    async with sse(server, ["user:42"], params={"token": sub}) as stream:
        await stream.expect("connected")
        bye = await stream.expect("disconnect")
        assert bye.data["code"] == "token_expired"


async def test_closing_the_stream_releases_the_connection(server: LiveServer) -> None:
    async with sse(server, ["public:a"], token=issue(server)) as stream:
        await stream.expect("connected")
        assert len(server.hub.registry) == 1
    await wait_until(lambda: len(server.hub.registry) == 0)
    await wait_until(lambda: not server.hub.registry.has_subscribers("public:a"))


# -- the write paths: raw (herald serve) and portable (plain uvicorn) --------------------------


async def test_the_stream_uses_the_expected_write_path(server: LiveServer) -> None:
    async with sse(server, ["public:a"], token=issue(server)) as stream:
        await stream.expect("connected")
        (conn,) = server.hub.registry.connections
        assert conn.direct is server.raw_paths
        await server.hub.publish("public:a", "news", {"n": 1})
        assert (await stream.expect("news")).data["data"] == {"n": 1}


async def test_an_idle_stream_gets_heartbeat_comments(live: Callable[..., Any]) -> None:
    server: LiveServer = await live(heartbeat_interval=0.1)
    async with sse(server, ["public:a"], token=issue(server)) as stream:
        await stream.expect("connected")
        await asyncio.sleep(0.5)
        await server.hub.publish("public:a", "news", 1)
        await stream.expect("news")
        assert len(stream.comments) >= 2, stream.comments
        assert all(c.startswith(": ping") for c in stream.comments), stream.comments


async def _raw_get(
    port: int, target: str, token: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    return reader, writer, head


async def _read_until(reader: asyncio.StreamReader, needle: bytes) -> bytes:
    data = b""
    while needle not in data:
        chunk = await asyncio.wait_for(reader.read(65536), TIMEOUT)
        if not chunk:
            raise EOFError(data)
        data += chunk
    return data


async def test_server_close_ends_the_chunked_response(server: LiveServer) -> None:
    reader, writer, head = await _raw_get(server.port, "/sse?channel=user:42", issue(server))
    try:
        assert b"transfer-encoding: chunked" in head.lower()
        await _read_until(reader, b"event: connected\n")
        await server.hub.disconnect_user("42")
        body = await _read_until(reader, b"\r\n0\r\n\r\n")  # the last chunk
        assert b"event: disconnect\n" in body
        if server.raw_paths:
            # A stream the server ended is not kept alive: the connection closes.
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    finally:
        writer.close()


async def test_a_slow_stream_is_cut_and_the_reader_keeps_receiving(
    live: Callable[..., Any],
) -> None:
    import socket

    server: LiveServer = await live(
        outbox_max_messages=64,
        outbox_max_bytes=65536,
        max_message_bytes=16384,
        send_timeout=1.0,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        b"GET /sse?channel=public:a HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + issue(server, "slow").encode() + b"\r\n\r\n"
    )
    try:
        async with sse(server, ["public:a"], token=issue(server, "fast")) as stream:
            await stream.expect("connected")
            await wait_until(lambda: len(server.hub.registry) == 2)
            (slow,) = [c for c in server.hub.registry.connections if c.principal.subject == "slow"]
            pad = "x" * 12_000
            received = 0
            for n in range(600):  # 7 MB at most: far more than the socket buffers hold
                await server.hub.publish("public:a", "big", {"n": n, "pad": pad})
                event = await stream.expect("big")
                assert event.data["data"]["n"] == received, "the reader lost or reordered"
                received += 1
                if slow.closed is not None:
                    break
            assert slow.closed is errors.SLOW_CONSUMER, "the slow stream was never cut"
            # Released at once on the raw path; the portable path's writer may sit in
            # a send until send_timeout.
            await wait_until(lambda: len(server.hub.registry) == 1, timeout=5)
            assert b"herald_slow_consumer_disconnects_total 1.0" in server.hub.metrics.render()
            await server.hub.publish("public:a", "after", "ok")
            assert (await stream.expect("after")).data["data"] == "ok"
    finally:
        writer.close()


async def test_other_methods_on_sse_take_the_ordinary_stack(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT) as client:
        response = await client.post("/sse?channel=public:a")
    assert response.status_code == 405
    assert "GET" in response.headers["allow"].split(", ")
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response.headers["x-request-id"]


async def test_a_refused_stream_says_why_with_its_status(live: Callable[..., Any]) -> None:
    from hub.broker import BrokerUnavailable

    server: LiveServer = await live(max_connections_per_user=1)
    # Over the per-user limit: 429 connection_limit (retry later).
    async with sse(server, ["public:a"], token=issue(server, "limited")) as first:
        assert first.response.status_code == 200
        async with sse(server, ["public:a"], token=issue(server, "limited")) as second:
            assert second.response.status_code == 429
            body = orjson.loads(await second.response.aread())
            assert body["error"]["code"] == "connection_limit"

    # The broker cannot be asked for a slot: 503 unavailable (the server's trouble).
    async def down(*args: Any, **kwargs: Any) -> list[bool]:
        raise BrokerUnavailable("down (test)")

    server.hub.broker.claim_connection_slots = down  # type: ignore[method-assign]
    async with sse(server, ["public:a"], token=issue(server, "other")) as refused:
        assert refused.response.status_code == 503
        body = orjson.loads(await refused.response.aread())
        assert body["error"]["code"] == "unavailable"
