#!/usr/bin/env bash
# Print the directory holding llama.cpp's own llama-perplexity, llama-bench and llama-batched-bench, built for this machine from
# the vendored llama.cpp of the pinned llama-cpp-python sdist (the same llama.cpp the Python package runs),
# building them first if needed (about 3-4 minutes on 2 cores). Used by `make bench` (benchmarks/bench_llamacpp.py,
# benchmarks/bench_generate.py) to print our fidelity, speed and batched-generation figures beside llama.cpp's.
#
# Cached like scripts/llama-cpp-wheel.sh: the directory is keyed by the version, the CMake flags, this CPU's
# feature flags and the compiler; a build is renamed into place whole, so a killed build never looks finished.
# Same AMX rule as the wheel: -U__AMX_INT8__ removes ggml's AMX matmul path (ggml-org/llama.cpp#20824). Same backend
# as the wheel too (DROPQUANT_GPU, choose_backend): the tools measure what the Python package runs.
# Exit status 3 (and a message) when there is no C/C++ compiler or cmake: callers skip the comparison.
#
# usage: scripts/llama-cpp-tools.sh PYTHON [--print-dir]
set -euo pipefail
PY=${1:?usage: llama-cpp-tools.sh PYTHON [--print-dir]}
source "$(dirname "$0")/llama-cpp-common.sh"
TARGETS="llama-perplexity llama-bench llama-batched-bench"
CMAKE_FLAGS="-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TOOLS=ON \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
-DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF ${DROPQUANT_LLAMA_CMAKE_ARGS:-}"
choose_backend
KEY=("$TARGETS" "$CMAKE_FLAGS")
if [ "$BACKEND" != cpu ]; then
  CMAKE_FLAGS="$CMAKE_FLAGS $BACKEND_FLAGS"
  KEY=("$TARGETS" "$CMAKE_FLAGS" "$BACKEND_KEY")
  export CUDACXX="$NVCC"
fi
CACHE=${DROPQUANT_TOOLS_CACHE:-$CACHE_ROOT/llama-cpp-tools}
DIR="$CACHE/$VERSION-$(build_key "${KEY[@]}")"
if [ "${2:-}" = "--print-dir" ]; then echo "$DIR"; exit 0; fi
missing=0
for t in $TARGETS; do [ -x "$DIR/$t" ] || missing=1; done
if [ "$missing" = 1 ]; then
  for tool in cmake cc c++; do
    command -v "$tool" >/dev/null 2>&1 || { echo "llama-cpp-tools.sh: no $tool on PATH: cannot build llama.cpp's tools" >&2; exit 3; }
  done
  echo "building $TARGETS from llama-cpp-python $VERSION's vendored llama.cpp (about 3-4 minutes on 2 cores)" >&2
  mkdir -p "$CACHE"
  TMP=$(mktemp -d "$CACHE/.build.XXXXXX")
  trap 'rm -rf "$TMP"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary :all: --no-cache-dir -d "$TMP/sdist" "llama-cpp-python==$VERSION" >&2
  tar xzf "$TMP"/sdist/llama_cpp_python-*.tar.gz -C "$TMP"
  SRC=$(ls -d "$TMP"/llama_cpp_python-*/vendor/llama.cpp)
  GEN=(); command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
  # shellcheck disable=SC2086
  cmake -S "$SRC" -B "$TMP/build" "${GEN[@]}" $CMAKE_FLAGS -DCMAKE_C_FLAGS="$AMX_FLAGS" -DCMAKE_CXX_FLAGS="$AMX_FLAGS" \
      >"$TMP/cmake.log" 2>&1 || { tail -30 "$TMP/cmake.log" >&2; exit 1; }
  # shellcheck disable=SC2086
  cmake --build "$TMP/build" --target $TARGETS -j "$(nproc)" >"$TMP/build.log" 2>&1 \
      || { tail -30 "$TMP/build.log" >&2; exit 1; }
  mkdir -p "$TMP/out"
  for t in $TARGETS; do cp "$TMP/build/bin/$t" "$TMP/out/"; done
  "$TMP/out/llama-bench" --help >/dev/null 2>&1 || true
  rm -rf "$DIR"
  mv "$TMP/out" "$DIR"
fi
echo "$DIR"
