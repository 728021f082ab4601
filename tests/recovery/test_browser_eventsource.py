"""A real browser's ``EventSource`` resumes through ``Last-Event-ID`` after the server
drops it (headless Chromium, Debian's package, driven by Playwright; two workers on a
test-owned Redis).

The page (the hub's own origin) opens ``new EventSource("/sse?channel=..&channel=..
&token=<subscribe token>")`` on two channels. The server drops the stream twice: first
with the disconnect command (``force_reconnect``, no revocation), then by ``kill -9``
of the worker holding it. Each time messages are published while the browser is
disconnected; Chromium reconnects by itself, sending the last ``id:`` as
``Last-Event-ID``, the hub answers ``recovered: true`` for both channels, and the page
ends with exactly the published sequence of each channel.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from playwright.async_api import Browser, Page, Request, async_playwright

from tests.e2e.conftest import running_herald
from tests.e2e.helpers import HeraldProcess, RedisServer, bearer, token

from .helpers import (
    disconnect_user,
    full_history,
    kill_worker,
    node_pids,
    publish_retrying,
    wait_until,
    wait_worker_replaced,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
RETRY_MS = 1500  # the browser's reconnect delay (``retry:``): time to publish meanwhile

OPEN_EVENT_SOURCE = """(url) => {
  window.log = [];
  const es = new EventSource(url);
  window.es = es;
  const record = (type) => (e) => window.log.push(
    { type, id: e.lastEventId, data: JSON.parse(e.data) });
  es.addEventListener("connected", record("connected"));
  es.addEventListener("m", record("m"));
  es.addEventListener("disconnect", record("disconnect"));
  es.onerror = () => window.log.push({ type: "error", state: es.readyState });
}"""


@pytest.fixture
def herald(redis_server: RedisServer) -> Iterator[HeraldProcess]:
    if not redis_server.running:
        redis_server.start()
    env = {"HERALD_SSE_RETRY_MS": str(RETRY_MS), "HERALD_SUBSCRIBE_TOKEN_TTL": "300"}
    with running_herald(workers=2, redis_url=redis_server.url, env=env) as server:
        yield server


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


async def _log(page: Page) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = await page.evaluate("window.log")
    return log


async def _wait_log(page: Page, predicate: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    async def check() -> bool:
        seen[:] = await _log(page)
        return bool(predicate(seen))

    try:
        await wait_until(check, timeout, interval=0.02)
    except AssertionError:
        raise AssertionError(f"page log never matched: {seen[-6:]}") from None
    return seen


def _of(log: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [entry for entry in log if entry["type"] == kind]


async def test_browser_event_source_resumes_with_last_event_id_after_server_drops(
    herald: HeraldProcess, browser: Browser
) -> None:
    uid = uuid.uuid4().hex[:8]
    user = f"browser-{uid}"
    channels = [f"public:browser-{uid}", f"user:{user}"]
    pids = await node_pids(herald)
    async with httpx.AsyncClient(base_url=herald.base_url, timeout=10, trust_env=False) as http:
        response = await http.post("/api/v1/tokens/subscribe", headers=bearer(token(user)))
        assert response.status_code == 200, response.text
        subscribe_token = response.json()["token"]
    url = "/sse?" + urlencode([*(("channel", ch) for ch in channels), ("token", subscribe_token)])
    sse_requests: list[Request] = []
    page = await browser.new_page()
    page.on("request", lambda r: sse_requests.append(r) if "/sse?" in r.url else None)
    counter = 0

    async def publish(count: int) -> None:
        nonlocal counter
        for _ in range(count):
            await publish_retrying(herald.base_url, channels[counter % 2], "m", {"n": counter})
            counter += 1

    def received(log: list[dict[str, Any]]) -> int:
        return len(_of(log, "m"))

    try:
        await page.goto(f"{herald.base_url}/health")  # any page of the hub's own origin
        await page.evaluate(OPEN_EVENT_SOURCE, url)
        log = await _wait_log(page, lambda log: _of(log, "connected"))
        first = _of(log, "connected")[0]
        assert set(first["data"]["channels"]) == set(channels)
        assert all("recovered" not in c for c in first["data"]["channels"].values())
        await publish(6)
        await _wait_log(page, lambda log: received(log) == 6)

        # 1. The server closes the stream (disconnect command, no revocation).
        await disconnect_user(herald.base_url, user)
        log = await _wait_log(page, lambda log: _of(log, "error"))
        assert [d["data"]["code"] for d in _of(log, "disconnect")] == ["force_reconnect"]
        last_id = _of(log, "m")[-1]["id"]
        await publish(5)  # while the browser waits RETRY_MS before reconnecting
        log = await _wait_log(page, lambda log: len(_of(log, "connected")) == 2)
        second = _of(log, "connected")[1]
        assert second["id"] == last_id, "resumed exactly at the last event seen"
        for channel in channels:
            assert second["data"]["channels"][channel]["recovered"] is True, second
        log = await _wait_log(page, lambda log: received(log) == 11)
        index_second = log.index(second)
        assert received(log[index_second:]) == 5, "the missed messages came after the resume"

        # 2. kill -9 of the worker holding the stream.
        node = second["data"]["node"]
        kill_worker(herald, pids[node])
        errors_before = len(_of(log, "error"))
        log = await _wait_log(page, lambda log: len(_of(log, "error")) > errors_before)
        last_id = _of(log, "m")[-1]["id"]
        await publish(5)
        log = await _wait_log(page, lambda log: len(_of(log, "connected")) == 3, timeout=20)
        third = _of(log, "connected")[2]
        assert third["data"]["node"] != node
        assert third["id"] == last_id
        for channel in channels:
            assert third["data"]["channels"][channel]["recovered"] is True, third
        log = await _wait_log(page, lambda log: received(log) >= 16)
        await publish(2)  # and live again
        log = await _wait_log(page, lambda log: received(log) >= 18)
        await asyncio.sleep(0.5)  # anything sent twice would arrive now
        log = await _log(page)

        for channel in channels:
            history = await full_history(herald.base_url, channel)
            mine = [
                (m["data"]["offset"], m["data"]["data"])
                for m in _of(log, "m")
                if m["data"]["channel"] == channel
            ]
            assert mine == [(h["offset"], h["data"]) for h in history], channel
        # Order is per channel (a resume replays one channel after the other).
        assert sorted(m["data"]["data"]["n"] for m in _of(log, "m")) == list(range(18))
        # Chromium sent the last id itself on both reconnects.
        headers = [await r.all_headers() for r in sse_requests]
        assert len(headers) >= 3, headers
        assert "last-event-id" not in headers[0]
        assert [h.get("last-event-id") for h in headers[1:3]] == [second["id"], third["id"]]
        await wait_worker_replaced(herald, pids[node])
    finally:
        await page.evaluate("window.es && window.es.close()")
        await page.close()
