"""``herald serve | token | publish``. The console script (``api.cli:main``) adds the
users API's commands; :func:`main` here serves the hub alone."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Any

import orjson

from .settings import Settings, SettingsError, load_settings

APP_FACTORY = "api.app:create_app"
# Not imported from hub.metrics: prometheus_client must not be imported before this
# variable is set, or this process would count in memory instead of in the directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
HUB_ONLY_FACTORY = "hub.app:create_app"
FAST_WS = "hub.transports.fastws:FastWebSocketProtocol"
FAST_HTTP = "hub.transports.fasthttp:FastHttpProtocol"


def _settings_or_exit(**overrides: Any) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        print(f"herald: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _prepare_metrics_dir(settings: Settings, port: int) -> None:
    """Every worker writes its samples to one fresh directory (multiprocess mode)."""
    if os.environ.get(MULTIPROC_ENV):
        return
    path = (settings.data_dir / f"metrics-{port}").resolve()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .logs import log_config

    settings = _settings_or_exit(
        host=args.host, port=args.port, workers=args.workers, log_level=args.log_level
    )
    settings.signing_key()  # create the development secret once, before workers race
    _prepare_metrics_dir(settings, settings.port)
    if settings.redis_url is None:
        print(
            "herald: embedded mode (in-memory broker, one worker); "
            "set HERALD_REDIS_URL to run several workers",
            file=sys.stderr,
        )
    config = uvicorn.Config(
        args.app,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        reload=args.reload,
        loop="uvloop",
        http=FAST_HTTP if args.http == "herald" else args.http,
        ws=FAST_WS if args.ws == "herald" else args.ws,
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.heartbeat_interval,
        ws_ping_timeout=settings.heartbeat_timeout,
        # permessage-deflate costs CPU per connection and invites decompression bombs.
        ws_per_message_deflate=False,
        log_config=log_config(settings.log_level, json_lines=settings.json_logs),
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
        proxy_headers=True,
        server_header=False,
    )
    server = uvicorn.Server(config)
    if config.should_reload:
        from uvicorn.supervisors import ChangeReload

        ChangeReload(config, target=server.run, sockets=[config.bind_socket()]).run()
    elif config.workers > 1:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[config.bind_socket()]).run()
    else:
        server.run()
    return 0 if (server.started or config.workers > 1 or config.should_reload) else 1


def token(args: argparse.Namespace) -> int:
    from .app import build_hub

    settings = _settings_or_exit()
    hub = build_hub(settings)
    try:
        value = hub.authenticator.tokens.issue(
            args.sub,
            role=args.role,
            channels=args.channels or (),
            ttl=args.ttl,
            token_type=args.type,
        )
    except ValueError as exc:
        print(f"herald token: {exc}", file=sys.stderr)
        return 2
    print(value)
    return 0


def publish(args: argparse.Namespace) -> int:
    """Publish through the HTTP publish API of a running hub (works in every mode)."""
    import httpx

    if args.data is not None:
        raw = args.data
    elif not sys.stdin.isatty():
        raw = sys.stdin.read()
    else:
        raw = "null"
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        print(f"herald publish: data is not valid JSON: {exc}", file=sys.stderr)
        return 2
    settings = _settings_or_exit()
    key = args.key or os.environ.get("HERALD_PUBLISH_KEY")
    if not key and settings.service_keys:
        key = settings.service_keys[0].get_secret_value()
    if not key:
        print(
            "herald publish: no key; pass --key, set HERALD_PUBLISH_KEY or HERALD_SERVICE_KEYS",
            file=sys.stderr,
        )
        return 2
    url = (args.url or f"http://{settings.host}:{settings.port}").rstrip("/")
    try:
        response = httpx.post(
            f"{url}/api/v1/publish",
            json={"channel": args.channel, "event": args.event, "data": data},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
    except httpx.HTTPError as exc:
        print(f"herald publish: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"herald publish: HTTP {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    print(response.text)
    return 0


def add_commands(sub: Any, *, app: str = APP_FACTORY) -> None:
    """Register the hub's commands on an ``argparse`` sub-parser collection."""
    p = sub.add_parser("serve", help="run the hub (HTTP, WebSocket, SSE)")
    p.add_argument("--host", help="bind address (HERALD_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (HERALD_PORT, default 8000)")
    p.add_argument("--workers", type=int, help="worker processes; >1 needs HERALD_REDIS_URL")
    p.add_argument("--reload", action="store_true", help="restart on code changes (development)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--ws",
        default="herald",
        choices=["herald", "websockets-sansio", "websockets", "wsproto"],
        help="WebSocket implementation: herald (websockets-sansio plus the pre-framed "
        "fan-out path, the default) or one of uvicorn's",
    )
    p.add_argument(
        "--http",
        default="herald",
        choices=["herald", "httptools", "h11"],
        help="HTTP implementation: herald (httptools plus the raw SSE write path, the "
        "default) or one of uvicorn's",
    )
    p.add_argument("--app", default=app, help=argparse.SUPPRESS)
    p.set_defaults(func=serve)

    p = sub.add_parser("token", help="print a signed JWT for the configured secret")
    p.add_argument("--sub", required=True, help="subject (user id)")
    p.add_argument("--role", default="user", choices=["user", "admin", "moderator", "guest"])
    p.add_argument("--channels", nargs="*", help="extra channel grants (exact or prefix:*)")
    p.add_argument("--ttl", type=int, help="lifetime in seconds (default HERALD_ACCESS_TOKEN_TTL)")
    p.add_argument("--type", default="access", choices=["access", "subscribe"])
    p.set_defaults(func=token)

    p = sub.add_parser("publish", help="publish a message through a running hub's HTTP API")
    p.add_argument("channel")
    p.add_argument("event")
    p.add_argument("data", nargs="?", help="JSON payload (default: read from stdin)")
    p.add_argument("--url", help="hub base URL (default http://HERALD_HOST:HERALD_PORT)")
    p.add_argument("--key", help="API key (default HERALD_PUBLISH_KEY or HERALD_SERVICE_KEYS)")
    p.set_defaults(func=publish)


def build_parser(app: str = HUB_ONLY_FACTORY) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herald", description="Herald real-time hub")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub, app=app)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
