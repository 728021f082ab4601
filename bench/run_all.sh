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

# Phase 2: before/after in one run (python -m bench ab). Needs the worktrees:
#   git worktree add --detach /tmp/herald-before c96772e
#   git worktree add --detach /tmp/herald-after 2243a3c
#   git worktree add --detach /tmp/herald-now HEAD
if [ -d /tmp/herald-before ] && [ -d /tmp/herald-after ] && [ -d /tmp/herald-now ]; then
    B=/tmp/herald-before A=/tmp/herald-after N=/tmp/herald-now
    run ab --subs 5000 --rates 1,2,3,20 --rounds 2 --tag writepath \
        --variant before:dir=$B:ws=websockets-sansio \
        --variant after-asgi:dir=$A:ws=websockets-sansio --variant after:dir=$A
    run ab --subs 5000 --rates 1,3,20 --rounds 2 --churn 3 --settle 4 --idle-seconds 3 --tag gc \
        --variant default:dir=$N:HERALD_GC=default --variant tuned:dir=$N \
        --variant tuned-nothaw:dir=$N:HERALD_GC_THAW_AFTER=1000000000
    run ab --subs 5000 --rates 1,3,20 --rounds 3 --idle-seconds 2 --tag counter \
        --variant per-write-inc:dir=$A:gc=off --variant buffered:dir=$N:HERALD_GC=default:gc=off
    run ab --subs 5000 --rates 1,2,3,20 --rounds 2 --idle-seconds 3 --tag total \
        --variant before:dir=$B:ws=websockets-sansio --variant now:dir=$N \
        --variant before-sse:dir=$B:ws=websockets-sansio:transport=sse \
        --variant now-sse:dir=$N:transport=sse
    run ab --users --subs 10000 --rates 1000,2000,3000 --rounds 2 --idle-seconds 2 --tag users \
        --variant default:dir=$N:HERALD_GC=default --variant tuned:dir=$N
    run fanout --subs 5000,10000 --server-dir $N --tag ladder-now
    python -m bench.micro counter
else
    echo "phase 2 skipped: create the worktrees listed in bench/run_all.sh first"
fi
