#!/usr/bin/env bash
# Print the path of a llama-cpp-python wheel built for this machine, building it first if needed.
#
# Why not `pip install llama-cpp-python`: pip's wheel cache is keyed by the sdist alone, so a wheel built
# with other CMAKE_ARGS (or on another CPU, with GGML_NATIVE's -march=native) would be reused silently.
# Here the cache directory is keyed by everything the binary depends on: the version, the CMake flags,
# this CPU's feature flags, the compiler and the Python, and for a CUDA build the CUDA toolkit and the GPUs;
# pip's own cache is bypassed (--no-cache-dir).
#
# ggml compiles its AMX matmul path when the compiler defines __AMX_INT8__ (GGML_NATIVE on an AMX CPU);
# it segfaults on some machines (ggml-org/llama.cpp#20824). -U__AMX_INT8__ removes only that path:
# AVX2/AVX-512/VNNI/BF16 stay native. dropquant.setup_check verifies the result after installing.
#
# The backend: DROPQUANT_GPU=auto|on|off (`make setup GPU=...`), see choose_backend in llama-cpp-common.sh.
#
# usage: scripts/llama-cpp-wheel.sh PYTHON [--print-dir | --print-backend | --dry-run]
#   --print-dir      the cache directory of this machine's wheel (built or not)
#   --print-backend  cpu or cuda: what a build here would target
#   --dry-run        backend, why, CMake arguments and cache directory, one `name=value` a line; builds nothing
set -euo pipefail
USAGE="usage: llama-cpp-wheel.sh PYTHON [--print-dir | --print-backend | --dry-run]"
PY=${1:?$USAGE}
MODE=${2:-}
case "$MODE" in ""|--print-dir|--print-backend|--dry-run) ;; *) echo "$USAGE" >&2; exit 2 ;; esac
source "$(dirname "$0")/llama-cpp-common.sh"
choose_backend
if [ "$MODE" = "--print-backend" ]; then echo "$BACKEND"; exit 0; fi
CMAKE_FLAGS="-DCMAKE_C_FLAGS=$AMX_FLAGS -DCMAKE_CXX_FLAGS=$AMX_FLAGS ${DROPQUANT_LLAMA_CMAKE_ARGS:-}"
KEY=("$CMAKE_FLAGS" "$("$PY" -c 'import sys; print(sys.version)')")
if [ "$BACKEND" != cpu ]; then
  CMAKE_FLAGS="$CMAKE_FLAGS $BACKEND_FLAGS"
  KEY=("$CMAKE_FLAGS" "${KEY[1]}" "$BACKEND_KEY")
fi
CACHE=${DROPQUANT_WHEEL_CACHE:-$CACHE_ROOT/llama-cpp-python}
DIR="$CACHE/$VERSION-$(build_key "${KEY[@]}")"
case "$MODE" in
  --print-dir) echo "$DIR"; exit 0 ;;
  --dry-run) printf 'backend=%s\nwhy=%s\ncmake_args=%s\ndir=%s\n' "$BACKEND" "$BACKEND_WHY" "$CMAKE_FLAGS" "$DIR"; exit 0 ;;
esac
echo "llama.cpp backend: $BACKEND ($BACKEND_WHY)" >&2
WHEEL=$(ls "$DIR"/llama_cpp_python-*.whl 2>/dev/null | head -1 || true)
if [ -z "$WHEEL" ]; then
  if [ "$BACKEND" = cuda ]; then
    export CUDACXX="$NVCC"
    echo "building llama-cpp-python $VERSION with CUDA from source (many minutes: ggml's CUDA kernels; CMAKE_ARGS=$CMAKE_FLAGS)" >&2
  else
    echo "building llama-cpp-python $VERSION from source (about 4 minutes on 2 cores; CMAKE_ARGS=$CMAKE_FLAGS)" >&2
  fi
  mkdir -p "$CACHE"
  TMP=$(mktemp -d "$CACHE/.build.XXXXXX")
  trap 'rm -rf "$TMP"' EXIT
  CMAKE_ARGS="$CMAKE_FLAGS" "$PY" -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
      -w "$TMP" "llama-cpp-python==$VERSION" >&2
  rm -rf "$DIR"
  mv "$TMP" "$DIR"  # whole directory renamed at once: a killed build never leaves a wheel that looks finished
  WHEEL=$(ls "$DIR"/llama_cpp_python-*.whl | head -1)
fi
echo "$WHEEL"
