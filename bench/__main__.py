"""``python -m bench <scenario>``: see docs/performance.md."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .scenarios import (
    prepare,
    scenario_connect,
    scenario_fanout,
    scenario_idle,
    write_result,
)


def _ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _common(p: argparse.ArgumentParser, *, subs: str) -> None:
    p.add_argument("--subs", type=_ints, default=_ints(subs), help="subscriber counts (S)")
    p.add_argument(
        "--workers", type=_ints, default=[1], help="server worker processes (list: one run each)"
    )
    p.add_argument("--broker", choices=["redis", "memory"], default="redis")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument(
        "--ws",
        default="herald",
        choices=["herald", "websockets-sansio", "websockets", "wsproto"],
        help="herald serve --ws: herald (the pre-framed fan-out path) or one of uvicorn's "
        "(websockets-sansio was the default before commit 46d8b20)",
    )
    p.add_argument(
        "--server-cpus",
        default=None,
        help="taskset list for the server (default 0 with one worker, none with more)",
    )
    p.add_argument(
        "--client-cpus",
        default=None,
        help="cores of the generator (default 1 with the server on 0, else none)",
    )
    p.add_argument("--client-procs", type=int, default=2, help="client processes")
    p.add_argument("--concurrency", type=int, default=200, help="connects in flight per process")
    p.add_argument("--tag", help="suffix of the results file name")
    p.add_argument(
        "--server-dir",
        help="run the hub package of this checkout (e.g. a git worktree of another commit)",
    )
    p.add_argument(
        "--gc",
        type=lambda s: s.split("/"),
        default=["default"],
        help="server GC what-if (bench only), one run each, '/'-separated: default, off, "
        "freeze (gc.freeze() once connected), or thresholds a,b,c",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="scenario", required=True)

    for name, subs, helptext in (
        ("fanout", "1000,5000,10000", "S subscribers on one channel, rate stepped up"),
        ("users", "10000", "S subscribers on user:{id}, publishes to random users"),
    ):
        p = sub.add_parser(name, help=helptext)
        _common(p, subs=subs)
        p.add_argument(
            "--transport",
            dest="transports",
            type=lambda s: s.split(","),
            default=["ws"],
            help="ws, sse or ws,sse (one run each)",
        )
        p.add_argument("--duration", type=float, default=8.0, help="seconds per step")
        p.add_argument("--rates", type=_floats, help="explicit message rates (msg/s)")
        p.add_argument("--max-steps", type=int, default=12)
        p.add_argument("--no-confirm", action="store_true", help="do not retry a failed step")
        p.add_argument(
            "--publish",
            choices=["auto", "redis", "http"],
            default="auto",
            help="redis: RedisBroker.publish_batch; http: POST /api/v1/publish/batch",
        )
        p.add_argument("--profile", action="store_true", help="py-spy the best step")
        p.set_defaults(func=scenario_fanout if name == "fanout" else _users)

    p = sub.add_parser("idle", help="server RSS per idle connection")
    _common(p, subs="5000")
    p.add_argument("--transports", type=lambda s: s.split(","), default=["ws", "sse"])
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.set_defaults(func=scenario_idle)

    p = sub.add_parser("connect", help="connection storm: connections accepted per second")
    _common(p, subs="5000")
    p.add_argument("--transports", type=lambda s: s.split(","), default=["ws", "sse"])
    p.set_defaults(func=scenario_connect)

    p = sub.add_parser("compare-ws", help="uvicorn WebSocket implementations: fanout + idle")
    _common(p, subs="5000")
    p.add_argument(
        "--impls",
        type=lambda s: s.split(","),
        default=["herald", "websockets-sansio", "websockets", "wsproto"],
    )
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--rates", type=_floats, help="explicit message rates (msg/s)")
    p.add_argument("--max-steps", type=int, default=12)
    p.add_argument("--no-confirm", action="store_true")
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.set_defaults(func=_compare_ws)
    p = sub.add_parser("ab", help="before/after: variants' servers side by side, interleaved")
    _common(p, subs="5000")
    p.add_argument(
        "--variant",
        dest="variants",
        action="append",
        required=True,
        help="NAME[:dir=PATH][:ws=IMPL][:http=IMPL][:transport=ws|sse][:gc=MODE]"
        "[:HERALD_X=value]; the first is the baseline",
    )
    p.add_argument("--transport", dest="transports", type=lambda s: [s], default=["ws"])
    p.add_argument("--users", action="store_true", help="one user:{id} channel per subscriber")
    p.add_argument("--rates", type=_floats, default=[1.0, 2.0, 3.0, 20.0], help="msg/s")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per step")
    p.add_argument("--settle", type=float, default=4.0, help="seconds before measuring RSS")
    p.add_argument("--idle-seconds", type=float, default=5.0, help="idle CPU sample")
    p.add_argument("--churn", type=int, default=0, help="close/reopen cycles per variant")
    p.add_argument("--profile", type=float, help="then py-spy one step per variant at this rate")
    p.add_argument("--churn-pause", type=float, default=5.0)
    p.set_defaults(func=_ab)
    return parser


def _ab(args: argparse.Namespace) -> dict[str, Any]:
    from .ab import scenario_ab

    return scenario_ab(args)


def _users(args: argparse.Namespace) -> dict[str, Any]:
    return scenario_fanout(args, users=True)


def _compare_ws(args: argparse.Namespace) -> dict[str, Any]:
    from .scenarios import scenario_compare_ws

    return scenario_compare_ws(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for attr, default in (("profile", False), ("publish", "auto"), ("transports", ["ws"])):
        if not hasattr(args, attr):
            setattr(args, attr, default)
    prepare()
    result = args.func(args)
    write_result(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
