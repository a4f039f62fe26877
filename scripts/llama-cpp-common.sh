# Sourced by llama-cpp-wheel.sh and llama-cpp-tools.sh: what a llama.cpp build for this machine depends on.
# VERSION: the llama-cpp-python pin; AMX_FLAGS: compile out ggml's AMX matmul path, which segfaults on some
# CPUs (ggml-org/llama.cpp#20824), keeping every other native SIMD path; build_key: a hash of the arguments
# plus this CPU's feature flags and the compiler, so a cached build is only ever reused where it was made.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VERSION=$(sed -n 's/^llama[-_]cpp[-_]python==//Ip' "$ROOT/constraints.txt")
[ -n "$VERSION" ] || { echo "$(basename "$0"): no llama-cpp-python pin in constraints.txt" >&2; exit 2; }
AMX_FLAGS="-U__AMX_INT8__"
CACHE_ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/dropquant

build_key() {
  local cpu cc
  cpu=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | tr ' ' '\n' | sort | tr '\n' ' ' || uname -m)
  cc=$( (cc --version 2>/dev/null || echo none) | head -1)
  printf '%s\n' "$VERSION" "$AMX_FLAGS" "$cpu" "$cc" "$@" | sha256sum | cut -c1-16
}
