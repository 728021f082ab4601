"""DirectWriter: the drain of a raw write path (WebSocket frames or SSE chunks).

Run by the worker's :class:`~hub.flusher.Flusher` after anything was queued on the
connection: it takes the whole outbox, encodes it as one write (the subclass decides
how) and hands it to the transport without waiting for the client. A client whose
unread bytes would pass the outbox byte limit is a slow consumer: it is cut before the
batch is written. Once the connection is closed, the drain says goodbye (unless the
client went first) and does nothing more.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .. import errors
from ..connection import Connection, Outbound
from ..errors import Disconnect

if TYPE_CHECKING:
    from ..hub import Hub


class DirectWriter:
    __slots__ = ("_conn", "_delivered", "_done", "_hub")

    def __init__(self, hub: Hub, conn: Connection, transport_label: str) -> None:
        self._hub = hub
        self._conn = conn
        self._delivered = hub.metrics.delivered.labels(transport_label)
        self._done = False

    # -- what a transport provides ---------------------------------------------------------

    def _encode(self, batch: list[Outbound]) -> tuple[bytes, int]:
        """One write's bytes for ``batch``, and how many messages it holds."""
        raise NotImplementedError

    def _write(self, data: bytes) -> bool:
        """Queue ``data`` on the transport; False if the connection is already gone."""
        raise NotImplementedError

    def _buffered(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        raise NotImplementedError

    def _say_goodbye(self, disconnect: Disconnect) -> None:
        """Write the goodbye of a server-side close and let the transport end."""
        raise NotImplementedError

    # -- the drain -------------------------------------------------------------------------

    def drain(self) -> None:
        if self._done:
            return
        conn = self._conn
        batch = conn.take_batch()
        if batch is None:
            self._goodbye()
            return
        if not batch:
            return
        data, count = self._encode(batch)
        buffered = self._buffered()
        if buffered and buffered + len(data) > conn.max_bytes:
            # The client has not taken what it was given and this batch would push its
            # unread bytes past the limit: cut it without writing the batch, so a slow
            # client never holds more than about ``max_bytes`` of this worker's memory
            # (it recovers the rest from history when it reconnects).
            self._hub.close_connection(conn, errors.SLOW_CONSUMER)
            self._hub.metrics.slow_consumers.inc()
            self._goodbye()
            return
        if not self._write(data):
            conn.close(errors.CLIENT_GONE)
            self._goodbye()
            return
        conn.last_write = time.monotonic()
        if count:
            self._delivered.inc(count)

    def _goodbye(self) -> None:
        """Once, after the close: the goodbye, unless the client went first."""
        self._done = True
        disconnect = self._conn.closed
        if disconnect is not None and not disconnect.by_client:
            self._say_goodbye(disconnect)
