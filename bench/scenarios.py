"""The scenarios: fanout, users, idle, connect, compare-ws. Each prints a table and
writes JSON to bench/results/. See docs/performance.md for how to read them."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .client import ClientPool, Spec
from .common import (
    RESULTS_DIR,
    SECRET,
    cpu_seconds,
    loadavg,
    machine_info,
    percentile_ms,
    raise_nofile,
    sum_cpu,
    table,
    timestamp,
)
from .publisher import Publisher
from .server import Server, gc_summary

FANOUT_CHANNEL = "public:bench"
# Steps of the fan-out rate, in deliveries per second (message rate = deliveries / S).
FANOUT_STEPS = [5_000, 10_000, 20_000, 30_000, 40_000, 60_000, 80_000, 100_000, 125_000, 150_000]
MIN_MESSAGES_PER_STEP = 12
USERS_STEPS = [1_000, 2_000, 4_000, 6_000, 8_000, 10_000, 13_000, 16_000, 20_000, 25_000]

STEP_COLUMNS = [
    ("subs", "subs"),
    ("rate", "msg/s"),
    ("deliveries_per_s", "deliv/s"),
    ("loss", "loss"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
    ("server_cpu_per_100k", "srv cpu-s/100k"),
    ("server_util", "srv util"),
    ("client_cpu_per_100k", "gen cpu-s/100k"),
    ("client_util", "gen util"),
    ("other_util", "other util"),
    ("gc_max_ms", "gc max ms"),
    ("gc_cpu_share", "gc cpu"),
    ("gc2", "gen2 GCs"),
    ("msgs_per_frame", "msg/frame"),
    ("verdict", "holds"),
]


# -- machine-wide CPU, to show what the other engineers' jobs took --------------------------


def _machine_busy() -> float:
    """Busy CPU-seconds of the whole machine (all cores) since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    values = [int(v) for v in fields[:8]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def _cpus(text: str | None) -> list[int] | None:
    if not text:
        return None
    cpus: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        else:
            cpus.append(int(part))
    return cpus


def tokens(ids: Sequence[str]) -> list[str]:
    """Access tokens signed with the bench servers' HERALD_SECRET_KEY."""
    from hub.auth import TokenService

    service = TokenService(
        SECRET, audience="herald", issuer="herald", access_ttl=86_400, subscribe_ttl=60,
        max_ttl=86_400,
    )  # fmt: skip
    return [service.issue(i, ttl=86_400) for i in ids]


class Bench:
    """One server + client pool + publisher, for a scenario run.

    Pinning: with one worker the server runs on core 0 and the generator (clients,
    publisher, this controller) on core 1; with more workers nothing is pinned unless
    ``--server-cpus`` / ``--client-cpus`` say so.
    """

    def __init__(
        self,
        args: Any,
        *,
        ws: str | None = None,
        http: str | None = None,
        workers: int = 1,
        gc: str = "default",
        repo: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.gc = gc
        self.workers = workers
        server_cpus = args.server_cpus
        if server_cpus is None:
            server_cpus = "0" if workers == 1 else "none"
        client_cpus = args.client_cpus
        if client_cpus is None:
            client_cpus = "1" if server_cpus == "0" else "none"
        self.server_cpus = _cpus(server_cpus) if server_cpus != "none" else None
        self.client_cpus = _cpus(client_cpus) if client_cpus != "none" else None
        self.server = Server(
            workers=workers,
            broker=args.broker,
            redis_url=args.redis_url,
            ws=ws or args.ws,
            http=http,
            cpus=server_cpus if server_cpus != "none" else None,
            env={"HERALD_BENCH_GC_MODE": gc, **(env or {})},
            repo=repo or getattr(args, "server_dir", None),
        )
        # The controller runs beside the generator, never on the server's core.
        os.sched_setaffinity(0, self.client_cpus or range(os.cpu_count() or 1))
        self.pool: ClientPool | None = None
        self.publisher: Publisher | None = None

    def __enter__(self) -> Bench:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.publisher is not None:
            self.publisher.close()
        if self.pool is not None:
            self.pool.close()
        self.server.stop()

    @property
    def n_server_cpus(self) -> int:
        return len(self.server_cpus) if self.server_cpus else (os.cpu_count() or 1)

    @property
    def n_client_cpus(self) -> int:
        return len(self.client_cpus) if self.client_cpus else (os.cpu_count() or 1)

    def open_pool(self, transport: str) -> ClientPool:
        self.pool = ClientPool(
            port=self.server.port,
            transport=transport,
            procs=self.args.client_procs,
            cpus=self.client_cpus,
        )
        return self.pool

    def open_publisher(self) -> Publisher:
        mode = self.args.publish
        if mode == "auto":
            mode = "redis" if self.args.broker == "redis" else "http"
        if mode == "redis" and self.args.broker != "redis":
            raise SystemExit("--publish redis needs --broker redis")
        target = self.args.redis_url if mode == "redis" else self.server.url
        self.publisher = Publisher(mode, target, self.server.prefix, self.client_cpus)
        return self.publisher

    def generator_cpu(self) -> float:
        pids = list(self.pool.pids if self.pool else [])
        if self.publisher is not None and self.publisher.pid:
            pids.append(self.publisher.pid)
        return sum_cpu(pids) + cpu_seconds()


def connect_all(
    bench: Bench, transport: str, specs: list[Spec], concurrency: int
) -> dict[str, Any]:
    pool = bench.pool or bench.open_pool(transport)
    cpu0 = bench.server.cpu()
    result = pool.connect(specs, concurrency=concurrency)
    result["server_cpu"] = bench.server.cpu() - cpu0
    if result["failed"]:
        print(f"  ! {result['failed']} connections failed: {result['errors']}", file=sys.stderr)
    return result


def measure_step(
    bench: Bench, *, rate: float, duration: float, channels: Any, expected_per_msg: int
) -> dict[str, Any]:
    """Publish at ``rate`` for ``duration`` s, wait for delivery to finish (or stall), and
    return the step's figures."""
    assert bench.pool is not None and bench.publisher is not None
    pool, server, publisher = bench.pool, bench.server, bench.publisher
    open_before = pool.stats()["open"]
    start_ns = time.time_ns()
    pool.reset(start_ns + int(duration * 5e8) + 50_000_000)
    gc_before = server.gc_snapshots()
    t0 = time.time()
    wall0 = time.monotonic()
    cpu0, gen0, busy0 = server.cpu(), bench.generator_cpu(), _machine_busy()
    publisher.start(rate, duration, channels)
    pub = publisher.wait(duration * 10 + 60)
    # Drain: until everything expected arrived, or nothing arrived for 3 s, or 20 s.
    expected = pub["published"] * expected_per_msg
    last, last_change = -1, time.monotonic()
    drain_deadline = time.monotonic() + 20.0
    while time.monotonic() < drain_deadline:
        received = pool.stats()["received"]
        if received >= expected:
            break
        if received != last:
            last, last_change = received, time.monotonic()
        elif time.monotonic() - last_change > 3.0:
            break
        time.sleep(0.05)
    wall = time.monotonic() - wall0
    cpu1, gen1, busy1 = server.cpu(), bench.generator_cpu(), _machine_busy()
    time.sleep(1.1)  # let the GC recorder write its snapshot
    gc = gc_summary(gc_before, server.gc_snapshots(), t0, time.time())
    stats = pool.stats(full=True)
    hist: dict[int, int] = dict(stats["hist_a"])
    for k, n in stats["hist_b"].items():
        hist[k] = hist.get(k, 0) + n
    received = stats["received"]
    server_cpu = cpu1 - cpu0
    gen_cpu = gen1 - gen0
    other = max(0.0, (busy1 - busy0) - server_cpu - gen_cpu)
    p50a, p50b = percentile_ms(stats["hist_a"], 0.5), percentile_ms(stats["hist_b"], 0.5)
    p99a, p99b = percentile_ms(stats["hist_a"], 0.99), percentile_ms(stats["hist_b"], 0.99)
    loss = expected - received
    closed = stats["closed"]
    growing = latency_growing(p50a, p50b, p99a, p99b, gc["max_pause_ms"])
    publisher_late = pub["elapsed"] > duration * 1.1 + 0.5
    server_util = server_cpu / wall / bench.n_server_cpus
    client_util = gen_cpu / wall / bench.n_client_cpus
    holds = loss <= 0 and not closed and not growing and not publisher_late
    reasons = []
    if loss > 0:
        reasons.append(f"loss {loss}")
    if closed:
        reasons.append(f"{closed} closed")
    if growing:
        reasons.append("latency growing")
    if publisher_late:
        reasons.append("publisher late")
    row = {
        "subs": open_before,
        "rate": round(rate, 2),
        "published": pub["published"],
        "publish_seconds": round(pub["elapsed"], 2),
        "expected": expected,
        "received": received,
        "loss": max(0, loss),
        "closed": closed,
        "deliveries_per_s": round(received / pub["elapsed"]),
        "p50_ms": percentile_ms(hist, 0.5),
        "p99_ms": percentile_ms(hist, 0.99),
        "max_ms": round(stats["max_ms"], 1),
        "p50_first_half_ms": p50a,
        "p50_second_half_ms": p50b,
        "p99_first_half_ms": p99a,
        "p99_second_half_ms": p99b,
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_per_100k": round(server_cpu / received * 1e5, 3) if received else None,
        "server_util": round(server_util, 2),
        "client_cpu_s": round(gen_cpu, 2),
        "client_util": round(client_util, 2),
        "client_cpu_per_100k": round(gen_cpu / received * 1e5, 3) if received else None,
        "publisher_cpu_s": round(pub["cpu"], 2),
        "other_util": round(other / wall / (os.cpu_count() or 1), 2),
        "wall_s": round(wall, 2),
        "frames": stats["frames"],
        "msgs_per_frame": round(received / stats["frames"], 2) if stats["frames"] else None,
        "gc": gc,
        "gc_max_ms": gc["max_pause_ms"],
        "gc_cpu_share": round(sum(gc["gc_cpu_ms"]) / 1000 / server_cpu, 2) if server_cpu else None,
        "gc2": gc["collections"][2],
        "loadavg": loadavg(),
        "holds": holds,
        "verdict": "yes" if holds else "NO: " + ", ".join(reasons),
    }
    if client_util > 0.85:
        row["warning"] = (
            f"load generator at {client_util:.0%} of its {bench.n_client_cpus} core(s): "
            "it, not the server, may be the bottleneck"
        )
    elif server_util < 0.8 and not holds:
        row["warning"] = (
            f"server only {server_util:.0%} busy while failing: the generator, Redis or "
            "other jobs on the machine may be the bottleneck"
        )
    return row


def latency_growing(
    p50a: float | None,
    p50b: float | None,
    p99a: float | None,
    p99b: float | None,
    gc_pause_ms: float,
) -> bool:
    """Whether latency grew from the first half of a step to the second by more than one
    GC pause explains: a server that keeps up has the same latency in both halves, one
    that falls behind builds a backlog, and a single stop-the-world collection of up to
    ``gc_pause_ms`` can land in either half."""
    if p50a is None or p50b is None:
        return False
    if p50b > 1.5 * p50a + 20 + gc_pause_ms:
        return True
    return bool(p99a is not None and p99b is not None and p99b > 2 * p99a + 50 + gc_pause_ms)


def _print_step(row: dict[str, Any], header: bool) -> None:
    text = table([row], STEP_COLUMNS).splitlines()
    if header:
        print(text[0])
        print(text[1])
    print(text[2], flush=True)
    if "warning" in row:
        print(f"  WARNING: {row['warning']}", flush=True)


def step_rates(steps: Sequence[float], per_msg: int) -> list[float]:
    return [d / per_msg for d in steps]


def run_steps(
    bench: Bench,
    rates: Sequence[float],
    *,
    channels: Any,
    expected_per_msg: int,
    duration: float,
    confirm: bool = True,
    max_steps: int = 20,
) -> list[dict[str, Any]]:
    """Step the rate up until a step does not hold (re-tried once: the machine is shared)."""
    rows: list[dict[str, Any]] = []
    base = duration
    for index, rate in enumerate(rates[:max_steps]):
        duration = max(base, MIN_MESSAGES_PER_STEP / rate)
        row = measure_step(
            bench, rate=rate, duration=duration, channels=channels,
            expected_per_msg=expected_per_msg,
        )  # fmt: skip
        _print_step(row, header=index == 0)
        rows.append(row)
        if not row["holds"] and confirm and row["closed"] == 0:
            time.sleep(2)
            row = measure_step(
                bench, rate=rate, duration=duration, channels=channels,
                expected_per_msg=expected_per_msg,
            )  # fmt: skip
            row["retry"] = True
            _print_step(row, header=False)
            rows.append(row)
        if not row["holds"]:
            break
        time.sleep(1.0)
    return rows


def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    held = [r for r in rows if r["holds"]]
    return max(held, key=lambda r: r["deliveries_per_s"]) if held else None


# -- scenarios ------------------------------------------------------------------------------


def scenario_fanout(args: Any, *, users: bool = False) -> dict[str, Any]:
    name = "users" if users else "fanout"
    results = [
        _fanout_run(args, name, transport, workers, subs, users, gc)
        for gc in args.gc
        for transport, workers, subs in _grid(args)
    ]
    summary = [
        {
            "transport": r["transport"],
            "workers": r["workers"],
            "gc_mode": r["gc_mode"],
            **(r["best"] or {"subs": r["subs"], "verdict": "no step held"}),
        }
        for r in results
    ]
    print(f"\n== {name}: highest sustained step per run")
    head = [("transport", "transport"), ("workers", "workers"), ("gc_mode", "gc")]
    print(table(summary, [*head, *STEP_COLUMNS]))
    return {"scenario": name, "runs": results, "summary": summary}


def _grid(args: Any) -> list[tuple[str, int, int]]:
    return [(t, w, s) for t in args.transports for w in args.workers for s in args.subs]


def _fanout_run(
    args: Any, name: str, transport: str, workers: int, subs: int, users: bool, gc: str
) -> dict[str, Any]:
    print(
        f"\n== {name} {transport} S={subs} workers={workers} broker={args.broker} ws={args.ws}"
        f" gc={gc}  (nproc {os.cpu_count()}, load {loadavg()})",
        flush=True,
    )
    with Bench(args, workers=workers, gc=gc) as bench:
        print(f"   server: {bench.server.command_line()}", flush=True)
        ids = [f"u{i}" for i in range(subs)]
        toks = tokens(ids)
        if users:
            specs = [Spec(t, f"user:{i}") for t, i in zip(toks, ids, strict=True)]
        else:
            specs = [Spec(t, FANOUT_CHANNEL) for t in toks]
        bench.open_pool(transport)
        conn = connect_all(bench, transport, specs, args.concurrency)
        print(
            f"   connected {conn['ok']}/{subs} in {conn['elapsed']:.1f}s "
            f"({conn['ok'] / conn['elapsed']:.0f}/s); server RSS "
            f"{bench.server.rss() / 2**20:.0f} MiB",
            flush=True,
        )
        if not conn["ok"]:
            raise SystemExit(f"no connection succeeded: {conn['errors']}")
        if gc == "freeze":
            (bench.server.gc_dir / "freeze-now").touch()
            time.sleep(4.0)
        publisher = bench.open_publisher()
        channels: Any = ("users", subs) if users else FANOUT_CHANNEL
        per_msg = 1 if users else conn["ok"]
        # Warm-up: code paths, Redis subscriptions, allocator.
        publisher.run(max(2.0, 2000 / per_msg), 2.0, channels)
        time.sleep(1.0)
        if args.rates:
            rates = list(args.rates)
        else:
            rates = step_rates(USERS_STEPS if users else FANOUT_STEPS, per_msg)
        rows = run_steps(
            bench, rates, channels=channels, expected_per_msg=per_msg,
            duration=args.duration, confirm=not args.no_confirm, max_steps=args.max_steps,
        )  # fmt: skip
        profile = None
        top = best(rows)
        if args.profile and rows:
            from .profile import profile_step

            rate = (top or rows[-1])["rate"]
            profile = profile_step(bench, rate, args.duration, channels, per_msg)
        return {
            "transport": transport,
            "workers": workers,
            "subs": subs,
            "gc_mode": gc,
            "ws": args.ws,
            "connect": conn,
            "server_command": bench.server.command_line(),
            "server_rss_mib": round(bench.server.rss() / 2**20, 1),
            "steps": rows,
            "best": top,
            "profile": profile,
        }


def scenario_idle(args: Any) -> dict[str, Any]:
    rows = []
    for transport, workers, subs in _grid(args):
        with Bench(args, workers=workers, gc=args.gc[0]) as bench:
            server = bench.server
            pool = bench.open_pool(transport)
            warm = 50
            ids = [f"w{i}" for i in range(warm)] + [f"u{i}" for i in range(subs)]
            toks = tokens(ids)
            specs = [Spec(t, FANOUT_CHANNEL) for t in toks]
            connect_all(bench, transport, specs[:warm], 50)
            time.sleep(2.0)
            rss0 = server.rss()
            conn = connect_all(bench, transport, specs[warm:], args.concurrency)
            time.sleep(args.settle)
            rss1 = server.rss()
            cpu0, t0 = server.cpu(), time.monotonic()
            time.sleep(args.idle_seconds)
            idle_cpu = (server.cpu() - cpu0) / (time.monotonic() - t0)
            rss2 = server.rss()
            row = {
                "transport": transport,
                "ws": args.ws if transport == "ws" else "-",
                "workers": bench.workers,
                "subs": conn["ok"],
                "rss_before_mib": round(rss0 / 2**20, 1),
                "rss_after_mib": round(rss2 / 2**20, 1),
                "kb_per_conn": round((rss1 - rss0) / max(1, conn["ok"]) / 1024, 2),
                "kb_per_conn_later": round((rss2 - rss0) / max(1, conn["ok"]) / 1024, 2),
                "idle_server_util": round(idle_cpu, 3),
                "client_rss_mib": round(pool.stats()["rss"] / 2**20, 1),
                "loadavg": loadavg(),
                "server_command": server.command_line(),
            }
            rows.append(row)
            print(table([row], IDLE_COLUMNS), flush=True)
    print("\n== idle: server RSS per idle connection (summed over server processes)")
    print(table(rows, IDLE_COLUMNS))
    return {"scenario": "idle", "rows": rows}


IDLE_COLUMNS = [
    ("transport", "transport"),
    ("ws", "ws impl"),
    ("workers", "workers"),
    ("subs", "conns"),
    ("rss_before_mib", "RSS before MiB"),
    ("rss_after_mib", "RSS after MiB"),
    ("kb_per_conn", "KB/conn"),
    ("kb_per_conn_later", "KB/conn later"),
    ("idle_server_util", "idle srv util"),
]


def scenario_connect(args: Any) -> dict[str, Any]:
    rows = []
    for transport, workers, subs in _grid(args):
        with Bench(args, workers=workers, gc=args.gc[0]) as bench:
            ids = [f"u{i}" for i in range(subs)]
            specs = [Spec(t, FANOUT_CHANNEL) for t in tokens(ids)]
            bench.open_pool(transport)
            gen0 = bench.generator_cpu()
            conn = connect_all(bench, transport, specs, args.concurrency)
            gen = bench.generator_cpu() - gen0
            row = {
                "transport": transport,
                "workers": bench.workers,
                "subs": subs,
                "ok": conn["ok"],
                "failed": conn["failed"],
                "seconds": round(conn["elapsed"], 2),
                "conns_per_s": round(conn["ok"] / conn["elapsed"]),
                "server_cpu_per_1k": round(conn["server_cpu"] / max(1, conn["ok"]) * 1000, 3),
                "server_util": round(conn["server_cpu"] / conn["elapsed"] / bench.n_server_cpus, 2),
                "client_util": round(gen / conn["elapsed"] / bench.n_client_cpus, 2),
                "errors": conn["errors"],
                "loadavg": loadavg(),
                "server_command": bench.server.command_line(),
            }
            rows.append(row)
            print(table([row], CONNECT_COLUMNS), flush=True)
            if row["client_util"] > 0.85:
                print("  WARNING: the load generator is near 100% of its cores")
    print("\n== connect: connection storm (handshake + auth + subscribe ack)")
    print(table(rows, CONNECT_COLUMNS))
    return {"scenario": "connect", "rows": rows}


CONNECT_COLUMNS = [
    ("transport", "transport"),
    ("workers", "workers"),
    ("subs", "conns"),
    ("failed", "failed"),
    ("seconds", "seconds"),
    ("conns_per_s", "conns/s"),
    ("server_cpu_per_1k", "srv cpu-s/1k"),
    ("server_util", "srv util"),
    ("client_util", "gen util"),
]


def scenario_compare_ws(args: Any) -> dict[str, Any]:
    """``fanout`` and ``idle`` over WebSocket for each uvicorn implementation."""
    fanouts, idles = [], []
    for impl in args.impls:
        args.ws = impl
        args.transports = ["ws"]
        args.profile = False
        fan = scenario_fanout(args)
        for run in fan["runs"]:
            fanouts.append(
                {"ws": impl, **(run["best"] or {"subs": run["subs"], "verdict": "none held"})}
            )
        idle = scenario_idle(args)
        idles.extend(idle["rows"])
    columns = [("ws", "ws impl"), *STEP_COLUMNS]
    print("\n== compare-ws: fanout, highest sustained step")
    print(table(fanouts, columns))
    print("\n== compare-ws: idle")
    print(table(idles, IDLE_COLUMNS))
    return {"scenario": "compare-ws", "fanout": fanouts, "idle": idles}


def write_result(result: dict[str, Any], args: Any) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tag = getattr(args, "tag", None)
    name = f"{result['scenario']}-{timestamp()}{'-' + tag if tag else ''}.json"
    path = RESULTS_DIR / name
    result["command"] = "python -m bench " + " ".join(sys.argv[1:])
    result["machine"] = machine_info()
    result["args"] = {k: v for k, v in vars(args).items() if k != "func"}
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nresults: {path}")
    return path


def prepare() -> None:
    raise_nofile()
