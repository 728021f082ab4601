"""``python -m bench ab``: before/after comparisons in ONE run, interleaved.

The machine is shared and noisy, so two variants measured one after the other are not
comparable. Here every variant's server runs at the same time (all pinned to the
server core; an idle hub costs nothing), each with its own subscribers, publisher and
Redis prefix, and the steps alternate between them: for each round and rate, variant A
then B (then the next round B then A, so neither always goes first). The figures of one
rate are then taken from steps a few seconds apart, under the same load, and reported
as ratios to the first variant.

A variant is ``NAME[:key=value[:key=value...]]``:

* ``dir=PATH``: run the ``hub`` package of another checkout, e.g. a worktree of the
  commit before an optimisation (``git worktree add /tmp/herald-before <commit>``);
* ``ws=IMPL``: ``herald serve --ws`` for this variant;
* ``http=IMPL``: ``herald serve --http`` for this variant (``httptools`` is the portable
  SSE path; checkouts before the raw SSE path have no ``--http``);
* ``transport=ws|sse``: this variant's subscribers (default ``--transport``);
* ``gc=MODE``: the bench-only GC what-if of ``bench/gcwatch`` (default, off, freeze, a,b,c);
* ``HERALD_X=value``: a server setting (values may contain commas).

Per variant it reports idle KB per connection (RSS delta over the S connections), and
per rate: server CPU-s per 100k deliveries, p50/p99/max latency, the longest GC pause
and loss, as the median over rounds (CPU, p50, p99) or the worst (max, GC pause, loss).
``--churn N`` then closes and reopens every connection N times per variant (again
interleaved) and records server RSS after each cycle: a leak shows as a steady rise.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .client import Spec
from .common import loadavg, table
from .scenarios import FANOUT_CHANNEL, Bench, connect_all, measure_step, tokens
from .server import gc_summary


@dataclass
class Variant:
    name: str
    repo: str | None = None
    ws: str | None = None
    http: str | None = None
    transport: str | None = None
    gc: str = "default"
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> Variant:
        name, *parts = spec.split(":")
        if not name:
            raise ValueError(f"variant {spec!r}: empty name")
        variant = cls(name)
        for part in parts:
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"variant {spec!r}: {part!r} is not key=value")
            if key == "dir":
                if not (Path(value) / "hub" / "__init__.py").is_file():
                    raise ValueError(f"variant {spec!r}: no hub package in {value}")
                variant.repo = value
            elif key == "ws":
                variant.ws = value
            elif key == "http":
                variant.http = value
            elif key == "gc":
                variant.gc = value
            elif key == "transport":
                if value not in ("ws", "sse"):
                    raise ValueError(f"variant {spec!r}: transport is ws or sse")
                variant.transport = value
            elif key.startswith("HERALD_"):
                variant.env[key] = value
            else:
                raise ValueError(f"variant {spec!r}: unknown key {key!r}")
        return variant


AB_COLUMNS = [
    ("rate", "msg/s"),
    ("variant", "variant"),
    ("n", "steps"),
    ("deliveries_per_s", "deliv/s"),
    ("loss", "loss"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("p99_worst_ms", "p99 worst"),
    ("max_ms", "max ms"),
    ("server_cpu_per_100k", "srv cpu-s/100k"),
    ("cpu_spread", "cpu range"),
    ("cpu_ratio", "cpu ratio"),
    ("p99_ratio", "p99 ratio"),
    ("gc_max_ms", "gc max ms"),
    ("gc_cpu_share", "gc cpu"),
    ("gc2", "gen2 GCs"),
    ("msgs_per_frame", "msg/frame"),
    ("server_util", "srv util"),
    ("other_util", "other util"),
]

STEP_COLUMNS = [
    ("round", "round"),
    ("rate", "msg/s"),
    ("variant", "variant"),
    ("deliveries_per_s", "deliv/s"),
    ("loss", "loss"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
    ("server_cpu_per_100k", "srv cpu-s/100k"),
    ("server_util", "srv util"),
    ("client_util", "gen util"),
    ("other_util", "other util"),
    ("gc_max_ms", "gc max ms"),
    ("gc_cpu_share", "gc cpu"),
    ("gc2", "gen2 GCs"),
    ("msgs_per_frame", "msg/frame"),
    ("gen_sizes", "gen0/1/2 objs"),
]

IDLE_COLUMNS = [
    ("variant", "variant"),
    ("subs", "conns"),
    ("connect_s", "connect s"),
    ("connect_cpu_per_1k", "connect cpu-s/1k"),
    ("connect_gc_max_ms", "connect gc max ms"),
    ("connect_gc2", "gen2 GCs"),
    ("rss_before_mib", "RSS before MiB"),
    ("rss_after_mib", "RSS after MiB"),
    ("kb_per_conn", "KB/conn"),
    ("kb_ratio", "ratio"),
    ("frozen", "frozen objs"),
    ("idle_server_util", "idle srv util"),
]


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def summarise(rows: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    out = []
    for rate in sorted({r["rate"] for r in rows}):
        base: dict[str, Any] | None = None
        for name in names:
            steps = [r for r in rows if r["rate"] == rate and r["variant"] == name]
            if not steps:
                continue
            cpus = [s["server_cpu_per_100k"] for s in steps if s["server_cpu_per_100k"]]
            row: dict[str, Any] = {
                "rate": rate,
                "variant": name,
                "n": len(steps),
                "deliveries_per_s": round(statistics.median(s["deliveries_per_s"] for s in steps)),
                "loss": sum(s["loss"] for s in steps),
                "closed": sum(s["closed"] for s in steps),
                "p50_ms": _median([s["p50_ms"] for s in steps]),
                "p99_ms": _median([s["p99_ms"] for s in steps]),
                "p99_worst_ms": max((s["p99_ms"] or 0) for s in steps),
                "max_ms": max(s["max_ms"] for s in steps),
                "server_cpu_per_100k": _median(cpus),
                "cpu_spread": f"{min(cpus):.2f}-{max(cpus):.2f}" if cpus else "-",
                "gc_max_ms": max(s["gc_max_ms"] for s in steps),
                "gc_cpu_share": _median([s["gc_cpu_share"] for s in steps]),
                "gc2": sum(s["gc2"] for s in steps),
                "msgs_per_frame": _median([s["msgs_per_frame"] for s in steps]),
                "server_util": _median([s["server_util"] for s in steps]),
                "other_util": _median([s["other_util"] for s in steps]),
            }
            if base is None:
                base = row
            else:
                if base["server_cpu_per_100k"] and row["server_cpu_per_100k"]:
                    row["cpu_ratio"] = round(
                        row["server_cpu_per_100k"] / base["server_cpu_per_100k"], 2
                    )
                if base["p99_ms"] and row["p99_ms"]:
                    row["p99_ratio"] = round(row["p99_ms"] / base["p99_ms"], 2)
            out.append(row)
    return out


def _frozen(bench: Bench) -> int | None:
    snaps = bench.server.gc_snapshots()
    return sum(s.get("frozen", 0) for s in snaps) if snaps else None


def _specs(args: Any, index: int, subs: int) -> list[Spec]:
    # The same users on every variant's server: the publisher of ``--users`` picks
    # ``user:u<i>`` channels, and only user u<i> may subscribe to one.
    ids = [f"u{i}" for i in range(subs)]
    toks = tokens(ids)
    if args.users:
        return [Spec(t, f"user:{i}") for t, i in zip(toks, ids, strict=True)]
    return [Spec(t, FANOUT_CHANNEL) for t in toks]


def scenario_ab(args: Any) -> dict[str, Any]:
    variants = [Variant.parse(v) for v in args.variants]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SystemExit("variant names must differ")
    subs = args.subs[0]
    transport = args.transports[0]
    print(
        f"\n== ab {'users' if args.users else 'fanout'} {transport} S={subs} "
        f"variants={','.join(names)} rates={args.rates} rounds={args.rounds} "
        f"(nproc {os.cpu_count()}, load {loadavg()})",
        flush=True,
    )
    idle_rows: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    churn: list[dict[str, Any]] = []
    commands: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        benches: dict[str, Bench] = {}
        for v in variants:
            bench = Bench(args, ws=v.ws, http=v.http, gc=v.gc, repo=v.repo, env=v.env)
            stack.enter_context(bench)
            benches[v.name] = bench
            commands[v.name] = bench.server.command_line()
            print(f"   {v.name}: {commands[v.name]}", flush=True)
        # Connect one variant at a time, measuring idle memory per connection.
        for index, v in enumerate(variants):
            bench = benches[v.name]
            transport = v.transport or args.transports[0]
            bench.open_pool(transport)
            warm = [Spec(t, FANOUT_CHANNEL) for t in tokens([f"v{index}w{i}" for i in range(50)])]
            connect_all(bench, transport, warm, 50)
            time.sleep(2.0)
            rss0 = bench.server.rss()
            gc0, t0 = bench.server.gc_snapshots(), time.time()
            conn = connect_all(bench, transport, _specs(args, index, subs), args.concurrency)
            time.sleep(args.settle)
            rss1 = bench.server.rss()
            time.sleep(1.1)  # the GC recorder's next snapshot
            gc_connect = gc_summary(gc0, bench.server.gc_snapshots(), t0, time.time())
            cpu0, t0 = bench.server.cpu(), time.monotonic()
            time.sleep(args.idle_seconds)
            idle_util = (bench.server.cpu() - cpu0) / (time.monotonic() - t0)
            row = {
                "variant": v.name,
                "transport": transport,
                "subs": conn["ok"],
                "connect_s": round(conn["elapsed"], 1),
                "connect_cpu_per_1k": round(conn["server_cpu"] / max(1, conn["ok"]) * 1000, 3),
                "connect_gc_max_ms": gc_connect["max_pause_ms"],
                "connect_gc2": gc_connect["collections"][2],
                "connect_gc": gc_connect,
                "rss_before_mib": round(rss0 / 2**20, 1),
                "rss_after_mib": round(rss1 / 2**20, 1),
                "kb_per_conn": round((rss1 - rss0) / max(1, conn["ok"]) / 1024, 2),
                "frozen": _frozen(bench),
                "idle_server_util": round(idle_util, 4),
                "loadavg": loadavg(),
            }
            if idle_rows and idle_rows[0]["kb_per_conn"]:
                row["kb_ratio"] = round(row["kb_per_conn"] / idle_rows[0]["kb_per_conn"], 2)
            idle_rows.append(row)
            print(table([row], IDLE_COLUMNS), flush=True)
            if v.gc == "freeze":
                (bench.server.gc_dir / "freeze-now").touch()
        per_msg = {name: benches[name].pool.stats()["open"] for name in names}  # type: ignore[union-attr]
        channels: dict[str, Any] = {
            name: (("users", subs) if args.users else FANOUT_CHANNEL) for name in names
        }
        for name in names:  # warm-up: code paths, Redis subscriptions, allocator
            publisher = benches[name].open_publisher()
            publisher.run(max(2.0, 2000 / per_msg[name]), 2.0, channels[name])
        time.sleep(1.0)
        header = True
        for rnd in range(args.rounds):
            for rate in args.rates:
                order = names if rnd % 2 == 0 else names[::-1]
                for name in order:
                    bench = benches[name]
                    expected = 1 if args.users else per_msg[name]
                    duration = max(args.duration, 12 / rate)
                    row = measure_step(
                        bench, rate=rate, duration=duration, channels=channels[name],
                        expected_per_msg=expected,
                    )  # fmt: skip
                    row["variant"] = name
                    row["transport"] = bench.pool.transport  # type: ignore[union-attr]
                    row["round"] = rnd
                    sizes = [
                        sn["gen_sizes"] for sn in bench.server.gc_snapshots() if "gen_sizes" in sn
                    ]
                    if sizes:
                        row["gen_sizes"] = "/".join(str(sum(g)) for g in zip(*sizes, strict=True))
                    rows.append(row)
                    text = table([row], STEP_COLUMNS).splitlines()
                    if header:
                        print(text[0])
                        print(text[1])
                        header = False
                    print(text[2], flush=True)
                    time.sleep(1.0)
        profiles: dict[str, Any] = {}
        if args.profile:
            from .profile import profile_step

            for name in names:
                print(f"\n   py-spy on {name} at {args.profile} msg/s", flush=True)
                expected = 1 if args.users else per_msg[name]
                profiles[name] = profile_step(
                    benches[name], args.profile, args.duration, channels[name], expected
                )
        for cycle in range(args.churn):
            for index, v in enumerate(variants):
                bench = benches[v.name]
                gc0, t0 = bench.server.gc_snapshots(), time.time()
                if bench.pool is not None:
                    bench.pool.close()
                    bench.pool = None
                time.sleep(args.churn_pause)
                rss_closed = bench.server.rss()
                transport = v.transport or args.transports[0]
                bench.open_pool(transport)
                conn = connect_all(bench, transport, _specs(args, index, subs), args.concurrency)
                time.sleep(args.churn_pause)
                time.sleep(1.1)
                gc_cycle = gc_summary(gc0, bench.server.gc_snapshots(), t0, time.time())
                entry = {
                    "variant": v.name,
                    "cycle": cycle + 1,
                    "subs": conn["ok"],
                    "rss_closed_mib": round(rss_closed / 2**20, 1),
                    "rss_mib": round(bench.server.rss() / 2**20, 1),
                    "frozen": _frozen(bench),
                    "gc_max_ms": gc_cycle["max_pause_ms"],
                    "gc2": gc_cycle["collections"][2],
                    "gen2_pauses_ms": gc_cycle["gen2_pauses_ms"],
                    "loadavg": loadavg(),
                }
                churn.append(entry)
                print(
                    f"   churn {entry['cycle']} {v.name}: {conn['ok']} reconnected, RSS "
                    f"{entry['rss_closed_mib']} MiB after closing, {entry['rss_mib']} MiB "
                    f"after reconnecting; gen2 pauses {entry['gen2_pauses_ms']} ms",
                    flush=True,
                )
    summary = summarise(rows, names)
    print(f"\n== ab: idle memory per connection (load {loadavg()})")
    print(table(idle_rows, IDLE_COLUMNS))
    if summary:
        print("\n== ab: per rate, median over rounds (ratios to the first variant)")
        print(table(summary, AB_COLUMNS))
    if churn:
        print("\n== ab: churn (every connection closed and reopened), server RSS MiB")
        cols = [("variant", "variant"), ("cycle", "cycle"), ("rss_closed_mib", "closed"),
                ("rss_mib", "reconnected"), ("gc2", "gen2 GCs"),
                ("gc_max_ms", "gc max ms")]  # fmt: skip
        print(table(churn, cols))
    return {
        "scenario": "ab",
        "variants": [v.__dict__ for v in variants],
        "server_commands": commands,
        "subs": subs,
        "transport": transport,
        "users": args.users,
        "idle": idle_rows,
        "steps": rows,
        "summary": summary,
        "churn": churn,
        "profiles": profiles,
    }
