"""Logging: plain text in development, one JSON object per line in production.

Tokens never reach a log line: query-string credentials (``token=``, ``access_token=``)
and ``Bearer`` values are redacted by a filter on every handler, including uvicorn's
access log.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import orjson

_SECRET_QUERY = re.compile(r"((?:^|[?&;\s])(?:token|access_token|api_key|key)=)[^&\s\"']+", re.I)
_BEARER = re.compile(r"(bearer\s+)[A-Za-z0-9._~+/=\-]+", re.I)
_JWT = re.compile(r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+")


def redact(text: str) -> str:
    text = _SECRET_QUERY.sub(r"\1[redacted]", text)
    text = _BEARER.sub(r"\1[redacted]", text)
    return _JWT.sub("[redacted-jwt]", text)


class RedactSecretsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, Mapping):  # logger.info("%(path)s", {"path": ...})
            record.args = {
                key: redact(value) if isinstance(value, str) else value
                for key, value in record.args.items()
            }
        elif record.args:
            record.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in record.args)
        if isinstance(record.msg, str):
            redacted = redact(record.msg)
            if redacted != record.msg and record.args:
                # A placeholder looked like a secret ("token=%s"): redacting the template
                # would break its formatting and lose the line, so format, then redact.
                record.msg, record.args = redact(record.getMessage()), None
            else:
                record.msg = redacted
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            payload["exception"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(payload).decode()


def log_config(level: str, *, json_lines: bool) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the app and uvicorn alike."""
    formatter = (
        {"()": "hub.logs.JsonFormatter"}
        if json_lines
        else {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": "hub.logs.RedactSecretsFilter"}},
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["redact"],
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "herald": {"level": level.upper()},
            "uvicorn": {"level": level.upper()},
            "uvicorn.access": {"level": level.upper()},
        },
        "root": {"handlers": ["default"], "level": level.upper()},
    }
