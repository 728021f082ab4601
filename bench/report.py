"""``python -m bench.report bench/results/*.json``: Markdown tables of saved results.

Steps are judged again with the current rule (:func:`bench.scenarios.latency_growing`),
so results taken before a rule change read the same way as new ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .scenarios import latency_growing

STEP_KEYS = [
    ("subs", "S"),
    ("rate", "msg/s"),
    ("deliveries_per_s", "deliveries/s"),
    ("loss", "loss"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
    ("server_cpu_per_100k", "server CPU-s/100k"),
    ("server_util", "server util"),
    ("client_cpu_per_100k", "gen CPU-s/100k"),
    ("client_util", "gen util"),
    ("other_util", "others' util"),
    ("gc_max_ms", "max GC pause ms"),
    ("gc_cpu_share", "GC share of server CPU"),
    ("gc2", "gen2 GCs"),
    ("msgs_per_frame", "msg/frame"),
]


def holds(step: dict[str, Any]) -> bool:
    growing = latency_growing(
        step["p50_first_half_ms"],
        step["p50_second_half_ms"],
        step["p99_first_half_ms"],
        step["p99_second_half_ms"],
        step["gc"]["max_pause_ms"],
    )
    return step["loss"] == 0 and not step["closed"] and not growing


def best(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    good = None
    for step in steps:
        if holds(step):
            if good is None or step["deliveries_per_s"] > good["deliveries_per_s"]:
                good = step
    return good


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def md_table(rows: list[dict[str, Any]], keys: list[tuple[str, str]]) -> str:
    out = ["| " + " | ".join(h for _, h in keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        out.append("| " + " | ".join(_cell(row.get(k)) for k, _ in keys) + " |")
    return "\n".join(out)


def report(path: Path) -> str:
    data = json.loads(path.read_text())
    lines = [f"### {path.name}", "", f"`{data['command']}` — load {data['machine']['loadavg']}"]
    scenario = data["scenario"]
    head = [("transport", "transport"), ("workers", "workers"), ("gc_mode", "gc")]
    if scenario in ("fanout", "users"):
        rows, all_steps = [], []
        for run in data["runs"]:
            top = best(run["steps"])
            meta = {k: run.get(k) for k in ("transport", "workers", "gc_mode")}
            rows.append({**meta, **(top or {"subs": run["subs"], "rate": "none held"})})
            for step in run["steps"]:
                all_steps.append({**meta, **step, "holds": "yes" if holds(step) else "no"})
        lines += ["", "Highest step that holds:", "", md_table(rows, head + STEP_KEYS)]
        lines += [
            "",
            "Every step:",
            "",
            md_table(all_steps, [*head, *STEP_KEYS, ("holds", "holds")]),
        ]
        for run in data["runs"]:
            if run.get("profile"):
                prof = run["profile"]
                lines += ["", f"py-spy ({prof['samples']} main-thread samples):", ""]
                lines += [f"- {p}% {name}" for name, p in prof["buckets"]]
    elif scenario == "compare-ws":
        keys = [("ws", "ws"), *STEP_KEYS]
        lines += ["", md_table(data["fanout"], keys)]
        lines += ["", md_table(data["idle"], IDLE_KEYS)]
    elif scenario == "ab":
        from .ab import AB_COLUMNS, IDLE_COLUMNS

        lines += ["", "Server commands:", ""]
        lines += [f"- {name}: `{cmd}`" for name, cmd in data["server_commands"].items()]
        lines += ["", "Idle memory and the connection storm:", ""]
        lines += [md_table(data["idle"], IDLE_COLUMNS)]
        if data["summary"]:
            lines += ["", "Per rate, median over rounds (ratios to the first variant):", ""]
            lines += [md_table(data["summary"], AB_COLUMNS)]
        if data.get("churn"):
            keys = [
                ("variant", "variant"),
                ("cycle", "cycle"),
                ("rss_closed_mib", "RSS closed MiB"),
                ("rss_mib", "RSS reconnected MiB"),
                ("gc2", "gen2 GCs"),
                ("gc_max_ms", "max GC pause ms"),
            ]
            lines += ["", "Churn:", "", md_table(data["churn"], keys)]
    elif scenario == "idle":
        lines += ["", md_table(data["rows"], IDLE_KEYS)]
    elif scenario == "connect":
        lines += ["", md_table(data["rows"], CONNECT_KEYS)]
    return "\n".join(lines)


IDLE_KEYS = [
    ("transport", "transport"),
    ("ws", "ws"),
    ("workers", "workers"),
    ("subs", "connections"),
    ("rss_before_mib", "RSS before MiB"),
    ("rss_after_mib", "RSS after MiB"),
    ("kb_per_conn", "KB/conn"),
    ("kb_per_conn_later", "KB/conn later"),
    ("idle_server_util", "idle server util"),
]
CONNECT_KEYS = [
    ("transport", "transport"),
    ("workers", "workers"),
    ("subs", "connections"),
    ("failed", "failed"),
    ("seconds", "seconds"),
    ("conns_per_s", "conns/s"),
    ("server_cpu_per_1k", "server CPU-s/1k"),
    ("server_util", "server util"),
    ("client_util", "gen util"),
]


def main(argv: list[str]) -> int:
    for name in argv:
        print(report(Path(name)))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
