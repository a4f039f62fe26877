# Sourced by llama-cpp-wheel.sh and llama-cpp-tools.sh: what a llama.cpp build for this machine depends on.
# VERSION: the llama-cpp-python pin; AMX_FLAGS: compile out ggml's AMX matmul path, which segfaults on some
# CPUs (ggml-org/llama.cpp#20824), keeping every other native SIMD path; build_key: a hash of the arguments
# plus this CPU's feature flags and the compiler, so a cached build is only ever reused where it was made;
# choose_backend: CPU or CUDA (docs/gpu.md).
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

find_nvcc() {
  if [ -n "${CUDACXX:-}" ] && [ -x "${CUDACXX}" ]; then echo "$CUDACXX"; return 0; fi
  command -v nvcc 2>/dev/null && return 0
  if [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda/bin/nvcc; return 0; fi
  return 1
}

# DROPQUANT_GPU (`make setup GPU=...`): auto (default) builds CUDA where nvidia-smi lists a GPU and a CUDA compiler
# is found, on insists on CUDA, off builds for the CPU. Sets BACKEND (cpu|cuda), BACKEND_FLAGS (CMake flags to add),
# BACKEND_KEY (what a CUDA binary also depends on: the toolkit, and the GPUs, since GGML_NATIVE compiles for the GPUs
# present), BACKEND_WHY (one line for the user) and NVCC. A CPU build adds nothing to the flags or the key, so its
# key is the one it had before GPU builds existed and its cached wheel stays valid.
choose_backend() {
  local mode=${DROPQUANT_GPU:-auto} gpus=""
  BACKEND=cpu BACKEND_FLAGS="" BACKEND_KEY="" NVCC=""
  case "$mode" in
    on|off|auto) ;;
    *) echo "$(basename "$0"): GPU=$mode: expected on, off or auto" >&2; exit 2 ;;
  esac
  if [ "$mode" = off ]; then BACKEND_WHY="GPU=off"; return 0; fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null | sed 's/, */ /g' | paste -sd ';' - || true)
  fi
  NVCC=$(find_nvcc || true)
  if [ "$mode" = auto ] && [ -z "$gpus" ]; then
    BACKEND_WHY="no NVIDIA GPU found (nvidia-smi); GPU=on forces CUDA"
    return 0
  fi
  if [ -z "$NVCC" ]; then
    if [ "$mode" = on ]; then
      echo "$(basename "$0"): GPU=on, but no CUDA compiler: nvcc is not on PATH, CUDACXX is not set and" \
           "/usr/local/cuda/bin/nvcc does not exist; install the CUDA toolkit or set CUDACXX" >&2
      exit 2
    fi
    BACKEND_WHY="an NVIDIA GPU ($gpus) but no CUDA compiler (nvcc, CUDACXX): building for the CPU; install the CUDA toolkit for a CUDA build"
    return 0
  fi
  if [ -z "$gpus" ] && [[ "${DROPQUANT_LLAMA_CMAKE_ARGS:-}" != *CMAKE_CUDA_ARCHITECTURES* ]]; then
    echo "$(basename "$0"): GPU=on, but no GPU is visible (nvidia-smi) and llama.cpp's CUDA build compiles for the" \
         "GPUs present; name them, e.g. DROPQUANT_LLAMA_CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=90 (H100)" >&2
    exit 2
  fi
  BACKEND=cuda
  BACKEND_FLAGS="-DGGML_CUDA=on"
  BACKEND_KEY="$("$NVCC" --version 2>/dev/null | grep -m1 -i release || echo "$NVCC") | ${gpus:-no GPU visible}"
  BACKEND_WHY="${gpus:-no GPU visible}; $("$NVCC" --version 2>/dev/null | grep -m1 -io 'release [0-9.]*' || echo "$NVCC")"
}
