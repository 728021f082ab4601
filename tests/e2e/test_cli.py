"""The commands a newcomer runs: ``herald serve``, ``herald token``, ``herald publish``.

Embedded mode (no Redis, no secret configured: a development secret is created in the
data directory and shared by ``serve`` and ``token``). A plain ``websockets`` client
with the printed token subscribes and receives what ``herald publish`` sends; so does
an SSE client. Invalid settings stop ``herald serve`` at once with a message naming
the variable.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import orjson
import pytest
from websockets.asyncio.client import connect

from .conftest import running_herald
from .helpers import HeraldProcess, free_port, sse_connect

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def herald() -> Iterator[HeraldProcess]:
    with running_herald(unset=("HERALD_SECRET_KEY",)) as server:
        yield server


def _cli_env(herald: HeraldProcess) -> dict[str, str]:
    env = dict(herald.env)
    env.pop("HERALD_SECRET_KEY", None)
    return env


def _run(
    args: list[str], env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="herald-cli-") as cwd:  # no stray .env
        return subprocess.run(
            [sys.executable, "-m", "hub.cli", *args],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


async def test_token_then_plain_websocket_client_receives_cli_publish(
    herald: HeraldProcess,
) -> None:
    env = _cli_env(herald)
    minted = await asyncio.to_thread(_run, ["token", "--sub", "42"], env)
    assert minted.returncode == 0, minted.stderr
    user_token = minted.stdout.strip()
    assert user_token.count(".") == 2 and "\n" not in user_token

    async with connect(
        herald.ws_url,
        additional_headers={"Authorization": f"Bearer {user_token}"},
        proxy=None,
        open_timeout=5,
    ) as ws:
        async with asyncio.timeout(5):
            connected = orjson.loads(await ws.recv())
            assert connected["op"] == "connected" and connected["subject"] == "42"
            await ws.send('{"op":"subscribe","channel":"user:42","id":1}')
            ack = orjson.loads(await ws.recv())
            assert ack["op"] == "ack" and ack["id"] == 1, ack

        published = await asyncio.to_thread(
            _run,
            ["publish", "user:42", "hello", '{"a":1}', "--url", herald.base_url],
            env,
        )
        assert published.returncode == 0, published.stderr
        reply = orjson.loads(published.stdout)
        assert reply["channel"] == "user:42"

        async with asyncio.timeout(5):
            message = orjson.loads(await ws.recv())
        assert message["op"] == "message"
        assert message["channel"] == "user:42"
        assert message["event"] == "hello"
        assert message["data"] == {"a": 1}
        assert message["offset"] == reply["offset"]


async def test_embedded_mode_sse_end_to_end(herald: HeraldProcess) -> None:
    env = _cli_env(herald)
    minted = await asyncio.to_thread(_run, ["token", "--sub", "7", "--ttl", "120"], env)
    assert minted.returncode == 0, minted.stderr
    sse = await sse_connect(herald.base_url, ["user:7", "public:news"], minted.stdout.strip())
    try:
        for channel in ("user:7", "public:news"):
            published = await asyncio.to_thread(
                _run, ["publish", channel, "news", '"hi"', "--url", herald.base_url], env
            )
            assert published.returncode == 0, published.stderr
            event = await sse.next_named("news")
            assert event.json()["channel"] == channel
            assert event.json()["data"] == "hi"
    finally:
        await sse.aclose()


async def test_token_from_another_secret_is_refused(herald: HeraldProcess) -> None:
    """The development secret is really used: a token minted elsewhere does not work."""
    env = _cli_env(herald)
    with tempfile.TemporaryDirectory(prefix="herald-other-") as other:
        env["HERALD_DATA_DIR"] = other
        minted = await asyncio.to_thread(_run, ["token", "--sub", "42"], env)
    assert minted.returncode == 0, minted.stderr
    async with connect(
        herald.ws_url,
        additional_headers={"Authorization": f"Bearer {minted.stdout.strip()}"},
        proxy=None,
        open_timeout=5,
    ) as ws:
        async with asyncio.timeout(5):
            raw = await ws.recv()
            lines = (raw if isinstance(raw, str) else raw.decode()).split("\n")
            assert orjson.loads(lines[0])["code"] == "unauthorized"
            await ws.wait_closed()
    assert ws.close_code == 4501


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        pytest.param({"HERALD_WORKERS": "2"}, ["HERALD_WORKERS", "HERALD_REDIS_URL"], id="workers"),
        pytest.param({"HERALD_ENV": "production"}, ["HERALD_SECRET_KEY"], id="production"),
        pytest.param({"HERALD_PORT": "abc"}, ["HERALD_PORT"], id="port"),
        pytest.param({"HERALD_SECRET_KEY": "short"}, ["HERALD_SECRET_KEY"], id="short-secret"),
        pytest.param({"HERALD_REDIS_URL": "http://x"}, ["HERALD_REDIS_URL"], id="redis-url"),
    ],
)
async def test_invalid_settings_exit_nonzero_naming_the_variable(
    settings: dict[str, str], names: list[str]
) -> None:
    with tempfile.TemporaryDirectory(prefix="herald-bad-") as data_dir:
        env = {**_base_env(), "HERALD_DATA_DIR": data_dir, "HERALD_PORT": str(free_port())}
        env.update(settings)
        result = await asyncio.to_thread(_run, ["serve"], env, 20)
    assert result.returncode != 0
    for name in names:
        assert name in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
