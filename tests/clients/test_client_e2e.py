"""The Python client, the CLI and the direct Redis publisher against real two-worker
``herald serve`` processes on a test-owned Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from clients import (
    AuthenticationError,
    Backoff,
    HeraldClient,
    HeraldHTTP,
    Message,
    Offset,
    TransportError,
    UserDisabledError,
)
from clients.client import TransportName
from hub import HeraldPublisher
from tests.clients.helpers import (
    ROOT,
    admin_token,
    kill,
    running,
    unique,
    user_token,
    wait_workers,
    worker_pids,
)
from tests.herald_process import SERVICE_KEY, HeraldProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

TRANSPORTS: list[TransportName] = ["websocket", "sse"]
FAST = Backoff(initial=0.05, maximum=0.5)


def assert_exactly_once_in_order(messages: list[Message], first: int, last: int) -> None:
    offsets = [Offset.parse(m.offset) for m in messages]
    assert len({o.epoch for o in offsets}) == 1, offsets
    assert [o.seq for o in offsets] == list(range(first, last + 1))


async def publish_retrying(http: HeraldHTTP, channel: str, data: object) -> str:
    """Publish, retrying while a worker is down (a failed attempt may or may not have
    landed: the test checks offsets, not payloads, for exactly-once)."""
    for _ in range(100):
        try:
            return (await http.publish(channel, "tick", data)).offset
        except TransportError:
            await asyncio.sleep(0.05)
    raise AssertionError("could not publish")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_client_receives_in_order_from_both_workers(two_workers, transport):
    channel = unique("public:order-")
    async with (
        HeraldClient(two_workers.base_url, token=user_token("7"), transport=transport) as hub,
    ):
        sub = hub.subscribe(channel, "user:7")
        await sub.wait_subscribed(10)
        offsets = []
        for i in range(40):
            # A fresh connection each time, so both workers take publishes.
            async with HeraldHTTP(two_workers.base_url, api_key=SERVICE_KEY) as http:
                offsets.append((await http.publish(channel, "tick", {"i": i})).offset)
        got = [await sub.get(10) for _ in range(40)]
    assert [m.data for m in got] == [{"i": i} for i in range(40)]
    assert [m.offset for m in got] == offsets
    assert all(m.channel == channel and m.event == "tick" for m in got)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_client_resumes_without_loss_when_its_worker_is_killed(redis_server, transport):
    channel = unique("public:kill-")
    with running(workers=2, redis_url=redis_server.url) as herald:
        async with (
            HeraldClient(
                herald.base_url, token=user_token("8"), transport=transport, backoff=FAST
            ) as hub,
            HeraldHTTP(herald.base_url, api_key=SERVICE_KEY) as http,
        ):
            sub = hub.subscribe(channel)
            await sub.wait_subscribed(10)
            first = Offset.parse(await publish_retrying(http, channel, -1)).seq
            stop = asyncio.Event()

            async def publisher() -> str:
                last, i = "", 0
                while not stop.is_set():
                    last = await publish_retrying(http, channel, i)
                    i += 1
                    await asyncio.sleep(0.01)
                return last

            task = asyncio.create_task(publisher())
            received: list[Message] = [await sub.get(10)]
            try:
                # Kill workers one at a time until the one holding our connection died.
                for pid in worker_pids(herald):
                    await asyncio.sleep(0.3)
                    kill(pid)
                    deadline = time.monotonic() + 3
                    while hub.reconnects == 0 and time.monotonic() < deadline:
                        received.append(await sub.get(10))
                    if hub.reconnects:
                        break
                    await wait_workers(herald, 2)
                assert hub.reconnects >= 1, "the client's worker was never killed"
                await wait_workers(herald, 2)
                await asyncio.sleep(0.5)
            finally:
                stop.set()
                last = Offset.parse(await task).seq
            while Offset.parse(received[-1].offset).seq < last:
                received.append(await sub.get(10))
    assert_exactly_once_in_order(received, first, last)


async def test_client_stops_with_a_clear_error_when_its_token_is_revoked(two_workers):
    subject = unique("rv")
    user = user_token(subject)
    async with HeraldClient(two_workers.base_url, token=user, backoff=FAST) as hub:
        sub = hub.subscribe(f"user:{subject}")
        await sub.wait_subscribed(10)
        async with httpx.AsyncClient(base_url=two_workers.base_url) as http:
            response = await http.post(
                f"/api/v1/connections/users/{subject}/disconnect",
                params={"revoke": "true"},
                headers={"Authorization": f"Bearer {admin_token()}"},
            )
        assert response.status_code == 200, response.text
        with pytest.raises(UserDisabledError) as info:
            await sub.get(10)
        assert info.value.close_code == 4504
        await asyncio.sleep(0.5)
        assert hub.reconnects == 0, "a terminal close must not be retried"
    # The revoked token no longer opens a connection: refused, not retried.
    for transport in TRANSPORTS:
        async with HeraldClient(
            two_workers.base_url, token=user, transport=transport, backoff=FAST
        ) as again:
            with pytest.raises(AuthenticationError):
                await again.subscribe(f"user:{subject}").get(10)
            assert again.reconnects == 0


async def test_client_reconnects_and_resumes_after_force_reconnect(two_workers):
    subject = unique("fr")
    async with (
        HeraldClient(two_workers.base_url, token=user_token(subject), backoff=FAST) as hub,
        HeraldHTTP(two_workers.base_url, api_key=SERVICE_KEY) as http,
    ):
        sub = hub.subscribe(f"user:{subject}")
        await sub.wait_subscribed(10)
        first = await http.publish(f"user:{subject}", "a", 1)
        admin = HeraldHTTP(two_workers.base_url, api_key=admin_token())
        async with admin:
            await admin.disconnect_user(subject)
        second = await http.publish(f"user:{subject}", "b", 2)  # maybe while disconnected
        got = [await sub.get(10), await sub.get(10)]
        assert hub.reconnects >= 1
    assert [m.offset for m in got] == [first.offset, second.offset]


async def test_client_refreshes_short_lived_tokens_without_reconnecting(two_workers):
    subject = unique("tk")
    issued = 0

    async def provider() -> str:
        nonlocal issued
        issued += 1
        return user_token(subject, ttl=4)

    channel = f"user:{subject}"
    async with (
        HeraldClient(two_workers.base_url, token_provider=provider) as hub,
        HeraldHTTP(two_workers.base_url, api_key=SERVICE_KEY) as http,
    ):
        sub = hub.subscribe(channel)
        await sub.wait_subscribed(10)
        first_expiry = hub.expires_at
        for i in range(8):  # 8 s: twice the token's lifetime (plus the hub's 5 s leeway)
            await http.publish(channel, "tick", i)
            await asyncio.sleep(1)
        got = [await sub.get(10) for _ in range(8)]
        assert hub.reconnects == 0
        assert first_expiry is not None and hub.expires_at is not None
        assert hub.expires_at > first_expiry + 4
    assert [m.data for m in got] == list(range(8))
    assert issued >= 3


async def test_direct_publisher_messages_are_indistinguishable_from_http(two_workers):
    channel = unique("public:direct-")
    async with (
        HeraldClient(two_workers.base_url, token=user_token("9")) as hub,
        HeraldHTTP(two_workers.base_url, api_key=SERVICE_KEY) as http,
        HeraldPublisher(two_workers.env["HERALD_REDIS_URL"], prefix=two_workers.prefix) as pub,
    ):
        sub = hub.subscribe(channel)
        await sub.wait_subscribed(10)
        one = await http.publish(channel, "via.http", {"n": 1})
        two = await pub.publish(channel, "via.redis", {"n": 2})
        batch = await pub.publish_batch([(channel, "via.redis", {"n": 3}), (channel, "x", None)])
        five = await http.publish(channel, "via.http", {"n": 5})
        live = [await sub.get(10) for _ in range(5)]
    expected = [one.offset, two.offset, *(r.offset for r in batch), five.offset]
    assert [m.offset for m in live] == expected
    assert_exactly_once_in_order(live, one.seq, five.seq)
    assert [m.data for m in live] == [{"n": 1}, {"n": 2}, {"n": 3}, None, {"n": 5}]
    # History holds the direct publications too: a late subscriber replays them.
    async with HeraldClient(two_workers.base_url, token=user_token("9"), transport="sse") as late:
        replay = late.subscribe(channel, since=one.offset)
        again = [await replay.get(10) for _ in range(4)]
    assert again == live[1:]


def _cli(herald: HeraldProcess, *args: str, token: str) -> subprocess.Popen[str]:
    env = {**os.environ, "HERALD_TOKEN": token}
    env.pop("HERALD_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "subscribe", *args, "--url", herald.base_url],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_cli_subscribe_prints_published_messages_as_json_lines(two_workers, transport):
    channel = unique("public:cli-")
    async with HeraldHTTP(two_workers.base_url, api_key=SERVICE_KEY) as http:
        start = await http.publish(channel, "probe", None)
        extra = ["--sse"] if transport == "sse" else []
        # --since makes the test independent of when the CLI finishes connecting.
        cli = _cli(two_workers, channel, "--since", start.offset, *extra, token=user_token("5"))
        try:
            sent = [await http.publish(channel, "line", {"i": i, "text": "é"}) for i in range(3)]
            lines = []
            for _ in range(3):
                assert cli.stdout is not None
                line = await asyncio.wait_for(asyncio.to_thread(cli.stdout.readline), 15)
                lines.append(json.loads(line))
        finally:
            cli.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                cli.wait(10)
            if cli.poll() is None:
                cli.kill()
                cli.wait(5)
    assert [line["data"] for line in lines] == [{"i": i, "text": "é"} for i in range(3)]
    assert [line["offset"] for line in lines] == [r.offset for r in sent]
    assert all(set(line) == {"channel", "event", "data", "offset", "ts"} for line in lines)


async def test_cli_subscribe_exits_nonzero_with_a_clear_message_on_a_bad_token(two_workers):
    cli = _cli(two_workers, "public:x", token="not-a-valid-token")
    try:
        _out, err = await asyncio.wait_for(asyncio.to_thread(cli.communicate), 20)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(5)
    assert cli.returncode == 1
    assert "authentication failed" in err
    assert "Traceback" not in err


def test_cli_subscribe_without_a_token_is_a_usage_error():
    env = {k: v for k, v in os.environ.items() if k != "HERALD_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "clients.cli", "subscribe", "public:x"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "HERALD_TOKEN" in result.stderr


async def test_hub_serves_the_browser_client_and_the_dashboard(two_workers):
    async with httpx.AsyncClient(base_url=two_workers.base_url, follow_redirects=True) as http:
        js = await http.get("/client/herald.js")
        dts = await http.get("/client/herald.d.ts")
        page = await http.get("/dashboard")
        script = await http.get("/dashboard/dashboard.js")
        missing = await http.get("/client/nope.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "export class Herald" in js.text
    assert dts.status_code == 200 and "export declare class Herald" in dts.text
    assert page.status_code == 200 and "<title>Herald" in page.text
    assert str(page.url).endswith("/dashboard/")
    assert script.status_code == 200 and 'from "/client/herald.js"' in script.text
    assert missing.status_code == 404
