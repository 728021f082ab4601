"""``herald subscribe``: print every message of some channels, one JSON object a line.

    herald subscribe user:42 public:news --token "$TOKEN" | jq .data
    HERALD_TOKEN=... herald subscribe public:news --sse --since 17:ab12cd34

Each line is ``{"channel","event","data","offset","ts"}``, flushed as it arrives, so
the output can be piped. Reconnects and resumes by itself; exits 1 with a message on
stderr when the hub refuses the token or a channel, 2 on bad usage. The console script
(``api.cli:main``) registers this command with :func:`add_commands`; ``python -m
clients.cli`` runs it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from typing import Any

from ._errors import AuthenticationError, ForbiddenError, HeraldError, ServerError
from ._models import Message, Offset, Recovery
from .client import HeraldClient

DEFAULT_PORT = "8000"


def default_url() -> str:
    """``HERALD_URL``, else ``http://HERALD_HOST:HERALD_PORT`` (as ``herald serve`` binds)."""
    url = os.environ.get("HERALD_URL")
    if url:
        return url
    host = os.environ.get("HERALD_HOST", "127.0.0.1")
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{os.environ.get('HERALD_PORT', DEFAULT_PORT)}"


def _since(channels: list[str], values: list[str]) -> dict[str, str] | None:
    """``--since OFFSET`` (one channel) or ``--since CHANNEL=OFFSET`` (repeatable)."""
    if not values:
        return None
    result: dict[str, str] = {}
    for value in values:
        channel, sep, offset = value.rpartition("=")
        if not sep:
            if len(channels) != 1:
                raise ValueError("with several channels, use --since CHANNEL=OFFSET")
            channel, offset = channels[0], value
        if channel not in channels:
            raise ValueError(f"--since names {channel!r}, which is not subscribed")
        Offset.parse(offset)
        result[channel] = offset
    return result


def _write_line(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _on_recovery(recovery: Recovery) -> None:
    sys.stderr.write(
        f"herald subscribe: messages on {recovery.channel} after {recovery.since} were lost "
        f"(history no longer holds them); continuing from {recovery.offset}\n"
    )
    sys.stderr.flush()


async def _subscribe(args: argparse.Namespace, token: str, since: dict[str, str] | None) -> int:
    received = 0
    async with HeraldClient(
        args.url or default_url(),
        token=token,
        transport="sse" if args.sse else "websocket",
        on_recovery=_on_recovery,
    ) as hub:
        subscription = hub.subscribe(*args.channels, since=since)
        message: Message
        async for message in subscription:
            _write_line(message.to_json())
            received += 1
            if args.count and received >= args.count:
                break
    return 0


def _describe(error: HeraldError) -> str:
    if isinstance(error, AuthenticationError):
        return f"authentication failed ({error.code}): {error.message}"
    if isinstance(error, ForbiddenError):
        return f"not allowed ({error.code}): {error.message}"
    if isinstance(error, ServerError):
        return f"refused ({error.code}): {error.message}"
    return str(error)


def subscribe(args: argparse.Namespace) -> int:
    """The ``subscribe`` command."""
    token = args.token or os.environ.get("HERALD_TOKEN")
    if not token:
        print("herald subscribe: no token; pass --token or set HERALD_TOKEN", file=sys.stderr)
        return 2
    try:
        since = _since(args.channels, args.since or [])
    except ValueError as exc:
        print(f"herald subscribe: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_subscribe(args, token, since))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, without a traceback at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except HeraldError as error:
        print(f"herald subscribe: {_describe(error)}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a malformed URL
        print(f"herald subscribe: {exc}", file=sys.stderr)
        return 2


def add_commands(sub: Any) -> None:
    """Register ``subscribe`` on an ``argparse`` sub-parser collection."""
    p = sub.add_parser(
        "subscribe",
        help="print the messages of channels as JSON lines",
        description="Subscribe to channels and print each message as one JSON line.",
    )
    p.add_argument("channels", nargs="+", metavar="CHANNEL")
    p.add_argument("--url", help="hub base URL (default HERALD_URL or http://127.0.0.1:8000)")
    p.add_argument("--token", help="access token or API key (default HERALD_TOKEN)")
    p.add_argument("--sse", action="store_true", help="use SSE instead of WebSocket")
    p.add_argument(
        "--since",
        action="append",
        metavar="OFFSET",
        help="resume after OFFSET (one channel) or CHANNEL=OFFSET (repeatable)",
    )
    p.add_argument("--count", type=int, default=0, help="exit after N messages")
    p.set_defaults(func=subscribe)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="herald", description="Herald client commands")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
