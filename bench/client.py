"""The lean load generator: raw asyncio protocols on uvloop, many per client process.

Why not a WebSocket library: the generator must cost much less per delivery than the
server it measures, on the one core it gets. A server frame is unmasked, so parsing it
is a few byte reads; a client frame may use the all-zero masking key (RFC 6455 allows
any key), so sending one is a header and the payload. Messages are never JSON-decoded:
each one carries its publish time as the first field of ``data`` (``{"t":<time_ns>,``),
and the receiver finds every ``{"t":`` in a frame (several messages per frame are
joined by ``\\n``), computes ``now - t`` and counts it in a 0.1 ms histogram. SSE uses
the same scan on the chunked body, cut at the last complete event.

A :class:`ClientPool` runs ``procs`` :func:`worker_main` processes (pinned with
``sched_setaffinity``), each holding its share of the connections; the controller
talks to them over pipes and sums their counts, histograms and CPU time
(``/proc/self/stat``).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .common import HIST_RES_NS, HIST_SIZE, cpu_seconds, merge_sparse, raise_nofile, rss_bytes

PAT = b'{"t":'
TS_DIGITS = 19  # time.time_ns() has 19 digits until the year 2286
_LINGER0 = struct.pack("ii", 1, 0)

HANDSHAKE, SUBSCRIBING, OPEN, CLOSED = 0, 1, 2, 3


class Stats:
    """Per-process counters of the current step."""

    def __init__(self) -> None:
        # hist_a: messages published before the step's midpoint; hist_b: after it.
        self.reset(0)

    def reset(self, mid_ns: int) -> None:
        self.hist_a = [0] * HIST_SIZE
        self.hist_b = [0] * HIST_SIZE
        self.mid_ns = mid_ns
        self.received = 0
        self.frames = 0
        self.bytes = 0
        self.max_ns = 0
        self.closed = 0

    def scan(self, data: bytes | bytearray, start: int, end: int) -> int:
        """Count the messages in ``data[start:end]`` and their latencies."""
        find = data.find
        i = find(PAT, start, end)
        if i < 0:
            return 0
        now = time.time_ns()
        mid = self.mid_ns
        ha = self.hist_a
        hb = self.hist_b
        top = HIST_SIZE - 1
        mx = self.max_ns
        n = 0
        while i >= 0:
            j = i + 5
            t = int(data[j : j + TS_DIGITS])
            lat = now - t
            b = lat // HIST_RES_NS
            if b > top:
                b = top
            elif b < 0:
                b = 0
            if t < mid:
                ha[b] += 1
            else:
                hb[b] += 1
            if lat > mx:
                mx = lat
            n += 1
            i = find(PAT, j + TS_DIGITS, end)
        self.max_ns = mx
        self.received += n
        return n


def _ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A client frame with the all-zero masking key (payload bytes unchanged)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


class _Base(asyncio.Protocol):
    def __init__(self, stats: Stats, request: bytes) -> None:
        self.stats = stats
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.state = HANDSHAKE
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buf = bytearray()
        self.need = 0
        self.received = 0
        self.error: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == OPEN:
            self.stats.closed += 1
        self.state = CLOSED
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(self.error or f"connection lost: {exc}"))

    def fail(self, reason: str) -> None:
        self.error = reason
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # RST: no TIME_WAIT left on loopback ports
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        self.state = CLOSED
        transport.abort()

    def _head(self, data: bytes) -> bytes | None:
        """Collect the HTTP response head; returns the bytes after it once complete."""
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > 65536:
                self.fail("oversized response head")
            return None
        head = bytes(self.buf[:end])
        rest = bytes(self.buf[end + 4 :])
        self.buf = bytearray()
        if not self._head_ok(head):
            return None
        return rest

    def _head_ok(self, head: bytes) -> bool:
        raise NotImplementedError


class WSClient(_Base):
    """One WebSocket subscriber of ``channel``: handshake with a bearer token, one
    subscribe frame, then count messages."""

    def __init__(self, stats: Stats, host: str, token: str, channel: str) -> None:
        request = (
            "GET /ws HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: aGVyYWxkLWJlbmNoLWtleQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: herald.v1\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
        super().__init__(stats, request)
        self.subscribe = _ws_frame(
            b'{"op":"subscribe","channel":"' + channel.encode() + b'","id":1}'
        )

    def _head_ok(self, head: bytes) -> bool:
        if not head.startswith(b"HTTP/1.1 101"):
            self.fail("handshake refused: " + head.split(b"\r\n", 1)[0].decode(errors="replace"))
            return False
        self.state = SUBSCRIBING
        assert self.transport is not None
        self.transport.write(self.subscribe)
        return True

    def data_received(self, data: bytes) -> None:
        if self.state == HANDSHAKE:
            rest = self._head(data)
            if not rest:
                return
            data = rest
        buf = self.buf
        if buf:
            buf += data
            if len(buf) < self.need:
                return
            data = bytes(buf)
            buf.clear()
        pos = 0
        n = len(data)
        stats = self.stats
        self.need = 0
        while n - pos >= 2:
            ln = data[pos + 1] & 127
            hdr = 2
            if ln >= 126:
                if ln == 126:
                    if n - pos < 4:
                        break
                    ln = (data[pos + 2] << 8) | data[pos + 3]
                    hdr = 4
                else:
                    if n - pos < 10:
                        break
                    ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                    hdr = 10
            end = pos + hdr + ln
            if end > n:
                self.need = end - pos
                break
            op = data[pos] & 15
            if op <= 1:  # text (or a continuation: scanned all the same)
                stats.frames += 1
                stats.bytes += ln
                if self.state == OPEN:
                    self.received += stats.scan(data, pos + hdr, end)
                else:
                    self._control(data[pos + hdr : end])
            elif op == 9:  # ping -> pong with the same payload
                assert self.transport is not None
                self.transport.write(_ws_frame(data[pos + hdr : end], 10))
            elif op == 8:  # close
                self.error = "server closed: " + bytes(data[pos + hdr + 2 : end]).decode(
                    errors="replace"
                )
                if self.state == OPEN:
                    stats.closed += 1
                self.state = CLOSED
                assert self.transport is not None
                self.transport.close()
                return
            pos = end
        if pos < n:
            buf += data[pos:] if pos else data

    def _control(self, payload: bytes) -> None:
        if self.state != SUBSCRIBING:
            return
        if b'"op":"ack"' in payload:
            self.state = OPEN
            if not self.ready.done():
                self.ready.set_result(None)
            # A frame may hold the ack and the first messages.
            self.received += self.stats.scan(payload, 0, len(payload))
        elif b'"op":"error"' in payload or b'"op":"bye"' in payload:
            self.fail("refused: " + payload[:200].decode(errors="replace"))


class SSEClient(_Base):
    """One SSE subscriber: GET /sse?channel=... with a bearer token; the stream is
    subscribed once the ``connected`` event arrives."""

    def __init__(self, stats: Stats, host: str, token: str, channel: str) -> None:
        request = (
            f"GET /sse?channel={channel} HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            "Accept: text/event-stream\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
        super().__init__(stats, request)

    def _head_ok(self, head: bytes) -> bool:
        if not head.startswith(b"HTTP/1.1 200"):
            self.fail("refused: " + head.split(b"\r\n", 1)[0].decode(errors="replace"))
            return False
        self.state = SUBSCRIBING
        return True

    def data_received(self, data: bytes) -> None:
        if self.state == HANDSHAKE:
            rest = self._head(data)
            if rest is None:
                return
            data = rest
            if not data:
                return
        buf = self.buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        stats = self.stats
        stats.frames += 1
        stats.bytes += len(data)
        # Events never straddle a chunk, but TCP may cut anywhere: scan up to the last
        # complete event, keep the rest only if it holds the start of a data line.
        last = data.rfind(b"\n\n")
        if last < 0:
            buf += data
            return
        if self.state == OPEN:
            self.received += stats.scan(data, 0, last)
        elif b"event: connected" in data:
            self.state = OPEN
            if not self.ready.done():
                self.ready.set_result(None)
            self.received += stats.scan(data, 0, last)
        elif b"event: disconnect" in data:
            self.fail("refused: " + data[:200].decode(errors="replace"))
            return
        if data.find(b"data: ", last) >= 0:
            buf += data[last:]
        if self.state == OPEN and b"event: disconnect" in data:
            stats.closed += 1
            self.state = CLOSED


# -- the worker process ----------------------------------------------------------------


@dataclass
class Spec:
    token: str
    channel: str


class Worker:
    def __init__(self, pipe: Any, index: int, host: str, port: int, transport: str) -> None:
        self.pipe = pipe
        self.index = index
        self.host = host
        self.port = port
        self.protocol_class = WSClient if transport == "ws" else SSEClient
        self.stats = Stats()
        self.conns: list[_Base] = []
        self.done = asyncio.get_running_loop().create_future()
        # Each process connects from its own loopback address: 28k ports each.
        self.local_ip = f"127.0.0.{2 + index % 250}"

    async def run(self) -> None:
        # The pipe is read in a thread: a large command (thousands of tokens) must not
        # meet a non-blocking descriptor half-way.
        while not self.done.done():
            try:
                command = await asyncio.to_thread(self.pipe.recv)
            except (EOFError, OSError):
                self._close()
                break
            self._on_command(command)

    def _on_command(self, command: dict[str, Any]) -> None:
        op = command["op"]
        if op == "connect":
            asyncio.ensure_future(self._connect(command))
        elif op == "reset":
            self.stats.reset(command["mid_ns"])
            for conn in self.conns:
                conn.received = 0
            self.pipe.send({"ok": True})
        elif op == "stats":
            self.pipe.send(self._stats(command.get("full", False)))
        elif op == "close":
            self._close()
            self.pipe.send({"ok": True})

    def _close(self) -> None:
        for conn in self.conns:
            conn.abort()
        if not self.done.done():
            self.done.set_result(None)

    async def _connect(self, command: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        specs: list[Spec] = command["specs"]
        limit = asyncio.Semaphore(command["concurrency"])
        timeout = command.get("timeout", 60.0)
        errors: dict[str, int] = {}
        ok = 0
        host_header = f"{self.host}:{self.port}"
        started = time.monotonic()
        cpu0 = cpu_seconds()

        async def one(spec: Spec) -> None:
            nonlocal ok
            async with limit:
                proto = self.protocol_class(self.stats, host_header, spec.token, spec.channel)
                try:
                    async with asyncio.timeout(timeout):
                        await loop.create_connection(
                            lambda: proto, self.host, self.port, local_addr=(self.local_ip, 0)
                        )
                        await proto.ready
                except (OSError, TimeoutError, ConnectionError) as exc:
                    key = proto.error or f"{type(exc).__name__}: {exc}"
                    errors[key[:160]] = errors.get(key[:160], 0) + 1
                    proto.abort()
                    return
                self.conns.append(proto)
                ok += 1

        await asyncio.gather(*(one(spec) for spec in specs))
        self.pipe.send(
            {
                "ok": ok,
                "failed": len(specs) - ok,
                "errors": errors,
                "elapsed": time.monotonic() - started,
                "cpu": cpu_seconds() - cpu0,
            }
        )

    def _stats(self, full: bool) -> dict[str, Any]:
        s = self.stats
        out: dict[str, Any] = {
            "received": s.received,
            "frames": s.frames,
            "bytes": s.bytes,
            "closed": s.closed,
            "open": sum(1 for c in self.conns if c.state == OPEN),
            "cpu": cpu_seconds(),
            "rss": rss_bytes(),
            "max_ns": s.max_ns,
        }
        if full:
            counts = [c.received for c in self.conns if c.state == OPEN]
            out["conn_min"] = min(counts, default=0)
            out["conn_max"] = max(counts, default=0)
            out["hist_a"] = {i: n for i, n in enumerate(s.hist_a) if n}
            out["hist_b"] = {i: n for i, n in enumerate(s.hist_b) if n}
        return out


def worker_main(pipe: Any, index: int, host: str, port: int, transport: str, cpus: Any) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    raise_nofile()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency of the product
        pass

    async def main() -> None:
        await Worker(pipe, index, host, port, transport).run()

    asyncio.run(main())


class ClientPool:
    """``procs`` client processes; the controller side."""

    def __init__(
        self,
        *,
        port: int,
        transport: str = "ws",
        procs: int = 2,
        cpus: Sequence[int] | None = (1,),
        host: str = "127.0.0.1",
    ) -> None:
        if transport not in ("ws", "sse"):
            raise ValueError("transport must be ws or sse")
        ctx = multiprocessing.get_context("spawn")
        self.transport = transport
        self.cpus = list(cpus) if cpus else None
        self.pipes = []
        self.procs = []
        for index in range(procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main,
                args=(child, index, host, port, transport, self.cpus),
                daemon=True,
            )
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def _ask(self, command: dict[str, Any], timeout: float = 120.0) -> list[dict[str, Any]]:
        for pipe in self.pipes:
            pipe.send(command)
        replies = []
        for pipe in self.pipes:
            if not pipe.poll(timeout):
                raise TimeoutError(f"client process did not answer {command['op']!r}")
            replies.append(pipe.recv())
        return replies

    def connect(
        self, specs: Sequence[Spec], *, concurrency: int = 200, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Open every connection (spread round-robin over the processes) and wait until
        each one is subscribed or failed."""
        shares: list[list[Spec]] = [[] for _ in self.pipes]
        for i, spec in enumerate(specs):
            shares[i % len(shares)].append(spec)
        started = time.monotonic()
        for pipe, share in zip(self.pipes, shares, strict=True):
            pipe.send(
                {"op": "connect", "specs": share, "concurrency": concurrency, "timeout": timeout}
            )
        replies = []
        for pipe in self.pipes:
            if not pipe.poll(timeout + 60):
                raise TimeoutError("client process did not finish connecting")
            replies.append(pipe.recv())
        elapsed = time.monotonic() - started
        errors: dict[str, int] = {}
        for reply in replies:
            merge_sparse_str(errors, reply["errors"])
        return {
            "ok": sum(r["ok"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "errors": errors,
            "elapsed": elapsed,
            "client_cpu": sum(r["cpu"] for r in replies),
        }

    def reset(self, mid_ns: int) -> None:
        self._ask({"op": "reset", "mid_ns": mid_ns})

    def stats(self, full: bool = False) -> dict[str, Any]:
        replies = self._ask({"op": "stats", "full": full})
        out: dict[str, Any] = {
            key: sum(r[key] for r in replies)
            for key in ("received", "frames", "bytes", "closed", "open", "cpu", "rss")
        }
        out["max_ms"] = max(r["max_ns"] for r in replies) / 1e6
        if full:
            out["conn_min"] = min(r["conn_min"] for r in replies)
            out["conn_max"] = max(r["conn_max"] for r in replies)
            hist_a: dict[int, int] = {}
            hist_b: dict[int, int] = {}
            for r in replies:
                merge_sparse(hist_a, r["hist_a"])
                merge_sparse(hist_b, r["hist_b"])
            out["hist_a"] = hist_a
            out["hist_b"] = hist_b
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ask({"op": "close"}, timeout=20)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_sparse_str(into: dict[str, int], other: dict[str, int]) -> None:
    for key, n in other.items():
        into[key] = into.get(key, 0) + n
