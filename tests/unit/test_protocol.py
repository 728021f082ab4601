"""hub.protocol: pure parse/encode of frames, envelopes, offsets and SSE cursors."""

from __future__ import annotations

import string
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from hub import errors, protocol
from hub.errors import HubError
from hub.protocol import (
    AuthFrame,
    PingFrame,
    PongFrame,
    Publication,
    PublishFrame,
    RefreshFrame,
    StreamPosition,
    SubscribeFrame,
    UnsubscribeFrame,
    decode_client_frame,
    decode_cursor,
    encode_cursor,
    encode_message,
    parse_json_frame,
    parse_offset,
)

LIMIT = 1024


def decode(obj: dict[str, Any], limit: int = LIMIT) -> protocol.ClientFrame:
    return decode_client_frame(obj, max_message_bytes=limit)


def refused(obj: dict[str, Any], code: str = errors.BAD_REQUEST) -> HubError:
    with pytest.raises(HubError) as info:
        decode(obj)
    assert info.value.code == code
    return info.value


# -- decode_client_frame: every op -----------------------------------------------------------


def test_decode_auth_frame_with_id() -> None:
    assert decode({"op": "auth", "token": "t0k", "id": 1}) == AuthFrame("t0k", 1)


def test_decode_refresh_frame() -> None:
    assert decode({"op": "refresh", "token": "t0k"}) == RefreshFrame("t0k", None)


def test_decode_subscribe_frame_without_since() -> None:
    assert decode({"op": "subscribe", "channel": "user:42", "id": 7}) == SubscribeFrame(
        "user:42", None, 7
    )


def test_decode_subscribe_frame_with_since_parses_the_offset() -> None:
    frame = decode({"op": "subscribe", "channel": "user:42", "since": "12:ab12"})
    assert frame == SubscribeFrame("user:42", StreamPosition(12, "ab12"), None)


def test_decode_unsubscribe_frame() -> None:
    assert decode({"op": "unsubscribe", "channel": "public:x", "id": 0}) == UnsubscribeFrame(
        "public:x", 0
    )


def test_decode_publish_frame_encodes_data_once() -> None:
    frame = decode(
        {"op": "publish", "channel": "public:x", "event": "msg", "data": {"a": [1, 2]}, "id": 3}
    )
    assert frame == PublishFrame("public:x", "msg", b'{"a":[1,2]}', 3)


def test_decode_publish_frame_with_null_data() -> None:
    frame = decode({"op": "publish", "channel": "public:x", "event": "msg", "data": None})
    assert isinstance(frame, PublishFrame)
    assert frame.data == b"null"


def test_decode_ping_and_pong() -> None:
    assert decode({"op": "ping"}) == PingFrame(None)
    assert decode({"op": "ping", "id": 9}) == PingFrame(9)
    assert decode({"op": "pong"}) == PongFrame(None)


def test_decode_largest_valid_id() -> None:
    assert decode({"op": "ping", "id": protocol.MAX_ID}) == PingFrame(protocol.MAX_ID)


# -- decode_client_frame: malformed ----------------------------------------------------------


@pytest.mark.parametrize("raw", ["not json", "{", "", b"\xff\xfe", "{'op': 'ping'}", "NaN"])
def test_parse_json_frame_rejects_non_json(raw: str | bytes) -> None:
    with pytest.raises(HubError) as info:
        parse_json_frame(raw)
    assert info.value.code == errors.BAD_REQUEST
    assert "not valid JSON" in info.value.message


@pytest.mark.parametrize("raw", ["[]", "1", '"op"', "null", "true", '[{"op":"ping"}]'])
def test_parse_json_frame_rejects_non_objects(raw: str) -> None:
    with pytest.raises(HubError) as info:
        parse_json_frame(raw)
    assert info.value.code == errors.BAD_REQUEST
    assert "JSON object" in info.value.message


def test_parse_json_frame_accepts_bytes_and_str() -> None:
    assert parse_json_frame(b'{"op":"ping"}') == {"op": "ping"}
    assert parse_json_frame('{"op":"ping"}') == {"op": "ping"}


@pytest.mark.parametrize("op", [None, 1, ["ping"], {"x": 1}, True])
def test_decode_rejects_missing_or_non_string_op(op: object) -> None:
    obj: dict[str, Any] = {} if op is None else {"op": op}
    assert "'op'" in refused(obj).message


@pytest.mark.parametrize("op", ["PING", "hello", "", "subscribe ", "x" * 500])
def test_decode_rejects_unknown_op_listing_the_known_ones(op: str) -> None:
    error = refused({"op": op}, errors.UNKNOWN_OP)
    assert "subscribe" in error.message
    assert len(error.message) < 200  # the op is truncated, not echoed in full


@pytest.mark.parametrize("bad_id", [-1, 1.5, "1", True, False, protocol.MAX_ID + 1, [1], {}])
def test_decode_rejects_bad_id(bad_id: object) -> None:
    assert "'id'" in refused({"op": "ping", "id": bad_id}).message


def test_decode_rejects_bad_id_before_looking_at_op() -> None:
    refused({"op": "nope", "id": "x"}, errors.BAD_REQUEST)


def test_frame_id_only_returns_valid_ids() -> None:
    assert protocol.frame_id({"id": 5}) == 5
    assert protocol.frame_id({"id": True}) is None
    assert protocol.frame_id({"id": -3}) is None
    assert protocol.frame_id({}) is None


@pytest.mark.parametrize("since", [5, ["1:a"], {"o": 1}, True])
def test_decode_rejects_non_string_since(since: object) -> None:
    refused({"op": "subscribe", "channel": "user:1", "since": since})


@pytest.mark.parametrize(
    "since", ["", "abc", "12", "12:", ":abc", "-1:abc", "1.5:abc", "x:1", "1:" + "e" * 80, "²:ab"]
)
def test_decode_rejects_malformed_since(since: str) -> None:
    assert "offset" in refused({"op": "subscribe", "channel": "user:1", "since": since}).message


@pytest.mark.parametrize("op", ["subscribe", "unsubscribe"])
@pytest.mark.parametrize("channel", [None, "", 5, ["user:1"]])
def test_decode_rejects_missing_channel(op: str, channel: object) -> None:
    obj: dict[str, Any] = {"op": op}
    if channel is not None:
        obj["channel"] = channel
    assert "'channel'" in refused(obj).message


@pytest.mark.parametrize("op", ["auth", "refresh"])
@pytest.mark.parametrize("token", [None, "", 123])
def test_decode_rejects_missing_token(op: str, token: object) -> None:
    obj: dict[str, Any] = {"op": op}
    if token is not None:
        obj["token"] = token
    assert "'token'" in refused(obj).message


@pytest.mark.parametrize(
    "event",
    [None, "", 5, "has space", "new\nline", "msg\n", "ünïcode", "x" * 65, "semi;colon", "a/b"],
)
def test_decode_rejects_bad_event_names(event: object) -> None:
    obj: dict[str, Any] = {"op": "publish", "channel": "public:x", "data": 1}
    if event is not None:
        obj["event"] = event
    assert "event" in refused(obj).message


@pytest.mark.parametrize("event", ["a", "user.updated", "A-b_c:d.e", "x" * 64])
def test_decode_accepts_good_event_names(event: str) -> None:
    frame = decode({"op": "publish", "channel": "public:x", "event": event, "data": 1})
    assert isinstance(frame, PublishFrame) and frame.event == event


def test_decode_publish_needs_data_key() -> None:
    assert "'data'" in refused({"op": "publish", "channel": "public:x", "event": "e"}).message


def test_decode_publish_oversized_data_is_message_too_large() -> None:
    big = "x" * LIMIT  # encodes to LIMIT + 2 bytes with the quotes
    error = refused(
        {"op": "publish", "channel": "public:x", "event": "e", "data": big},
        errors.MESSAGE_TOO_LARGE,
    )
    assert str(LIMIT) in error.message


def test_decode_publish_data_exactly_at_the_limit_passes() -> None:
    data = "x" * (LIMIT - 2)
    frame = decode({"op": "publish", "channel": "public:x", "event": "e", "data": data})
    assert isinstance(frame, PublishFrame) and len(frame.data) == LIMIT


# -- server frames ----------------------------------------------------------------------------


def publication(**overrides: Any) -> Publication:
    values: dict[str, Any] = {
        "channel": "user:42",
        "offset": 7,
        "epoch": "beef01",
        "event": "user.updated",
        "data": b'{"name":"Ada","tags":["x","y"],"n":1.5}',
        "ts": 1_700_000_000_123,
    }
    values.update(overrides)
    return Publication(**values)


def test_encode_message_envelope_is_the_expected_json_object() -> None:
    pub = publication()
    message = encode_message(pub)
    assert orjson.loads(message.envelope) == {
        "op": "message",
        "channel": "user:42",
        "offset": "7:beef01",
        "event": "user.updated",
        "data": {"name": "Ada", "tags": ["x", "y"], "n": 1.5},
        "ts": 1_700_000_000_123,
    }
    assert message.text == message.envelope.decode()
    assert message.publication is pub


def test_encode_message_carries_the_data_bytes_unchanged() -> None:
    # Whitespace and key order that a re-serialisation would change.
    raw = b'{ "z" : 1,  "a" : [ 1 , 2 ] , "u": "\\u00e9" }'
    message = encode_message(publication(data=raw))
    assert raw in message.envelope
    assert orjson.loads(message.envelope)["data"] == {"z": 1, "a": [1, 2], "u": "é"}


def test_encode_message_is_a_single_line() -> None:
    message = encode_message(publication(data=orjson.dumps({"text": "a\nb"})))
    assert b"\n" not in message.envelope


def test_encode_error_ack_bye_pong() -> None:
    error = HubError(errors.FORBIDDEN, "no", temporary=False)
    assert orjson.loads(protocol.encode_error(4, error)) == {
        "op": "error",
        "id": 4,
        "code": "forbidden",
        "message": "no",
        "temporary": False,
    }
    assert orjson.loads(protocol.encode_ack(1, channel="c")) == {
        "op": "ack",
        "id": 1,
        "channel": "c",
    }
    assert orjson.loads(protocol.encode_bye(errors.SLOW_CONSUMER)) == {
        "op": "bye",
        "code": "slow_consumer",
        "close_code": 4001,
        "message": errors.SLOW_CONSUMER.message,
        "reconnect": True,
    }
    assert orjson.loads(protocol.encode_bye(errors.UNAUTHORIZED_DISCONNECT))["reconnect"] is False
    assert orjson.loads(protocol.encode_pong(None)) == {"op": "pong"}
    assert orjson.loads(protocol.encode_pong(3)) == {"op": "pong", "id": 3}


def test_join_frames_puts_one_object_per_line() -> None:
    frames = [b'{"op":"pong"}', encode_message(publication()).envelope]
    joined = protocol.join_frames(frames)
    assert [orjson.loads(line) for line in joined.split(b"\n")][0] == {"op": "pong"}
    assert len(joined.split(b"\n")) == 2


def test_disconnect_codes_split_reconnect_and_terminal() -> None:
    for disconnect in errors.ALL_DISCONNECTS:
        assert disconnect.reconnect == (disconnect.code < 4500)
    assert errors.SHUTDOWN.code == 1001 and errors.SHUTDOWN.reconnect
    assert errors.FORBIDDEN_ORIGIN.code >= 4500 and not errors.FORBIDDEN_ORIGIN.reconnect
    assert len({d.code for d in errors.ALL_DISCONNECTS}) == len(errors.ALL_DISCONNECTS)


# -- SSE --------------------------------------------------------------------------------------


def test_sse_event_with_and_without_id() -> None:
    assert protocol.sse_event("msg", b'{"a":1}', "c1") == b'id: c1\nevent: msg\ndata: {"a":1}\n\n'
    assert protocol.sse_event("msg", b"1") == b"event: msg\ndata: 1\n\n"
    assert protocol.sse_retry(1500) == b"retry: 1500\n\n"


CHANNELS = ["public:news", "user:42"]


def test_cursor_round_trip_with_missing_positions() -> None:
    positions = [StreamPosition(3, "e1"), None]
    cursor = encode_cursor(CHANNELS, positions)
    assert decode_cursor(CHANNELS, cursor) == positions


def test_cursor_is_refused_for_a_different_channel_set() -> None:
    cursor = encode_cursor(CHANNELS, [StreamPosition(3, "e1"), StreamPosition(4, "e2")])
    assert decode_cursor(["public:news", "user:43"], cursor) is None
    assert decode_cursor(["public:news"], cursor) is None
    assert decode_cursor([*CHANNELS, "public:more"], cursor) is None


@pytest.mark.parametrize(
    "cursor",
    ["", "garbage", ".", "00000000.", "zz.1:a,2:b", "x" * 20_000],
)
def test_cursor_garbage_is_refused(cursor: str) -> None:
    assert decode_cursor(CHANNELS, cursor) is None


def test_cursor_with_right_tag_but_bad_parts_is_refused() -> None:
    tag = protocol.channel_set_tag(CHANNELS)
    assert decode_cursor(CHANNELS, f"{tag}.1:a") is None  # one part for two channels
    assert decode_cursor(CHANNELS, f"{tag}.1:a,x:b") is None
    assert decode_cursor(CHANNELS, f"{tag}.1:a,²:b") is None
    assert decode_cursor(CHANNELS, f"{tag}.1:a,2:b") == [
        StreamPosition(1, "a"),
        StreamPosition(2, "b"),
    ]


# -- properties --------------------------------------------------------------------------------

# No example database (tests run in a temporary directory) and no per-example deadline
# (a loaded CI machine must not turn a slow example into a failure).
PROPERTY = hsettings(database=None, deadline=None)
EPOCHS = st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=16)
POSITIONS = st.builds(StreamPosition, st.integers(min_value=0, max_value=2**63), EPOCHS)


@PROPERTY
@given(POSITIONS)
def test_parse_offset_round_trips_position_tokens(position: StreamPosition) -> None:
    assert parse_offset(position.token()) == position


@PROPERTY
@given(st.integers(min_value=0, max_value=10**20), st.text(min_size=1, max_size=20))
def test_parse_offset_round_trips_any_epoch(offset: int, epoch: str) -> None:
    assert parse_offset(f"{offset}:{epoch}") == StreamPosition(offset, epoch)


# Offset-shaped strings whose "digits" include every Unicode digit and number character.
DIGITISH = st.text(alphabet=st.characters(categories=("Nd", "No")), min_size=1, max_size=3)
OFFSETISH = st.builds(lambda seq, epoch: f"{seq}:{epoch}", DIGITISH, st.text(max_size=5))


@PROPERTY
@given(st.text(max_size=80) | OFFSETISH)
def test_parse_offset_raises_only_hub_errors(token: str) -> None:
    try:
        position = parse_offset(token)
    except HubError as exc:
        assert exc.code == errors.BAD_REQUEST
    else:
        assert position.token() == f"{int(token.partition(':')[0])}:{token.partition(':')[2]}"


CHANNEL_NAMES = st.from_regex(r"\A[a-z]{1,8}:[a-z0-9]{1,8}\Z")


@PROPERTY
@given(
    st.lists(CHANNEL_NAMES, min_size=1, max_size=6, unique=True).flatmap(
        lambda chans: st.tuples(
            st.just(sorted(chans)),
            st.lists(st.none() | POSITIONS, min_size=len(chans), max_size=len(chans)),
        )
    )
)
def test_cursor_round_trips(case: tuple[list[str], list[StreamPosition | None]]) -> None:
    channels, positions = case
    assert decode_cursor(channels, encode_cursor(channels, positions)) == positions


@PROPERTY
@given(st.text(max_size=200))
def test_decode_cursor_never_raises(cursor: str) -> None:
    result = decode_cursor(CHANNELS, cursor)
    assert result is None or len(result) == len(CHANNELS)


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
KEYS = st.sampled_from(["op", "id", "channel", "since", "event", "data", "token"]) | st.text(
    max_size=6
)
VALUES = (
    st.sampled_from([*protocol.OPS, "user:1", "1:ab", "msg"])
    | st.from_regex(r"\A[0-9²³¹]{1,4}:[a-z]{1,3}\Z")
    | JSON_VALUES
)


@hsettings(PROPERTY, max_examples=300)
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_decode_client_frame_raises_only_hub_errors(obj: dict[str, Any]) -> None:
    try:
        decode_client_frame(obj, max_message_bytes=64)
    except HubError:
        pass


@PROPERTY
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_parse_then_decode_raises_only_hub_errors(raw: str | bytes) -> None:
    try:
        decode_client_frame(parse_json_frame(raw), max_message_bytes=64)
    except HubError:
        pass


@PROPERTY
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_decode_of_reencoded_json_raises_only_hub_errors(obj: dict[str, Any]) -> None:
    try:
        raw = orjson.dumps(obj)
    except TypeError:
        return
    try:
        decode_client_frame(parse_json_frame(raw), max_message_bytes=64)
    except HubError:
        pass


TEXTISH = st.text(max_size=12) | OFFSETISH | JSON_VALUES
FRAMES = st.fixed_dictionaries(
    {"op": st.sampled_from(protocol.OPS)},
    optional={
        "id": st.integers(min_value=-2, max_value=2**54) | JSON_SCALARS,
        "channel": TEXTISH,
        "since": TEXTISH,
        "event": TEXTISH,
        "data": JSON_VALUES,
        "token": TEXTISH,
    },
)


@hsettings(PROPERTY, max_examples=300)
@given(FRAMES)
def test_decode_of_well_shaped_frames_raises_only_hub_errors(obj: dict[str, Any]) -> None:
    try:
        frame = decode_client_frame(obj, max_message_bytes=64)
    except HubError as exc:
        assert exc.code in (errors.BAD_REQUEST, errors.MESSAGE_TOO_LARGE)
    else:
        assert type(frame).__name__.lower().startswith(obj["op"])


@PROPERTY
@given(OFFSETISH)
def test_subscribe_since_raises_only_hub_errors(since: str) -> None:
    try:
        frame = decode_client_frame(
            {"op": "subscribe", "channel": "user:1", "since": since}, max_message_bytes=64
        )
    except HubError as exc:
        assert exc.code == errors.BAD_REQUEST
    else:
        assert isinstance(frame, SubscribeFrame) and frame.since is not None
        assert since.partition(":")[0].isascii()
