"""Small pieces: request-id middleware (raw ASGI), Origin allow-list, GCRA rate limit,
the signal drain, broker URL dispatch."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

from hub.broker import BrokerConfig, create_broker
from hub.broker.memory import MemoryBroker
from hub.http_errors import RateLimitExceeded
from hub.middleware import RequestIdMiddleware
from hub.ratelimit import enforce
from hub.shutdown import SignalDrain
from hub.transports.origin import origin_allowed

# -- request id middleware -----------------------------------------------------------------


async def run_middleware(
    scope_type: str, request_id: bytes | None
) -> tuple[dict[str, Any], list[Any]]:
    seen: dict[str, Any] = {}
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.update(scope)
        if scope["type"] == "http":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"x-request-id", b"app")],
                }
            )
            await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: Any) -> None:
        sent.append(message)

    headers = [] if request_id is None else [(b"x-request-id", request_id)]
    await RequestIdMiddleware(app)({"type": scope_type, "headers": headers}, receive, send)
    return seen, sent


@pytest.mark.parametrize("incoming", [b"abcdefgh\n", b"abcdefgh\r\nSet-Cookie: x=1", b"short"])
async def test_request_id_with_control_characters_is_replaced(incoming: bytes) -> None:
    seen, sent = await run_middleware("http", incoming)
    request_id = seen["state"]["request_id"]
    assert request_id != incoming.decode() and len(request_id) == 32
    assert [v for k, v in sent[0]["headers"] if k == b"x-request-id"] == [request_id.encode()]


async def test_request_id_is_set_for_websockets_and_kept_when_valid() -> None:
    seen, sent = await run_middleware("websocket", b"ws-request-0001")
    assert seen["state"]["request_id"] == "ws-request-0001"
    assert sent == []


async def test_lifespan_scopes_pass_through_untouched() -> None:
    seen, _ = await run_middleware("lifespan", None)
    assert "state" not in seen


# -- origin --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "ok"),
    [
        (None, "hub.example", [], True),  # non-browser client
        ("https://hub.example", "hub.example", [], True),  # same origin
        ("https://HUB.example/", "hub.example", [], True),
        ("https://evil.example", "hub.example", [], False),
        ("https://hub.example.evil.example", "hub.example", [], False),
        ("null", "hub.example", [], False),
        ("https://app.example", "hub.example", ["https://app.example"], True),
        ("https://app.example:8443", "hub.example", ["https://app.example"], False),
        ("http://app.example", "hub.example", ["https://app.example"], False),
        # the hub's own pages (dashboard) stay allowed whatever the list says
        ("https://hub.example", "hub.example", ["https://app.example"], True),
        ("https://evil.example", "hub.example", ["https://app.example"], False),
        ("https://anything.example", "hub.example", ["*"], True),
        ("https://hub.example", None, [], False),
    ],
)
def test_origin_allowed(origin: str | None, host: str | None, allowed: list[str], ok: bool) -> None:
    assert origin_allowed(origin, host, allowed) is ok


# -- rate limit (GCRA in the memory broker) --------------------------------------------------


async def test_gcra_allows_the_burst_then_refuses() -> None:
    broker = MemoryBroker(BrokerConfig())
    results = [await broker.rate_limit("k", rate=1.0, burst=3) for _ in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    assert [r.remaining for r in results] == [2, 1, 0, 0]
    assert all(r.limit == 3 for r in results)
    assert 0.5 < results[3].retry_after <= 1.0
    other = await broker.rate_limit("other", rate=1.0, burst=3)
    assert other.allowed and other.remaining == 2


async def test_gcra_refills_over_time() -> None:
    broker = MemoryBroker(BrokerConfig())
    assert (await broker.rate_limit("k", rate=10.0, burst=1)).allowed
    assert not (await broker.rate_limit("k", rate=10.0, burst=1)).allowed
    await asyncio.sleep(0.12)
    assert (await broker.rate_limit("k", rate=10.0, burst=1)).allowed


async def test_enforce_raises_with_retry_after() -> None:
    broker = MemoryBroker(BrokerConfig())
    headers = await enforce(broker, "k", rate=0.1, burst=1)
    assert headers["X-RateLimit-Limit"] == "1" and headers["X-RateLimit-Remaining"] == "0"
    with pytest.raises(RateLimitExceeded) as info:
        await enforce(broker, "k", rate=0.1, burst=1)
    assert info.value.code == "rate_limited" and info.value.temporary
    assert info.value.headers["Retry-After"] == "10"


# -- broker factory --------------------------------------------------------------------------


def test_create_broker_dispatches_on_the_scheme() -> None:
    assert isinstance(create_broker(BrokerConfig(url="memory://")), MemoryBroker)
    with pytest.raises(ValueError, match="scheme"):
        create_broker(BrokerConfig(url="kafka://x"))


# -- signal drain ----------------------------------------------------------------------------


async def test_first_signal_drains_then_hands_over_second_goes_straight() -> None:
    calls: list[str] = []
    drained = asyncio.Event()

    def server_handler(sig: int, frame: object) -> None:
        calls.append(f"server:{signal.Signals(sig).name}")

    async def drain() -> None:
        calls.append("drain")
        drained.set()

    previous = signal.signal(signal.SIGTERM, server_handler)
    drainer = SignalDrain(drain)
    try:
        drainer.install()
        assert signal.getsignal(signal.SIGTERM) is not server_handler
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(drained.wait(), 2)
        for _ in range(50):
            if "server:SIGTERM" in calls:
                break
            await asyncio.sleep(0.01)
        assert calls == ["drain", "server:SIGTERM"]  # drain first, then uvicorn's handler
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)
        assert calls == ["drain", "server:SIGTERM", "server:SIGTERM"]  # no second drain
    finally:
        drainer.restore()
        assert signal.getsignal(signal.SIGTERM) is server_handler
        signal.signal(signal.SIGTERM, previous)


async def test_signal_drain_leaves_default_handlers_alone() -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:

        async def drain() -> None:
            raise AssertionError("not called")

        drainer = SignalDrain(drain)
        drainer.install()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        drainer.restore()
    finally:
        signal.signal(signal.SIGTERM, previous)
