"""Clients for end-to-end tests against real ``herald serve`` processes.

Everything here talks to the server over loopback sockets only, as any third-party
client would: WebSocket through the ``websockets`` library (or a raw socket where a
misbehaving client is needed), SSE and the publish API through ``httpx``. Every wait
is bounded in time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from hub.auth import TokenService

try:
    from tests.herald_process import (
        ADMIN_SERVICE_KEY,
        SECRET,
        SERVICE_KEY,
        HeraldProcess,
        free_port,
    )
    from tests.redis_server import RedisServer
except ImportError:  # plain ``pytest`` puts tests/ itself on sys.path, not the repository
    from herald_process import (  # type: ignore[no-redef,import-not-found]
        ADMIN_SERVICE_KEY,
        SECRET,
        SERVICE_KEY,
        HeraldProcess,
        free_port,
    )
    from redis_server import RedisServer  # type: ignore[no-redef,import-not-found]

__all__ = [
    "ADMIN_SERVICE_KEY",
    "SECRET",
    "SERVICE_KEY",
    "HeraldProcess",
    "RedisServer",
    "free_port",
]

SUBPROTOCOL = "herald.v1"

TOKENS = TokenService(
    SECRET,
    audience="herald",
    issuer="herald",
    access_ttl=900,
    subscribe_ttl=60,
    max_ttl=86_400,
)


def token(sub: str = "42", *, role: str = "user", ttl: int | None = None, **kw: Any) -> str:
    return TOKENS.issue(sub, role=role, ttl=ttl, **kw)


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


SERVICE_HEADERS = bearer(SERVICE_KEY)


# -- WebSocket ------------------------------------------------------------------------------


class WSClient:
    """A protocol-v1 WebSocket client: splits multi-object frames into JSON objects."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pending: list[dict[str, Any]] = []
        self.connected: dict[str, Any] | None = None
        self.next_id = 1

    @property
    def node(self) -> str:
        assert self.connected is not None
        return str(self.connected["node"])

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next server object (raises TimeoutError, or ConnectionClosed)."""
        if not self.pending:
            async with asyncio.timeout(timeout):
                raw = await self.ws.recv()
            text = raw.decode() if isinstance(raw, bytes) else raw
            self.pending = [orjson.loads(line) for line in text.split("\n") if line]
        return self.pending.pop(0)

    async def recv_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        """Skip objects (heartbeat pings, messages) until one matches ``predicate``."""
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            obj = await self.recv(remaining)
            if predicate(obj):
                return obj
        raise TimeoutError("no matching frame in time")

    async def request(self, frame: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Send a frame with a fresh id and return the reply (ack, error, pong) carrying it."""
        request_id = self.next_id
        self.next_id += 1
        await self.ws.send(orjson.dumps({**frame, "id": request_id}).decode())
        return await self.recv_until(
            lambda obj: obj.get("op") in ("ack", "error", "pong") and obj.get("id") == request_id,
            timeout,
        )

    async def subscribe(self, channel: str, **extra: Any) -> dict[str, Any]:
        reply = await self.request({"op": "subscribe", "channel": channel, **extra})
        assert reply["op"] == "ack", reply
        return reply

    async def send_raw(self, text: str) -> None:
        await self.ws.send(text)

    async def wait_closed(self, timeout: float = 5.0) -> tuple[list[dict[str, Any]], int | None]:
        """Read until the server closes; returns the objects seen and the close code."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        with contextlib.suppress(ConnectionClosed):
            for _ in range(100_000):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"server did not close; saw {seen[-5:]}")
                seen.append(await self.recv(remaining))
        seen.extend(self.pending)
        self.pending = []
        return seen, self.close_code

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    async def aclose(self) -> None:
        """Close politely; abort if the handshake stalls (e.g. unread messages queued)."""
        try:
            async with asyncio.timeout(0.5):
                await self.ws.close()
        except Exception:
            self.ws.transport.abort()


async def ws_open(
    url: str,
    credential: str | None = None,
    *,
    origin: str | None = None,
    **kwargs: Any,
) -> WSClient:
    """Open a WebSocket (header auth when ``credential`` is given), no frame read yet."""
    headers = bearer(credential) if credential else {}
    ws = await connect(
        url,
        additional_headers=headers,
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        origin=origin,  # type: ignore[arg-type]
        proxy=None,
        open_timeout=5,
        close_timeout=2,
        **kwargs,
    )
    return WSClient(ws)


async def ws_connect(url: str, credential: str, **kwargs: Any) -> WSClient:
    """Open and authenticate by header; waits for the ``connected`` frame."""
    client = await ws_open(url, credential, **kwargs)
    first = await client.recv()
    assert first["op"] == "connected", first
    client.connected = first
    return client


async def ws_connect_first_frame(url: str, credential: str) -> WSClient:
    """Open without a header and authenticate with ``{"op":"auth"}``."""
    client = await ws_open(url)
    await client.send_raw(orjson.dumps({"op": "auth", "token": credential, "id": 1}).decode())
    first = await client.recv()
    assert first["op"] == "connected", first
    assert first["id"] == 1
    client.connected = first
    client.next_id = 2
    return client


# -- SSE ----------------------------------------------------------------------------------


@dataclass
class SSEEvent:
    event: str
    data: str
    id: str | None

    def json(self) -> Any:
        return orjson.loads(self.data)


@dataclass
class SSEClient:
    """An SSE stream read by a background task into a queue of events and comments."""

    client: httpx.AsyncClient
    response: httpx.Response
    events: asyncio.Queue[SSEEvent | None] = field(default_factory=asyncio.Queue)
    comments: list[str] = field(default_factory=list)
    connected: dict[str, Any] | None = None
    retry: int | None = None
    task: asyncio.Task[None] | None = None
    ended: bool = False

    @property
    def node(self) -> str:
        assert self.connected is not None
        return str(self.connected["node"])

    async def _read(self) -> None:
        event: str = "message"
        data: list[str] = []
        event_id: str | None = None
        try:
            async for line in self.response.aiter_lines():
                if line == "":
                    if data:
                        await self.events.put(SSEEvent(event, "\n".join(data), event_id))
                    event, data, event_id = "message", [], None
                elif line.startswith(":"):
                    self.comments.append(line)
                else:
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "event":
                        event = value
                    elif name == "data":
                        data.append(value)
                    elif name == "id":
                        event_id = value
                    elif name == "retry":
                        self.retry = int(value)
        except (httpx.HTTPError, asyncio.CancelledError):
            pass
        finally:
            self.ended = True
            self.events.put_nowait(None)

    async def next(self, timeout: float = 5.0) -> SSEEvent | None:
        """The next event, or ``None`` once the stream ended."""
        async with asyncio.timeout(timeout):
            return await self.events.get()

    async def next_named(self, name: str, timeout: float = 5.0) -> SSEEvent:
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            event = await self.next(remaining)
            if event is None:
                raise EOFError(f"stream ended before an {name!r} event")
            if event.event == name:
                return event
        raise TimeoutError(f"no {name!r} event in time")

    async def aclose(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        with contextlib.suppress(Exception):
            await self.response.aclose()
        with contextlib.suppress(Exception):
            await self.client.aclose()


async def sse_request(
    base_url: str,
    channels: list[str],
    credential: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> tuple[httpx.AsyncClient, httpx.Response]:
    """Open ``/sse`` on a fresh connection; returns the client and the streaming response."""
    client = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(10.0), trust_env=False)
    query: list[tuple[str, str | int | float | bool | None]] = [("channel", ch) for ch in channels]
    query += list((params or {}).items())
    all_headers = {**(bearer(credential) if credential else {}), **(headers or {})}
    request = client.build_request("GET", "/sse", params=query, headers=all_headers)
    try:
        response = await client.send(request, stream=True)
    except BaseException:
        await client.aclose()
        raise
    return client, response


async def sse_connect(
    base_url: str, channels: list[str], credential: str, **kwargs: Any
) -> SSEClient:
    """Open an SSE stream and wait for its ``connected`` event."""
    client, response = await sse_request(base_url, channels, credential, **kwargs)
    if response.status_code != 200:
        body = await response.aread()
        await response.aclose()
        await client.aclose()
        raise AssertionError(f"SSE refused: {response.status_code} {body!r}")
    sse = SSEClient(client, response)
    sse.task = asyncio.ensure_future(sse._read())
    try:
        first = await sse.next()
        assert first is not None and first.event == "connected", first
        assert first.id, "every event carries an id"
        sse.connected = first.json()
    except BaseException:
        await sse.aclose()
        raise
    return sse


# -- both workers ---------------------------------------------------------------------------


async def connect_on_nodes(
    factory: Callable[[], Awaitable[Any]],
    nodes: int,
    *,
    attempts: int = 40,
) -> dict[str, Any]:
    """Open connections with ``factory`` until ``nodes`` distinct workers hold one.

    Returns one client per node id; extra clients are closed. Fails after ``attempts``.
    """
    held: dict[str, Any] = {}
    extras: list[Any] = []
    try:
        for _ in range(attempts):
            client = await factory()
            if client.node in held:
                extras.append(client)
            else:
                held[client.node] = client
            if len(held) >= nodes:
                return held
        raise AssertionError(f"only reached workers {sorted(held)} in {attempts} connections")
    except BaseException:
        for client in held.values():
            await client.aclose()
        raise
    finally:
        for client in extras:
            await client.aclose()


async def pinned_publishers(
    base_url: str, nodes: int, *, attempts: int = 40
) -> dict[str, httpx.AsyncClient]:
    """One keep-alive HTTP client per worker (found by X-Herald-Node on a probe publish)."""
    found: dict[str, httpx.AsyncClient] = {}
    try:
        for _ in range(attempts):
            client = httpx.AsyncClient(
                base_url=base_url,
                headers=SERVICE_HEADERS,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                timeout=10.0,
                trust_env=False,
            )
            response = await client.post(
                "/api/v1/publish", json={"channel": "public:probe", "event": "probe"}
            )
            assert response.status_code == 200, response.text
            node = response.headers["x-herald-node"]
            if node in found:
                await client.aclose()
            else:
                found[node] = client
            if len(found) >= nodes:
                return found
        raise AssertionError(f"publishes only reached workers {sorted(found)}")
    except BaseException:
        for client in found.values():
            await client.aclose()
        raise


async def publish_fresh(
    base_url: str, channel: str, event: str, data: Any, **kw: Any
) -> httpx.Response:
    """Publish on a fresh TCP connection (so any worker may take it)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10.0, trust_env=False) as client:
        return await client.post(
            "/api/v1/publish",
            json={"channel": channel, "event": event, "data": data},
            headers=kw.pop("headers", SERVICE_HEADERS),
        )


# -- raw sockets ----------------------------------------------------------------------------


def raw_ws_handshake(
    port: int, credential: str, *, rcvbuf: int | None = None, timeout: float = 5.0
) -> tuple[socket.socket, bytes]:
    """Open a TCP socket and complete the WebSocket handshake by hand (no library).

    Returns the socket and any bytes received after the 101 response headers. The
    caller decides whether to ever read or answer pings again.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        "GET /ws HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"
        f"Authorization: Bearer {credential}\r\n"
        "\r\n"
    )
    sock.sendall(request.encode())
    buffer = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in buffer:
        if time.monotonic() > deadline:
            raise TimeoutError("no handshake response")
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed during handshake: {buffer!r}")
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock, rest


# -- metrics ----------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples by (name, sorted labels); multiprocess output is already summed per label set
    except for the ``pid`` label of live gauges, which is summed here."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid"))
            key = (sample.name, labels)
            samples[key] = samples.get(key, 0.0) + sample.value
    return samples


async def metrics(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient(base_url=base_url, timeout=10.0, trust_env=False) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return parse_metrics(response.text)


def metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# -- processes ------------------------------------------------------------------------------


def worker_pids(herald: HeraldProcess) -> list[int]:
    """The uvicorn worker processes."""
    return herald.worker_pids()
