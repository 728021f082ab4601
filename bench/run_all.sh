#!/usr/bin/env bash
# Every figure of docs/performance.md (about 50 minutes on the 2-core machine).
# Each command prints its table and writes JSON to bench/results/;
# `python -m bench.report bench/results/*.json` turns them into Markdown tables.
# Needs: pip install py-spy wsproto (for --profile and compare-ws).
set -uo pipefail
cd "$(dirname "$0")/.."
run() {
    echo
    echo "### $(date +%T) nproc=$(nproc) load=$(cut -d' ' -f1-3 /proc/loadavg): python -m bench $*"
    python -m bench "$@"
}

run fanout --subs 1000,5000,10000 --tag ws-redis
run fanout --subs 5000 --transport ws,sse --workers 1,2 --tag ws-sse-1w-2w
run fanout --subs 5000 --gc default/off/freeze --tag gc-whatif
run fanout --subs 5000 --rates 3 --max-steps 1 --no-confirm --profile --tag profile
run fanout --subs 5000 --rates 3 --max-steps 1 --no-confirm --profile --gc off --tag profile-gcoff
run compare-ws --subs 5000 --max-steps 8
run idle --subs 5000,10000 --settle 4 --idle-seconds 6
run connect --subs 5000,10000
run users --subs 10000 --transport ws,sse --max-steps 6
run fanout --subs 5000 --broker memory --max-steps 8 --tag embedded
