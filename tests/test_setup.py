"""The set-up's llama.cpp build: no AMX path, a cache keyed by the build flags, and a check that turns a crash
into one message."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dropquant import setup_check

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "llama-cpp-wheel.sh"


def test_installed_llama_cpp_is_built_without_amx():
    features = setup_check.build_features(setup_check.system_info())
    assert features, "llama.cpp reports no build features"
    assert "AMX_INT8" not in features, (
        "the installed llama-cpp-python contains ggml's AMX path, which crashes on some CPUs: "
        "`make clean-setup setup` rebuilds it without")


def test_build_features_parses_llama_cpp_system_info():
    info = "CPU : SSE3 = 1 | AVX512 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ACCELERATE = 0 |"
    assert setup_check.build_features(info) == ["SSE3", "AVX512", "AMX_INT8", "LLAMAFILE", "OPENMP", "REPACK"]


def test_probe_runs_the_embedded_model(tokenizer_gguf):
    result = setup_check.probe(str(tokenizer_gguf))
    assert result["finite"] and result["n_tokens"] > 0


def test_a_crash_in_llama_cpp_becomes_one_message(monkeypatch, tokenizer_gguf):
    crash = ("import json, os, signal, llama_cpp\n"
             "print(json.dumps({'system_info': llama_cpp.llama_print_system_info().decode()}), flush=True)\n"
             "os.kill(os.getpid(), signal.SIGSEGV)\n")
    monkeypatch.setattr(setup_check, "_PROBE", crash)
    with pytest.raises(RuntimeError) as err:
        setup_check.probe(str(tokenizer_gguf))
    text = str(err.value)
    assert "llama.cpp" in text and "SIGSEGV" in text and "build features:" in text and "make clean-setup" in text


def test_a_build_with_amx_is_refused(monkeypatch, tokenizer_gguf):
    real = setup_check.build_features
    monkeypatch.setattr(setup_check, "build_features", lambda info: [*real(info), "AMX_INT8"])
    with pytest.raises(RuntimeError, match="AMX_INT8"):
        setup_check.probe(str(tokenizer_gguf))


def _cache_dir(**env) -> str:
    out = subprocess.run(["bash", str(SCRIPT), sys.executable, "--print-dir"], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    return out.stdout.strip()


def test_wheel_cache_is_keyed_by_build_flags(tmp_path):
    """A wheel built with other CMake flags can never be picked up (pip's own cache is keyed by the sdist)."""
    plain = _cache_dir(DROPQUANT_WHEEL_CACHE=str(tmp_path))
    other = _cache_dir(DROPQUANT_WHEEL_CACHE=str(tmp_path), DROPQUANT_LLAMA_CMAKE_ARGS="-DGGML_AVX512=OFF")
    assert plain.startswith(str(tmp_path)) and plain != other
    assert plain == _cache_dir(DROPQUANT_WHEEL_CACHE=str(tmp_path))
    text = SCRIPT.read_text()
    assert "-U__AMX_INT8__" in text and "--no-cache-dir" in text
