"""Wire protocol v1, Sans-I/O: parse client frames, encode server frames and SSE events.

Nothing here awaits or touches a socket; transports call these functions. The
message envelope is built by byte concatenation around the publisher's
already-encoded ``data`` so a publication is serialised exactly once per worker
and the same bytes go to every local subscriber (see docs/protocol.md).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from . import errors
from .errors import Disconnect, HubError

SUBPROTOCOL = "herald.v1"
EVENT_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
MAX_ID = 2**53 - 1


# -- offsets ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where a channel's stream stands: ``offset`` grows by one per publication within an
    ``epoch``; a new epoch means the history was lost and offsets restarted."""

    offset: int
    epoch: str

    def token(self) -> str:
        return f"{self.offset}:{self.epoch}"


def parse_offset(token: str) -> StreamPosition:
    """Parse the opaque ``"<offset>:<epoch>"`` token clients send back as ``since``."""
    seq, sep, epoch = token.partition(":")
    # isascii: str.isdigit() is also true for '²' and other digits int() refuses.
    if not sep or not (seq.isascii() and seq.isdigit()) or not epoch or len(token) > 64:
        raise HubError(errors.BAD_REQUEST, f"malformed offset {token[:64]!r}")
    return StreamPosition(int(seq), epoch)


# -- publications -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publication:
    """One message on one channel, as the broker delivers it.

    ``data`` is the JSON encoding of the payload, produced once by the publisher.
    """

    channel: str
    offset: int
    epoch: str
    event: str
    data: bytes
    ts: int  # milliseconds since the epoch, set at publish time

    @property
    def position(self) -> StreamPosition:
        return StreamPosition(self.offset, self.epoch)


class EncodedMessage:
    """A publication with its client envelope, encoded once and shared by every subscriber.

    The WebSocket frame is built eagerly (every WebSocket subscriber needs it); the SSE
    forms are built by the first SSE subscriber that needs them and cached here, so a
    message costs one formatting per worker, not one per subscriber.
    """

    __slots__ = ("_sse", "envelope", "frame", "position", "publication", "text")

    def __init__(self, publication: Publication, envelope: bytes) -> None:
        self.publication = publication
        self.envelope = envelope
        # the same envelope as str, for ASGI text frames (decoded once, shared)
        self.text = envelope.decode()
        # the envelope as a complete WebSocket text frame (server frames are unmasked,
        # so the same bytes go to every connection)
        self.frame = ws_text_frame(envelope)
        self.position = StreamPosition(publication.offset, publication.epoch)
        self._sse: dict[tuple[bool, bool], bytes] | None = None

    def __repr__(self) -> str:
        pub = self.publication
        return f"<EncodedMessage {pub.channel!r} {pub.offset}:{pub.epoch}>"

    def sse_event(self, *, named: bool, chunked: bool = False) -> bytes:
        """This message as the SSE event of a connection subscribed to its channel alone
        (its ``id:`` is then the same for every such connection), optionally wrapped as
        one HTTP/1.1 chunk. ``named=False`` sends it as the default ``message`` event."""
        key = (named, chunked)
        cache = self._sse
        if cache is None:
            cache = self._sse = {}
        else:
            cached = cache.get(key)
            if cached is not None:
                return cached
        if chunked:
            event = self.sse_event(named=named)
            value = b"%x\r\n%b\r\n" % (len(event), event)
        else:
            pub = self.publication
            cursor = encode_cursor([pub.channel], [self.position])
            value = sse_event(pub.event if named else "message", self.envelope, cursor)
        cache[key] = value
        return value


def encode_message(pub: Publication) -> EncodedMessage:
    envelope = b"".join(
        (
            b'{"op":"message","channel":',
            orjson.dumps(pub.channel),
            b',"offset":"',
            str(pub.offset).encode(),
            b":",
            pub.epoch.encode(),
            b'","event":',
            orjson.dumps(pub.event),
            b',"data":',
            pub.data,
            b',"ts":',
            str(pub.ts).encode(),
            b"}",
        )
    )
    return EncodedMessage(pub, envelope)


def ws_text_frame(payload: bytes) -> bytes:
    """A complete, unmasked, unfragmented WebSocket text frame (RFC 6455 5.2)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


def encode_data(data: Any) -> bytes:
    """Encode a payload for publishing; raises ``HubError(bad_request)`` if not JSON-able."""
    try:
        return orjson.dumps(data)
    except TypeError as exc:
        raise HubError(errors.BAD_REQUEST, f"data is not JSON-serialisable: {exc}") from None


def validate_event_name(event: object) -> str:
    # fullmatch: '$' also matches before a trailing newline (an SSE event-line injection).
    if not isinstance(event, str) or not EVENT_NAME_RE.fullmatch(event):
        raise HubError(
            errors.BAD_REQUEST,
            "event must be 1-64 characters of letters, digits and _ . : -",
        )
    return event


# -- client frames ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthFrame:
    token: str
    id: int | None = None


@dataclass(frozen=True, slots=True)
class RefreshFrame:
    token: str
    id: int | None = None


@dataclass(frozen=True, slots=True)
class SubscribeFrame:
    channel: str
    since: StreamPosition | None = None
    id: int | None = None


@dataclass(frozen=True, slots=True)
class UnsubscribeFrame:
    channel: str
    id: int | None = None


@dataclass(frozen=True, slots=True)
class PublishFrame:
    channel: str
    event: str
    data: bytes
    id: int | None = None


@dataclass(frozen=True, slots=True)
class PingFrame:
    id: int | None = None


@dataclass(frozen=True, slots=True)
class PongFrame:
    id: int | None = None


ClientFrame = (
    AuthFrame
    | RefreshFrame
    | SubscribeFrame
    | UnsubscribeFrame
    | PublishFrame
    | PingFrame
    | PongFrame
)
OPS = ("auth", "refresh", "subscribe", "unsubscribe", "publish", "ping", "pong")


def frame_id(obj: dict[str, Any]) -> int | None:
    """The request id of a decoded frame, if it carries a valid one (for error replies)."""
    value = obj.get("id")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID:
        return value
    return None


def _require_str(obj: dict[str, Any], key: str, op: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise HubError(errors.BAD_REQUEST, f"'{op}' needs a non-empty string '{key}'")
    return value


def parse_json_frame(raw: str | bytes) -> dict[str, Any]:
    """Decode a text frame into a JSON object or raise ``bad_request``."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise HubError(errors.BAD_REQUEST, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise HubError(errors.BAD_REQUEST, "frame must be a JSON object")
    return obj


def decode_client_frame(obj: dict[str, Any], *, max_message_bytes: int) -> ClientFrame:
    """Turn a decoded JSON object into a typed frame, or raise a precise ``HubError``."""
    raw_id = obj.get("id")
    request_id = frame_id(obj)
    if raw_id is not None and request_id is None:
        raise HubError(errors.BAD_REQUEST, f"'id' must be an integer from 0 to {MAX_ID}")
    op = obj.get("op")
    if not isinstance(op, str):
        raise HubError(errors.BAD_REQUEST, "frame needs a string 'op'")
    if op == "subscribe":
        since_token = obj.get("since")
        since = None
        if since_token is not None:
            if not isinstance(since_token, str):
                raise HubError(errors.BAD_REQUEST, "'since' must be an offset string")
            since = parse_offset(since_token)
        return SubscribeFrame(_require_str(obj, "channel", op), since, request_id)
    if op == "unsubscribe":
        return UnsubscribeFrame(_require_str(obj, "channel", op), request_id)
    if op == "publish":
        channel = _require_str(obj, "channel", op)
        event = validate_event_name(obj.get("event"))
        if "data" not in obj:
            raise HubError(errors.BAD_REQUEST, "'publish' needs 'data'")
        data = orjson.dumps(obj["data"])
        if len(data) > max_message_bytes:
            raise HubError(
                errors.MESSAGE_TOO_LARGE,
                f"data is {len(data)} bytes, the limit is {max_message_bytes}",
            )
        return PublishFrame(channel, event, data, request_id)
    if op == "ping":
        return PingFrame(request_id)
    if op == "pong":
        return PongFrame(request_id)
    if op == "auth":
        return AuthFrame(_require_str(obj, "token", op), request_id)
    if op == "refresh":
        return RefreshFrame(_require_str(obj, "token", op), request_id)
    raise HubError(errors.UNKNOWN_OP, f"unknown op {op[:32]!r}; expected one of {', '.join(OPS)}")


# -- server frames ------------------------------------------------------------------------


def encode_ack(request_id: int | None, **fields: Any) -> bytes:
    return orjson.dumps({"op": "ack", "id": request_id, **fields})


def encode_welcome(request_id: int | None, **fields: Any) -> bytes:
    """First frame after a successful auth: ``{"op":"connected","id":<auth id>,...}``."""
    return orjson.dumps({"op": "connected", "id": request_id, **fields})


def encode_error(request_id: int | None, error: HubError) -> bytes:
    return orjson.dumps(
        {
            "op": "error",
            "id": request_id,
            "code": error.code,
            "message": error.message,
            "temporary": error.temporary,
        }
    )


def encode_bye(disconnect: Disconnect) -> bytes:
    return orjson.dumps(
        {
            "op": "bye",
            "code": disconnect.reason,
            "close_code": disconnect.code,
            "message": disconnect.message,
            "reconnect": disconnect.reconnect,
        }
    )


PING_FRAME = b'{"op":"ping"}'


def encode_pong(request_id: int | None) -> bytes:
    if request_id is None:
        return b'{"op":"pong"}'
    return orjson.dumps({"op": "pong", "id": request_id})


def join_frames(frames: list[bytes]) -> bytes:
    """Several server objects in one WebSocket frame, one JSON object per line."""
    return b"\n".join(frames)


# -- SSE ----------------------------------------------------------------------------------


def sse_event(event: str, data: bytes, event_id: str | None = None) -> bytes:
    """One SSE event. ``data`` is single-line JSON (orjson never emits newlines)."""
    if event_id is None:
        return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"
    return (
        b"id: " + event_id.encode() + b"\nevent: " + event.encode() + b"\ndata: " + data + b"\n\n"
    )


def sse_retry(milliseconds: int) -> bytes:
    return f"retry: {milliseconds}\n\n".encode()


SSE_HEARTBEAT = b": ping\n\n"


def channel_set_tag(channels: list[str]) -> str:
    """A short tag of a connection's sorted channel list, so a cursor is never applied to
    a different set of channels."""
    return format(zlib.crc32("\n".join(channels).encode()) & 0xFFFFFFFF, "08x")


def encode_cursor(channels: list[str], positions: list[StreamPosition | None]) -> str:
    """The SSE ``id:`` of a multi-channel connection: one position per channel, in the
    connection's sorted channel order, prefixed by the channel-set tag."""
    parts = ["" if pos is None else pos.token() for pos in positions]
    return channel_set_tag(channels) + "." + ",".join(parts)


def decode_cursor(channels: list[str], cursor: str) -> list[StreamPosition | None] | None:
    """Positions from a ``Last-Event-ID``; ``None`` if it does not belong to these channels."""
    tag, sep, body = cursor.partition(".")
    if not sep or tag != channel_set_tag(channels) or len(cursor) > 16_384:
        return None
    parts = body.split(",")
    if len(parts) != len(channels):
        return None
    positions: list[StreamPosition | None] = []
    for part in parts:
        if not part:
            positions.append(None)
            continue
        try:
            positions.append(parse_offset(part))
        except HubError:
            return None
    return positions
