#!/usr/bin/env bash
# Hub CPU per reply in cluster mode (one node on a private Redis, every
# socket of a conversation on it) against the memory backend, measured
# side by side: ROUNDS pairs of `fengda-load replies -c 1000 -q 20`, the
# memory run first in odd rounds and the Redis run first in even ones,
# each pair's ratio printed, then the median ratio. One run on a shared
# 2-core machine moves by ±15 %: judge the median, not a pair. Extra
# arguments go to every fengda-load run (`--embedded` for the single
# binary). docs/benchmarks.md records the figures.
#
#   cargo build --release -p fengda -p fengda-nlp -p fengda-load --bins
#   tests/loadgen/cluster-ratio.sh [ROUNDS] [fengda-load options…]
set -euo pipefail

cd "$(dirname "$0")/../.."
rounds=${1:-5}
shift || true
load=./target/release/fengda-load
[[ -x $load ]] || { echo "build first: cargo build --release -p fengda -p fengda-nlp -p fengda-load --bins" >&2; exit 1; }

# Prints "HUB_US REDIS_US REPLIES_PER_S" of one run, failing on any failed reply.
run() {
    "$load" "$@" --backend "$backend" replies -c 1000 -q 20 --json | tail -1 | python3 -c '
import json, sys
d = json.load(sys.stdin)
if d["failures"]["total"]:
    sys.exit("%d replies failed: %s" % (d["failures"]["total"], d["failures"]["samples"]))
c = d["cpu"]
print(c["hub_us_per_reply"], c["redis_us_per_reply"] or "-", round(d["replies_per_s"]))'
}

ratios=()
for round in $(seq "$rounds"); do
    order=(memory redis)
    ((round % 2 == 0)) && order=(redis memory)
    declare -A hub=()
    for backend in "${order[@]}"; do
        line=$(run "$@")
        read -r us redis rate <<<"$line"
        hub[$backend]=$us
        echo "round $round $backend: hub ${us} µs/reply, Redis ${redis} µs/reply, ${rate} replies/s"
    done
    ratio=$(python3 -c "print(f'{${hub[redis]} / ${hub[memory]}:.2f}')")
    ratios+=("$ratio")
    echo "round $round: cluster ÷ memory = ${ratio}×"
done
echo "median over $rounds rounds: $(printf '%s\n' "${ratios[@]}" | sort -n | python3 -c 'import sys, statistics; print(f"{statistics.median(float(l) for l in sys.stdin):.2f}")')× (rounds: ${ratios[*]})"
