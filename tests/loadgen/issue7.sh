#!/usr/bin/env bash
# Runs every benchmark of issue #7 with fengda-load, one after another, and
# keeps each run's text report and JSON line in a results directory.
# docs/benchmarks.md says what each run measures and records the figures.
# About 40 minutes on a 2-core machine, most of it the two 10-minute soaks;
# `QUICK=1` runs every scenario for a few seconds instead (a smoke test of the
# script, not figures). `ONLY="idle storm"` runs just the named runs.
#
#   cargo build --release -p fengda -p fengda-nlp -p fengda-load --bins
#   tests/loadgen/issue7.sh [RESULTS_DIR]
set -euo pipefail

cd "$(dirname "$0")/../.."
load=./target/release/fengda-load
out=${1:-target/issue7-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
pace=(--pace-first-token-ms 300 --pace-tokens-per-s 30)
fast_pace=(--pace-first-token-ms 200 --pace-tokens-per-s 30)
cluster=(--nodes 3 --backend redis)
# Every one of 1,000 customers gets an NLP slot (the default is 512 per node).
slots=(--hub-arg=--nlp-max-concurrent=1024)
# Each replies comparison runs the bare/hub pair five times, alternating, and
# reports medians: one run on this shared VM moves by ±20 % against the next
# run of the same server.
if [[ ${QUICK:-0} == 1 ]]; then
    rounds=(--rounds 2) questions=20
    secs=3 peak_secs=3 base_secs=2 soak_secs=10 sample_secs=2 idle=2000 customers=100 extra=900 storm=1000
    open_rate=50
else
    rounds=(--rounds 5) questions=60
    secs=30 peak_secs=60 base_secs=20 soak_secs=600 sample_secs=30 idle=19000 customers=1000 extra=9000 storm=10000
    open_rate=500
fi

status=0
run() {
    local name=$1
    shift
    if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then
        return
    fi
    echo "== $name: fengda-load $*" | tee "$out/$name.txt"
    # A failed run (errors, timeouts) is recorded and the next one starts.
    if ! "$load" "$@" 2>&1 | tee -a "$out/$name.txt"; then
        echo "== $name FAILED" | tee -a "$out/$name.txt"
        status=1
    fi
    tail -n 1 "$out/$name.txt" >"$out/$name.json"
}

# Idle sockets up to the file limit, KiB per socket, sockets/s (hub ÷ bare).
run idle --compare idle -n "$idle"
# replies/s and deltas/s at 1,000 customers (hub ÷ bare), hub and bridge: with one load-generator
# thread (the bare run is limited by the load generator), with two (limited by
# the box: hub, bridge and load generator share the two cores), then three
# nodes with Redis.
run replies-1000 "${slots[@]}" "${rounds[@]}" --compare replies -c "$customers" -q "$questions"
run replies-1000-box "${slots[@]}" --threads 2 "${rounds[@]}" --compare replies -c "$customers" -q "$questions"
# The same with the single-binary hub: its built-in answerer in-process, no bridge.
run replies-1000-embedded "${slots[@]}" --embedded "${rounds[@]}" --compare replies -c "$customers" -q "$questions"
run replies-1000-embedded-box "${slots[@]}" --embedded --threads 2 "${rounds[@]}" --compare replies -c "$customers" -q "$questions"
run replies-1000-cluster "${slots[@]}" "${cluster[@]}" replies -c "$customers" -q 20
# Hub share of the time to first token, zero-delay answerer: closed loop
# (every customer asks again at once: the box saturates), then an open loop
# of 500 questions/s (a pool of 500 sockets) with 1,000 and 10,000 customers connected.
run ttft-share-1000 "${slots[@]}" --timing replies -c "$customers" -q 20
run ttft-share-10000 "${slots[@]}" --timing --idle-extra "$extra" replies -c "$customers" -q 20
run ttft-open-1000 --timing --idle-extra $((customers - open_rate)) rate -r "$open_rate" -s "$secs"
run ttft-open-10000 --timing --idle-extra $((customers * 10 - open_rate)) rate -r "$open_rate" -s "$secs"
# End-to-end at a realistic pace under steady load: a model that takes 300 ms
# to its first token, and one that takes 200 ms (target: first token p95 < 300 ms).
run pace-steady --timing "${pace[@]}" rate -r 200 -s "$secs"
run pace-steady-cluster --timing "${cluster[@]}" "${pace[@]}" rate -r 200 -s "$secs"
run pace200-steady --timing "${fast_pace[@]}" rate -r 200 -s "$secs"
run pace200-steady-cluster --timing "${cluster[@]}" "${fast_pace[@]}" rate -r 200 -s "$secs"
# 15× peaks with a steady second tenant, three nodes with Redis: zero pace,
# then a realistic pace with 128 NLP slots per node so that the admission
# queue (queued frames, fallbacks after the longest wait) is exercised.
run peak-cluster --timing "${cluster[@]}" peak -r 100 --factor 15 \
    --base-secs "$base_secs" --peak-secs "$peak_secs" --steady-rate 20
run peak-cluster-paced --timing "${cluster[@]}" "${pace[@]}" --hub-arg=--nlp-max-concurrent=128 \
    peak -r 40 --factor 15 --base-secs "$base_secs" --peak-secs "$peak_secs" --steady-rate 10 --connections 4000
# Reconnect storm.
run storm --compare storm -n "$storm"
# 10-minute soaks: RSS, live tasks and open sessions must stay flat. Each
# conversation keeps its last 100 events (`--log-cap`), so the history stops
# growing after the first minute and what is left to see is leaks.
run soak --hub-arg=--log-cap=100 soak -r 200 -s "$soak_secs" --sample-secs "$sample_secs"
run soak-cluster --hub-arg=--log-cap=100 "${cluster[@]}" soak -r 200 -s "$soak_secs" --sample-secs "$sample_secs"

echo "results in $out"
exit "$status"
