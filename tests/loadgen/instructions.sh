#!/usr/bin/env bash
# Instructions per reply of the single-binary hub (built-in answerer
# in-process), of the same in cluster mode on a private Redis (`hub-redis`:
# only the hub is counted, not Redis), of a hub calling a bridge over gRPC (`hub-bridge`: the
# bridge runs outside valgrind, unpaced; only the hub is counted) or of the
# bare server, counted by callgrind: the repeatable A/B
# measure on a shared machine, where CPU time per reply moves by ±20 % between
# runs. The server runs under valgrind while fengda-load asks 10 customers ×
# FEW and then × MANY questions; the difference ÷ (10 × (MANY − FEW)) is the
# marginal cost of one reply, start-up and connection set-up excluded.
#
#   cargo build --release -p fengda -p fengda-nlp -p fengda-load --bins
#   tests/loadgen/instructions.sh [hub|hub-redis|hub-bridge|bare] [OUT_DIR]
#
# Keeps the callgrind profile of the MANY run in OUT_DIR (default
# target/instructions/) for `callgrind_annotate --inclusive=yes`.
set -euo pipefail

cd "$(dirname "$0")/../.."
target=${1:-hub}
out=${2:-target/instructions}
few=20 many=120
mkdir -p "$out"
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install -y valgrind" >&2; exit 1; }

# Customers ask back to back: lift the per-socket frame rate (and the
# per-address limits), as fengda-load does for the hubs it starts.
limits=(--max-connections-per-ip 0 --connection-rate-per-ip 0 --max-frames-per-second 1000000 --frame-burst 1000000)
case $target in
hub) server=(./target/release/fengda serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --answerer-first-token-delay-ms 0 --answerer-tokens-per-second 0 "${limits[@]}") ;;
hub-bridge)
    ./target/release/fengda-nlp --listen 127.0.0.1:0 --first-token-delay-ms 0 --tokens-per-second 0 >"$out/bridge.log" 2>&1 &
    bridge=$!
    trap 'kill "$bridge" 2>/dev/null || true' EXIT
    bridge_url=""
    for _ in $(seq 100); do
        bridge_url=$(grep -o 'http://127.0.0.1:[0-9]*' "$out/bridge.log" | head -1 || true)
        [[ -n $bridge_url ]] && break
        sleep 0.1
    done
    [[ -n $bridge_url ]] || { echo "the bridge did not start; see $out/bridge.log" >&2; exit 1; }
    server=(./target/release/fengda serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --nlp-url "$bridge_url" "${limits[@]}")
    ;;
hub-redis)
    # The single binary in cluster mode, on a private Redis (emptied before
    # each count, so both start alike). Its deadline is lifted: the hub runs
    # ~50 times slower under valgrind.
    command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install -y redis-server" >&2; exit 1; }
    redis_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$out/redis.log" 2>&1 &
    redis=$!
    trap 'kill "$redis" 2>/dev/null || true' EXIT
    for _ in $(seq 100); do
        redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
    printf '[redis]\ncommand_timeout_ms = 60000\n' >"$out/hub-redis.toml"
    server=(./target/release/fengda serve --config "$out/hub-redis.toml" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0
        --backend redis --redis-url "redis://127.0.0.1:$redis_port"
        --answerer-first-token-delay-ms 0 --answerer-tokens-per-second 0 "${limits[@]}")
    ;;
bare) server=(./target/release/fengda-bare --listen 127.0.0.1:0) ;;
*) echo "usage: $0 [hub|hub-redis|hub-bridge|bare] [OUT_DIR]" >&2; exit 2 ;;
esac

# Runs the server under callgrind for `$1` questions per customer; prints its instruction count.
count() {
    local questions=$1 log="$out/$target-$1.log" pid port=""
    [[ -n ${redis_port:-} ]] && redis-cli -p "$redis_port" flushall >/dev/null
    # Counting starts once the server listens: start-up (the metrics
    # clock's calibration spins a varying number of times) stays out.
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out/$target-$questions.callgrind" "${server[@]}" >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 600); do
        port=$(grep -o '^listening on http://127.0.0.1:[0-9]*' "$log" | grep -o '[0-9]*$' || true)
        [[ -n $port ]] && break
        sleep 0.1
    done
    [[ -n $port ]] || { echo "the server did not start under valgrind; see $log" >&2; kill "$pid"; exit 1; }
    callgrind_control --instr=on "$pid" >/dev/null
    ./target/release/fengda-load --json --timeout-secs 120 --hub-url "http://127.0.0.1:$port" --addrs 1 \
        replies -c 10 -q "$questions" >"$out/$target-$questions.json"
    kill -TERM "$pid"
    wait "$pid" || true
    grep '^summary' "$out/$target-$questions.callgrind" | awk '{print $2}'
}

low=$(count "$few")
high=$(count "$many")
echo "$target: $(( (high - low) / (10 * (many - few)) )) instructions per reply ($low for 10×$few, $high for 10×$many)"
