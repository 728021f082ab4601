"""The browser client and the live dashboard in headless Chromium (Debian's package,
driven by Playwright with the system browser), against real two-worker servers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from hub import protocol
from tests.clients.helpers import (
    ADMIN_PASSWORD,
    API_APP,
    ARTIFACTS,
    admin_token,
    create_admin,
    kill,
    running,
    unique,
    user_token,
    wait_workers,
    worker_pids,
)
from tests.herald_process import SERVICE_KEY, HeraldProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


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


async def new_page(browser: Browser, errors: list[str]) -> Page:
    page = await browser.new_page(viewport={"width": 1440, "height": 900})
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: _console_error(m, errors))
    return page


def _console_error(message: ConsoleMessage, errors: list[str]) -> None:
    # The bare /health page has no favicon; anything else logged as an error counts.
    if message.type == "error" and not message.location.get("url", "").endswith("/favicon.ico"):
        errors.append(f"{message.text} ({message.location.get('url')})")


async def publish(base_url: str, channel: str, data: object, event: str = "tick") -> dict:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        for _ in range(100):
            try:
                response = await http.post(
                    "/api/v1/publish",
                    json={"channel": channel, "event": event, "data": data},
                    headers={"Authorization": f"Bearer {SERVICE_KEY}"},
                )
            except httpx.TransportError:  # a worker is restarting
                await asyncio.sleep(0.05)
                continue
            assert response.status_code == 200, response.text
            return response.json()
    raise AssertionError("could not publish")


START_CLIENT = """async ({ token, channel, transport }) => {
  const { Herald } = await import("/client/herald.js");
  window.msgs = [];
  window.log = [];
  const herald = new Herald({
    getToken: async () => token,
    transport,
    sseEvents: ["tick"],
    backoff: { initial: 100, max: 1000 },
  });
  window.herald = herald;
  herald.on("connected", (e) => window.log.push(["connected", e.transport]));
  herald.on("disconnected", (e) => window.log.push(["disconnected", e.code, e.reason]));
  herald.on("recovered", (e) => window.log.push(["recovered", e.channel, e.recovered]));
  herald.on("error", (e) => window.log.push(["error", e.code]));
  herald.subscribe(channel, (m) => window.msgs.push(m));
}"""


async def start_browser_client(page: Page, base_url: str, subject: str, channel: str, transport):
    await page.goto(f"{base_url}/health")  # any same-origin page of the hub
    await page.evaluate(
        START_CLIENT,
        {"token": user_token(subject), "channel": channel, "transport": transport},
    )
    await page.wait_for_function(
        "(ch) => window.herald.state === 'connected' && window.herald.offsets[ch]",
        arg=channel,
        timeout=10_000,
    )


async def received(page: Page, count: int, timeout: float = 10.0) -> list[dict]:
    await page.wait_for_function(f"window.msgs.length >= {count}", timeout=timeout * 1000)
    return await page.evaluate("window.msgs")


def assert_consecutive(msgs: list[dict], published: list[dict]) -> None:
    assert [m["offset"] for m in msgs] == [p["offset"] for p in published]
    assert [m["data"] for m in msgs] == list(range(len(published)))


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_browser_client_resumes_after_the_server_drops_it(two_workers, browser, transport):
    errors: list[str] = []
    page = await new_page(browser, errors)
    subject = unique("br")
    channel = f"user:{subject}"
    await start_browser_client(page, two_workers.base_url, subject, channel, transport)
    published = [await publish(two_workers.base_url, channel, i) for i in range(3)]
    await received(page, 3)

    async with httpx.AsyncClient(base_url=two_workers.base_url, timeout=10) as http:
        response = await http.post(
            f"/api/v1/connections/users/{subject}/disconnect",
            headers={"Authorization": f"Bearer {admin_token()}"},
        )
    assert response.status_code == 200, response.text
    # Published while the client is away or reconnecting: must arrive, once, in order.
    published += [await publish(two_workers.base_url, channel, i) for i in range(3, 6)]
    await page.wait_for_function("window.herald.reconnects >= 1", timeout=10_000)
    msgs = await received(page, 6)
    await page.wait_for_timeout(300)  # no late duplicate
    assert_consecutive(await page.evaluate("window.msgs"), published)
    log = await page.evaluate("window.log")
    assert ["disconnected", 4005, "force_reconnect"] in log, log
    assert log.count(["connected", transport]) >= 2, log
    assert ["recovered", channel, True] in log, log
    assert len(msgs) == 6
    assert not errors, errors


async def test_browser_sse_client_resumes_after_its_worker_is_killed(redis_server, browser):
    errors: list[str] = []
    with running(workers=2, redis_url=redis_server.url) as herald:
        page = await new_page(browser, errors)
        subject = unique("bk")
        channel = f"user:{subject}"
        await start_browser_client(page, herald.base_url, subject, channel, "sse")
        published = [await publish(herald.base_url, channel, 0)]
        await received(page, 1)
        for pid in worker_pids(herald):
            kill(pid)
            published.append(await publish(herald.base_url, channel, len(published)))
            try:
                await page.wait_for_function("window.herald.reconnects >= 1", timeout=3000)
                break
            except Exception:
                await wait_workers(herald, 2)
        await wait_workers(herald, 2)
        published.append(await publish(herald.base_url, channel, len(published)))
        await received(page, len(published), timeout=15)
        await page.wait_for_timeout(300)
        assert_consecutive(await page.evaluate("window.msgs"), published)
        assert await page.evaluate("window.herald.reconnects") >= 1
    # The killed worker's stream breaks (net::ERR_INCOMPLETE_CHUNKED_ENCODING): expected.
    unexpected = [e for e in errors if "net::ERR_" not in e]
    assert not unexpected, unexpected


async def test_browser_client_cursor_matches_the_hub(two_workers, browser):
    page = await new_page(browser, [])
    await page.goto(f"{two_workers.base_url}/health")
    channels = ["users", "public:news", "user:42"]
    got = await page.evaluate(
        """async (channels) => {
          const { buildCursor } = await import("/client/herald.js");
          return buildCursor(channels, new Map([["users", "3:cd"], ["public:news", "17:ab"]]));
        }""",
        channels,
    )
    ordered = sorted(channels)
    offsets = {
        "users": protocol.StreamPosition(3, "cd"),
        "public:news": protocol.StreamPosition(17, "ab"),
    }
    assert got == protocol.encode_cursor(ordered, [offsets.get(ch) for ch in ordered])


# -- the dashboard ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_herald(redis_server) -> Iterator[HeraldProcess]:
    """Two workers of the product app (hub + users API) with an admin account."""
    env = {
        "HERALD_ARGON2_MEMORY_KIB": "8192",
        "HERALD_ARGON2_TIME_COST": "1",
        "HERALD_ARGON2_PARALLELISM": "1",
        "HERALD_REGISTER_RATE_PER_MINUTE": "6000",
        "HERALD_REGISTER_BURST": "100",
        "HERALD_LOGIN_RATE_PER_MINUTE": "6000",
        "HERALD_LOGIN_BURST": "100",
    }
    herald = HeraldProcess(workers=2, redis_url=redis_server.url, app=API_APP, env=env)
    create_admin(herald, "ada@example.com")
    with running(herald):
        yield herald


async def text_number(page: Page, selector: str) -> float:
    text = (await page.locator(selector).text_content() or "").replace(",", "")
    try:
        return float(text)
    except ValueError:
        return -1.0


async def poll(read, check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await read()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still {value!r} after {timeout}s")
        await asyncio.sleep(0.1)


def new_user(full_name: str) -> dict:
    tag = uuid.uuid4().hex[:8]
    first = full_name.split()[0].lower()
    return {
        "email": f"{first}.{tag}@example.com",
        "username": f"{first}_{tag}",
        "password": "correct horse battery",
        "password_confirm": "correct horse battery",
        "accept_terms": True,
        "full_name": full_name,
    }


async def register(http: httpx.AsyncClient, body: dict) -> dict:
    response = await http.post("/api/v1/auth/register", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def test_dashboard_shows_users_created_through_the_api_within_a_second(api_herald, browser):
    errors: list[str] = []
    base = api_herald.base_url
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        for name in ("Grace Hopper", "Alan Turing"):
            await register(http, new_user(name))
        page = await new_page(browser, errors)
        await page.goto(f"{base}/dashboard")
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "dashboard-login.png"))
        await page.fill("#username", "ada@example.com")
        await page.fill("#password", ADMIN_PASSWORD)
        await page.click("#signin")
        await page.wait_for_selector("#status[data-state='connected']", timeout=10_000)
        await page.wait_for_selector("#user-rows tr:has-text('grace_')", timeout=10_000)

        body = new_user("Katherine Johnson")
        started = time.monotonic()
        user = await register(http, body)
        created = time.monotonic()
        row = f"#user-rows tr[data-id='{user['id']}']"
        await page.wait_for_selector(row, timeout=1000)
        shown = time.monotonic()
        assert shown - created <= 1.0, f"shown {shown - created:.3f}s after the API answered"

        # Status changes and deletions arrive live too.
        login = await http.post(
            "/api/v1/auth/token", data={"username": "ada@example.com", "password": ADMIN_PASSWORD}
        )
        admin = {"Authorization": f"Bearer {login.json()['access_token']}"}
        victim = await register(http, new_user("Mallory Example"))
        await page.wait_for_selector(f"#user-rows tr[data-id='{victim['id']}']", timeout=2000)
        patched = await http.patch(
            f"/api/v1/users/{user['id']}", json={"status": "suspended"}, headers=admin
        )
        assert patched.status_code == 200, patched.text
        await page.wait_for_selector(f"{row} .badge.suspended", timeout=2000)
        deleted = await http.delete(f"/api/v1/users/{victim['id']}", headers=admin)
        assert deleted.status_code == 204, deleted.text
        await page.wait_for_selector(
            f"#user-rows tr[data-id='{victim['id']}']", state="detached", timeout=2000
        )

        # Live connection counts (summed over workers) include the dashboard itself. (The
        # page's CSP forbids eval, so poll from here instead of page.wait_for_function.)
        await poll(lambda: text_number(page, "#stat-websocket"), lambda n: n >= 1)
        await poll(lambda: page.locator("#events li").count(), lambda n: n >= 4)
        await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        users_shown = await page.locator("#user-rows tr").count()
    assert users_shown >= 4
    assert started <= created
    assert not errors, errors
