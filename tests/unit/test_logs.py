"""hub.logs: secrets never reach a log line; JSON logs are one object per line."""

from __future__ import annotations

import io
import logging
import logging.config

import orjson
import pytest

from hub.logs import JsonFormatter, RedactSecretsFilter, log_config, redact

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI0MiJ9.c2lnbmF0dXJlLXZhbHVl"


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ('GET /sse?channel=user:1&token=abc.def-ghi HTTP/1.1" 200', "abc.def-ghi"),
        ("GET /sse?token=s3cr3t&channel=x", "s3cr3t"),
        ("GET /x?access_token=s3cr3t", "s3cr3t"),
        ("GET /x?api_key=s3cr3t;y=1", "s3cr3t"),
        ("GET /x?a=1&KEY=s3cr3t", "s3cr3t"),
        ("Authorization: Bearer svc-key-0123456789", "svc-key-0123456789"),
        ("authorization: bearer abc/def+ghi=", "abc/def+ghi="),
        (f"token {JWT} in text", JWT),
        (f"refresh_token={JWT}", JWT),
        (f'{{"token": "{JWT}"}}', JWT),
    ],
)
def test_redact_removes_tokens(line: str, secret: str) -> None:
    redacted = redact(line)
    assert secret not in redacted
    assert "redacted" in redacted


def test_redact_keeps_harmless_text() -> None:
    line = "GET /sse?channel=user:1&monkey=banana HTTP/1.1 200"
    assert redact(line) == line
    assert redact("subscribed to public:news") == "subscribed to public:news"


def test_redact_keeps_the_rest_of_the_query_string() -> None:
    assert redact("/sse?token=abc&channel=user:1") == "/sse?token=[redacted]&channel=user:1"


def record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("herald.test", logging.INFO, __file__, 1, msg, args, None)


def test_filter_redacts_message_and_args() -> None:
    rec = record("request %s from %s (%d)", f"/sse?token={JWT}", "Bearer abcdef", 3)
    assert RedactSecretsFilter().filter(rec) is True
    message = rec.getMessage()
    assert JWT not in message and "abcdef" not in message
    assert message.endswith("(3)")


def test_filter_keeps_mapping_args_usable() -> None:
    rec = record("%(path)s by %(who)s", {"path": f"/x?token={JWT}", "who": "ada"})
    RedactSecretsFilter().filter(rec)
    message = rec.getMessage()
    assert JWT not in message and message.endswith("by ada")


def test_json_formatter_emits_one_object_per_line() -> None:
    formatter = JsonFormatter()
    rec = record("multi\nline %s", f"Bearer {JWT}")
    line = formatter.format(rec)
    assert "\n" not in line
    payload = orjson.loads(line)
    assert payload["level"] == "info" and payload["logger"] == "herald.test"
    assert payload["message"].startswith("multi\nline ")
    assert JWT not in payload["message"]
    assert payload["ts"].endswith("Z")


def test_json_formatter_includes_redacted_exceptions() -> None:
    try:
        raise ValueError(f"bad token {JWT}")
    except ValueError:
        import sys

        rec = logging.LogRecord("herald", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    payload = orjson.loads(JsonFormatter().format(rec))
    assert "ValueError" in payload["exception"]
    assert JWT not in payload["exception"]


def test_log_config_wires_the_filter_and_json() -> None:
    stream = io.StringIO()
    config = log_config("info", json_lines=True)
    config["handlers"]["default"]["stream"] = stream
    config["loggers"] = {"herald.unit": {"level": "INFO"}}
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        logging.config.dictConfig(config)
        logger = logging.getLogger("herald.unit")
        logger.info("connect %s", f"/sse?token={JWT}")
        logger.info("second")
    finally:
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers = saved_handlers
        root.setLevel(saved_level)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert orjson.loads(lines[0])["message"] == "connect /sse?token=[redacted]"
    assert orjson.loads(lines[1])["message"] == "second"


def test_log_config_plain_text_in_development() -> None:
    config = log_config("debug", json_lines=False)
    assert "format" in config["formatters"]["default"]
    assert config["handlers"]["default"]["filters"] == ["redact"]
    assert config["loggers"]["uvicorn.access"]["level"] == "DEBUG"


@pytest.mark.parametrize(
    ("template", "args"),
    [("auth with token=%s", ("abcdef",)), ("key=%(k)s done", ({"k": "abcdef"},))],
)
def test_filter_keeps_lines_whose_placeholder_looks_like_a_secret(
    template: str, args: tuple[object, ...]
) -> None:
    rec = record(template, *args)
    RedactSecretsFilter().filter(rec)
    message = rec.getMessage()  # must not raise "not all arguments converted"
    assert "abcdef" not in message and "[redacted]" in message
