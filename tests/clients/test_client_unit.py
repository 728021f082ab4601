"""HeraldClient against a scripted fake hub (no network): framing, resume, recovery,
close codes, token refresh, and the exceptions it raises."""

from __future__ import annotations

import asyncio
import gc
import json
import time

import httpx
import pytest

from clients import (
    AuthenticationError,
    Backoff,
    BadRequestError,
    ForbiddenError,
    HeraldClient,
    HeraldHTTP,
    Message,
    RateLimitedError,
    Recovery,
    TokenExpiredError,
    UnavailableError,
    UserDisabledError,
)
from clients._outcome import BACKOFF, IMMEDIATE, REFRESH, TERMINAL, classify_close
from tests.clients.fakes import FakeConnector, FakeSocket, connected_frame, message

FAST = Backoff(initial=0.01, maximum=0.05)


def client(connector: FakeConnector, **kw) -> HeraldClient:
    kw.setdefault("token", "t0")
    return HeraldClient("http://hub.test", ws_connector=connector, backoff=FAST, **kw)


async def take(sub, n: int, timeout: float = 5.0) -> list[Message]:
    return [await sub.get(timeout) for _ in range(n)]


# -- framing, order, resume -----------------------------------------------------------------


async def test_client_splits_coalesced_frames_into_messages_in_order():
    async def script(sock: FakeSocket, attempt: int) -> None:
        sock.push(connected_frame())
        sub = await sock.expect("subscribe")
        sock.push(
            sock.ack(sub, channel="user:42", offset="0:e1"),
            message("user:42", 1),
            message("user:42", 2),
            message("user:42", 3),
        )
        await asyncio.sleep(3600)

    connector = FakeConnector(script)
    async with client(connector) as hub:
        sub = hub.subscribe("user:42")
        got = await take(sub, 3)
    await connector.aclose()
    assert [m.offset for m in got] == ["1:e1", "2:e1", "3:e1"]
    assert got[0] == Message("user:42", "n", {"seq": 1}, "1:e1", 1_700_000_000_001)
    assert connector.urls == ["ws://hub.test/ws"]
    assert connector.sockets[0].headers["Authorization"] == "Bearer t0"


async def test_client_resumes_with_last_offset_and_drops_replayed_duplicates():
    async def script(sock: FakeSocket, attempt: int) -> None:
        sock.push(connected_frame(node=f"n{attempt}"))
        sub = await sock.expect("subscribe")
        if attempt == 0:
            assert "since" not in sub
            sock.push(sock.ack(sub, channel="a", offset="5:e1"), message("a", 6), message("a", 7))
            await asyncio.sleep(0.05)
            sock.close_with(1006)
            return
        assert sub["since"] == "7:e1", sub
        # A server that replays too much: 7 again must not reach the caller twice.
        sock.push(
            sock.ack(sub, channel="a", offset="9:e1", recovered=True),
            message("a", 7),
            message("a", 8),
            message("a", 9),
        )
        await asyncio.sleep(3600)

    connector = FakeConnector(script)
    async with client(connector) as hub:
        sub = hub.subscribe("a")
        got = await take(sub, 4)
        assert hub.offsets == {"a": "9:e1"}
        assert hub.reconnects == 1
    await connector.aclose()
    assert [m.offset for m in got] == ["6:e1", "7:e1", "8:e1", "9:e1"]


async def test_client_reports_unrecovered_gap_and_continues_from_new_top():
    recoveries: list[Recovery] = []

    async def script(sock: FakeSocket, attempt: int) -> None:
        sock.push(connected_frame())
        sub = await sock.expect("subscribe")
        assert sub["since"] == "3:old"
        sock.push(
            sock.ack(sub, channel="a", offset="1:new", recovered=False),
            message("a", 2, epoch="new"),
        )
        await asyncio.sleep(3600)

    connector = FakeConnector(script)
    async with client(connector, on_recovery=recoveries.append) as hub:
        sub = hub.subscribe("a", since="3:old")
        got = await take(sub, 1)
    await connector.aclose()
    assert recoveries == [Recovery("a", "3:old", "1:new")]
    assert got[0].offset == "2:new"


async def test_client_multiplexes_channels_and_unsubscribes_dropped_subscription():
    async def script(sock: FakeSocket, attempt: int) -> None:
        sock.push(connected_frame())
        for _ in range(2):
            sub = await sock.expect("subscribe")
            sock.push(sock.ack(sub, channel=sub["channel"], offset="0:e"))
        sock.push(message("a", 1, epoch="e"), message("b", 1, epoch="e"))
        unsub = await sock.expect("unsubscribe")
        sock.push(sock.ack(unsub, channel=unsub["channel"]))
        await asyncio.sleep(3600)

    connector = FakeConnector(script)
    async with client(connector) as hub:
        first = hub.subscribe("a")
        second = hub.subscribe("b")
        assert (await first.get()).channel == "a"
        assert (await second.get()).channel == "b"
        del second
        gc.collect()
        sock = connector.sockets[0]
        for _ in range(100):
            if any(f["op"] == "unsubscribe" for f in sock.sent):
                break
            await asyncio.sleep(0.01)
        unsubscribes = [f for f in sock.sent if f["op"] == "unsubscribe"]
        assert [f["channel"] for f in unsubscribes] == ["b"]
    await connector.aclose()


# -- errors and close codes -------------------------------------------------------------------


async def test_client_raises_authentication_error_without_retrying():
    async def script(sock: FakeSocket, attempt: int) -> None:
        sock.push({"op": "error", "id": None, "code": "unauthorized", "message": "bad signature"})
        sock.close_with(
            4501, {"op": "bye", "code": "unauthorized", "close_code": 4501, "reconnect": False}
        )

    connector = FakeConnector(script)
    async with client(connector) as hub:
        sub = hub.subscribe("a")
        with pytest.raises(AuthenticationError, match="bad signature") as info:
            await sub.get(5)
        await asyncio.sleep(0.2)
    await connector.aclose()
    assert info.value.close_code == 4501
    assert connector.attempts == 1


async def test_client_stops_on_user_disabled_close():
    async def script(sock: FakeSocket, attempt: int) -> None:
        sock.push(connected_frame())
        sub = await sock.expect("subscribe")
        sock.push(sock.ack(sub, channel="a", offset="0:e"))
        sock.close_with(4504, {"op": "bye", "code": "user_disabled", "reconnect": False})

    connector = FakeConnector(script)
    async with client(connector) as hub:
        sub = hub.subscribe("a")
        with pytest.raises(UserDisabledError):
            await sub.get(5)
        with pytest.raises(UserDisabledError):
            hub.subscribe("b")
    await connector.aclose()
    assert connector.attempts == 1


async def test_client_refused_handshake_403_is_terminal():
    async def script(sock: FakeSocket, attempt: int) -> None:
        raise AssertionError("never connected")

    connector = FakeConnector(script, refuse={0: 403})
    async with client(connector) as hub:
        with pytest.raises(ForbiddenError):
            await hub.subscribe("a").get(5)
    assert connector.attempts == 1


async def test_client_forbidden_channel_fails_only_its_subscription():
    async def script(sock: FakeSocket, attempt: int) -> None:
        sock.push(connected_frame())
        for _ in range(2):
            sub = await sock.expect("subscribe")
            if sub["channel"] == "user:43":
                sock.push({"op": "error", "id": sub["id"], "code": "forbidden", "message": "nope"})
            else:
                sock.push(sock.ack(sub, channel=sub["channel"], offset="0:e"))
        sock.push(message("public:ok", 1, epoch="e"))
        await asyncio.sleep(3600)

    connector = FakeConnector(script)
    async with client(connector) as hub:
        ok = hub.subscribe("public:ok")
        bad = hub.subscribe("user:43")
        with pytest.raises(ForbiddenError):
            await bad.wait_subscribed(5)
        with pytest.raises(ForbiddenError):
            await bad.get(5)
        await ok.wait_subscribed(5)
        assert (await ok.get(5)).channel == "public:ok"
    await connector.aclose()


async def test_client_rejects_bad_channel_names_locally():
    async def idle(sock: FakeSocket, attempt: int) -> None:
        await asyncio.sleep(3600)

    connector = FakeConnector(idle)
    async with client(connector) as hub:
        with pytest.raises(BadRequestError):
            hub.subscribe("has space")
        with pytest.raises(ValueError):
            hub.subscribe("a", "b", since="1:e")
    await connector.aclose()


async def test_client_reconnects_at_once_on_shutdown_with_backoff_otherwise():
    times: list[float] = []

    async def script(sock: FakeSocket, attempt: int) -> None:
        times.append(time.monotonic())
        sock.push(connected_frame())
        await sock.expect("subscribe")
        if attempt == 0:
            sock.close_with(1001, {"op": "bye", "code": "shutdown", "reconnect": True})
        elif attempt == 1:
            sock.close_with(4001, {"op": "bye", "code": "slow_consumer", "reconnect": True})
        else:
            await asyncio.sleep(3600)

    connector = FakeConnector(script)
    slow = Backoff(initial=0.4, maximum=0.4, jitter=0.0)
    async with HeraldClient(
        "ws://hub.test/ws", token="t", ws_connector=connector, backoff=slow
    ) as hub:
        sub = hub.subscribe("a")  # held: a dropped subscription is unsubscribed
        for _ in range(300):
            if connector.attempts >= 3:
                break
            await asyncio.sleep(0.01)
    await connector.aclose()
    assert sub.channels == ("a",)
    assert connector.attempts == 3
    assert times[1] - times[0] < 0.35  # 1001: at once (jitter only)
    assert times[2] - times[1] >= 0.39  # 4001: after the backoff


# -- tokens -----------------------------------------------------------------------------------


async def test_client_gets_a_fresh_token_after_token_expired_close():
    tokens = iter(["t1", "t2", "t3"])

    async def provider() -> str:
        return next(tokens)

    async def script(sock: FakeSocket, attempt: int) -> None:
        sock.push(connected_frame())
        sub = await sock.expect("subscribe")
        sock.push(sock.ack(sub, channel="a", offset="0:e"))
        if attempt == 0:
            sock.close_with(4003, {"op": "bye", "code": "token_expired", "reconnect": True})
        else:
            sock.push(message("a", 1, epoch="e"))
            await asyncio.sleep(3600)

    connector = FakeConnector(script)
    async with client(connector, token=None, token_provider=provider) as hub:
        got = await take(hub.subscribe("a"), 1)
    await connector.aclose()
    assert got[0].offset == "1:e"
    assert [s.headers["Authorization"] for s in connector.sockets] == ["Bearer t1", "Bearer t2"]


async def test_client_without_provider_stops_on_token_expired():
    async def script(sock: FakeSocket, attempt: int) -> None:
        sock.push(connected_frame())
        await sock.expect("subscribe")
        sock.close_with(4003, {"op": "bye", "code": "token_expired", "reconnect": True})

    connector = FakeConnector(script)
    async with client(connector) as hub:
        with pytest.raises(TokenExpiredError):
            await hub.subscribe("a").get(5)
    await connector.aclose()
    assert connector.attempts == 1


async def test_client_refreshes_token_before_expiry_on_the_open_connection():
    issued: list[str] = []

    async def provider() -> str:
        issued.append(f"t{len(issued)}")
        return issued[-1]

    async def script(sock: FakeSocket, attempt: int) -> None:
        sock.push(connected_frame(expires_at=time.time() + 1.5))
        refresh = await sock.expect("refresh", timeout=5)
        sock.push(sock.ack(refresh, expires_at=time.time() + 3600))
        await asyncio.sleep(3600)

    connector = FakeConnector(script)
    async with client(connector, token=None, token_provider=provider) as hub:
        await hub.wait_connected(5)
        for _ in range(300):
            if hub.expires_at and hub.expires_at > time.time() + 1000:
                break
            await asyncio.sleep(0.01)
        assert hub.expires_at is not None and hub.expires_at > time.time() + 1000
    await connector.aclose()
    refresh = [f for f in connector.sockets[0].sent if f["op"] == "refresh"]
    assert refresh and refresh[0]["token"] == "t1"
    assert connector.attempts == 1


# -- pure pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "bye", "action"),
    [
        (1001, None, IMMEDIATE),
        (1006, None, BACKOFF),
        (1011, None, BACKOFF),
        (4001, None, BACKOFF),
        (4005, {"code": "force_reconnect", "reconnect": True}, BACKOFF),
        (4003, None, REFRESH),
        (4501, None, TERMINAL),
        (4504, {"code": "user_disabled", "reconnect": False}, TERMINAL),
        (1000, {"code": "whatever", "reconnect": False}, TERMINAL),
        (4999, None, TERMINAL),
    ],
)
def test_close_codes_map_to_the_documented_action(code, bye, action):
    assert classify_close(code, bye).action == action


def test_backoff_grows_is_capped_and_jittered():
    backoff = Backoff(initial=0.5, maximum=4.0, factor=2.0, jitter=0.5)
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (3, 4.0), (10, 4.0), (1000, 4.0)]:
        delays = {backoff.delay(attempt) for _ in range(50)}
        assert all(ceiling * 0.5 <= d <= ceiling for d in delays)
        assert len(delays) > 1


# -- HTTP publish -------------------------------------------------------------------------------


async def test_http_publish_maps_results_and_error_envelopes():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = json.loads(request.content or b"null")
        if request.url.path == "/api/v1/publish/batch":
            results = [
                {"channel": m["channel"], "offset": f"{i}:e", "seq": i, "epoch": "e", "ts": 5}
                for i, m in enumerate(body["messages"], 1)
            ]
            return httpx.Response(200, json={"results": results})
        channel = body["channel"]
        if channel == "public:ok":
            out = {"channel": channel, "offset": "1:e", "seq": 1, "epoch": "e", "ts": 5}
            return httpx.Response(200, json=out)
        status, code = {
            "user:1": (403, "forbidden"),
            "user:2": (429, "rate_limited"),
            "user:3": (401, "unauthorized"),
            "user:4": (503, "unavailable"),
        }[channel]
        envelope = {"error": {"code": code, "message": "m", "request_id": "r1"}}
        return httpx.Response(status, json=envelope, headers={"Retry-After": "2"})

    async with HeraldHTTP(
        "http://hub.test", api_key="k", transport=httpx.MockTransport(handler)
    ) as http:
        result = await http.publish("public:ok", "e", {"x": 1})
        assert (result.channel, result.offset, result.seq) == ("public:ok", "1:e", 1)
        batch = await http.publish_batch([("a", "e", 1), {"channel": "b", "event": "e"}])
        assert [r.offset for r in batch] == ["1:e", "2:e"]
        with pytest.raises(ForbiddenError) as forbidden:
            await http.publish("user:1", "e")
        assert forbidden.value.request_id == "r1" and forbidden.value.status == 403
        with pytest.raises(RateLimitedError) as limited:
            await http.publish("user:2", "e")
        assert limited.value.retry_after == 2.0
        with pytest.raises(AuthenticationError):
            await http.publish("user:3", "e")
        with pytest.raises(UnavailableError):
            await http.publish("user:4", "e")
    assert seen[0].headers["authorization"] == "Bearer k"


# -- SSE --------------------------------------------------------------------------------------


def sse(event: str, data: dict, event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


async def test_sse_client_resumes_with_last_event_id_and_reports_recovery():
    requests: list[httpx.Request] = []
    recoveries: list[Recovery] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        assert request.url.params.get_list("channel") == ["a", "b"]
        n = len(requests)
        if n == 1:
            assert "last-event-id" not in request.headers
            body = "retry: 2000\n\n" + sse(
                "connected",
                {
                    "op": "connected",
                    "node": "x",
                    "channels": {"a": {"offset": "0:e"}, "b": {"offset": "3:e"}},
                },
                "tag.0:e,3:e",
            )
            body += ": ping\n\n" + sse("n", message("a", 1, epoch="e"), "tag.1:e,3:e")
            body += sse("n", message("b", 4, epoch="e"), "tag.1:e,4:e")
            return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
        if n == 2:
            assert request.headers["last-event-id"] == "tag.1:e,4:e"
            channels = {
                "a": {"offset": "1:e", "recovered": True},
                "b": {"offset": "10:f", "recovered": False},
            }
            body = sse("connected", {"op": "connected", "channels": channels}, "tag.1:e,10:f")
            body += sse("n", message("a", 2, epoch="e"), "tag.2:e,10:f")
            body += sse("disconnect", {"op": "bye", "code": "force_reconnect", "reconnect": True})
            return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
        envelope = {"error": {"code": "unauthorized", "message": "revoked"}}
        return httpx.Response(401, json=envelope)

    async with HeraldClient(
        "http://hub.test",
        token="tok",
        transport="sse",
        backoff=FAST,
        on_recovery=recoveries.append,
        http_transport=httpx.MockTransport(handler),
    ) as hub:
        sub = hub.subscribe("b", "a")
        got = await take(sub, 3)
        with pytest.raises(AuthenticationError, match="revoked"):
            await sub.get(5)
    assert [(m.channel, m.offset) for m in got] == [("a", "1:e"), ("b", "4:e"), ("a", "2:e")]
    assert recoveries == [Recovery("b", "4:e", "10:f")]
    assert requests[0].headers["authorization"] == "Bearer tok"
    assert len(requests) == 3


def test_sse_parser_follows_the_event_stream_rules():
    from clients._wire import SSEParser

    parser = SSEParser()
    lines = [
        "retry: 1500",
        "",
        ": comment",
        "id: 7",
        "event: x",
        "data: a",
        "data: b",
        "",
        "data: c",
        "",
    ]
    events = [e for line in lines if (e := parser.feed(line)) is not None]
    assert [(e.event, e.data, e.id) for e in events] == [("x", "a\nb", "7"), ("message", "c", "7")]
    assert parser.retry == 1500


def test_client_cursor_and_envelope_match_the_hub():
    """The client imports no server code; this keeps the two in step."""
    from clients._wire import build_cursor, message_from
    from hub import protocol

    channels = ["public:news", "user:42", "users"]
    positions = [protocol.StreamPosition(17, "ab"), None, protocol.StreamPosition(3, "cd")]
    expected = protocol.encode_cursor(channels, positions)
    assert build_cursor({"public:news": "17:ab", "users": "3:cd"}, reversed(channels)) == expected

    pub = protocol.Publication("user:42", 18, "ab12", "user.updated", b'{"a":[1,2]}', 1767225600123)
    encoded = protocol.encode_message(pub)
    from clients._wire import split_frame

    (obj,) = split_frame(encoded.text)
    assert message_from(obj) == Message(
        "user:42", "user.updated", {"a": [1, 2]}, "18:ab12", 1767225600123
    )
