"""Sans-I/O pieces of protocol v1 as a client sees it (see docs/protocol.md).

Nothing here awaits: splitting server frames into objects, turning envelopes into
:class:`~clients._models.Message`, parsing an SSE byte stream into events, building the
multi-channel SSE resume cursor, and deriving endpoint URLs from a base URL.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ._errors import ProtocolError
from ._models import Message, Offset

SUBPROTOCOL = "herald.v1"


def split_frame(text: str) -> list[dict[str, Any]]:
    """A server WebSocket frame holds one or more JSON objects, one per line."""
    objects = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise ProtocolError(f"server frame is not JSON: {line[:80]!r}") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"server frame is not a JSON object: {line[:80]!r}")
        objects.append(obj)
    return objects


def message_from(obj: Mapping[str, Any]) -> Message:
    """A ``{"op":"message",...}`` envelope as a :class:`Message`."""
    try:
        channel, event, offset = obj["channel"], obj["event"], obj["offset"]
        ts = int(obj.get("ts") or 0)
    except (KeyError, TypeError, ValueError):
        raise ProtocolError(f"malformed message envelope: {str(obj)[:120]}") from None
    if not (isinstance(channel, str) and isinstance(event, str) and isinstance(offset, str)):
        raise ProtocolError(f"malformed message envelope: {str(obj)[:120]}")
    try:
        Offset.parse(offset)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    return Message(channel, event, obj.get("data"), offset, ts)


# -- SSE ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched server-sent event (``event`` defaults to ``message``)."""

    event: str
    data: str
    id: str | None


class SSEParser:
    """The event-stream format, fed line by line (lines without their terminator).

    Follows the HTML standard's rules: ``data`` lines join with ``\\n``, the last ``id``
    persists across events, comments (``:``) and unknown fields are ignored, an event is
    dispatched on an empty line only if it had data.
    """

    def __init__(self) -> None:
        self.last_id: str | None = None
        self.retry: int | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SSEEvent(self._event or "message", "\n".join(self._data), self.last_id)
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
        return None


def channel_set_tag(channels: Iterable[str]) -> str:
    """The tag that starts an SSE cursor: CRC-32 of the sorted channel names joined by
    newlines, as 8 hex digits (docs/protocol.md, "SSE")."""
    joined = "\n".join(sorted(channels))
    return format(zlib.crc32(joined.encode()) & 0xFFFFFFFF, "08x")


def build_cursor(offsets: Mapping[str, str | None], channels: Iterable[str]) -> str:
    """A ``Last-Event-ID`` for ``channels`` from per-channel offsets (empty where none),
    so a connection whose channel set changed still resumes every channel it knew."""
    ordered = sorted(channels)
    return channel_set_tag(ordered) + "." + ",".join(offsets.get(ch) or "" for ch in ordered)


# -- URLs -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the hub's endpoints are, from one base URL."""

    http: str  # http(s)://host:port[/prefix], no trailing slash

    @classmethod
    def from_url(cls, url: str) -> Endpoints:
        """Accept ``http(s)://host[:port][/prefix]`` or the WebSocket URL
        ``ws(s)://host[:port][/prefix]/ws`` (and ``.../sse``)."""
        parts = urlsplit(url)
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
        if scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"hub URL must be http(s):// or ws(s)://, got {url!r}")
        path = parts.path.rstrip("/")
        for suffix in ("/ws", "/sse"):
            if path.endswith(suffix):
                path = path[: -len(suffix)]
        return cls(urlunsplit((scheme, parts.netloc, path, "", "")))

    @property
    def websocket(self) -> str:
        parts = urlsplit(self.http)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path + "/ws", "", ""))

    @property
    def sse(self) -> str:
        return self.http + "/sse"

    def api(self, path: str) -> str:
        return self.http + path
