"""Packing: texts joined by EOS, cut into exact blocks, no padding, deterministic for a seed; data-free sampling
in torch (HF sources) and in llama.cpp (GGUF sources)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dropquant import calibration as cal
from dropquant.calibration import generate_tokens, pack, resolve_files, source_texts
from dropquant.errors import DropquantError


class CharTokenizer:
    """One token per character: makes the packed stream checkable by eye."""

    eos_token_id = 0
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_pack_joins_with_eos_and_cuts_exact_blocks():
    blocks, used = pack(["abc", "de", "fghij", "unused"], CharTokenizer(), n_samples=2, seq_len=5)
    assert blocks.shape == (2, 5) and blocks.dtype == torch.int64
    expected = [ord("a"), ord("b"), ord("c"), 0, ord("d"), ord("e"), 0, ord("f"), ord("g"), ord("h")]
    assert blocks.flatten().tolist() == expected
    assert used == 3


def test_pack_skips_blank_texts_and_never_pads():
    blocks, _ = pack(["", "  ", "abcdef"], CharTokenizer(), n_samples=1, seq_len=6)
    assert blocks.tolist() == [[ord(c) for c in "abcdef"]]


def test_pack_refuses_too_little_text():
    with pytest.raises(DropquantError, match="needs 20"):
        pack(["abc"], CharTokenizer(), n_samples=4, seq_len=5)


def test_local_sources_txt_jsonl_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "first"}) + "\n\n" + json.dumps({"body": "second"}) + "\n")
    texts = sorted(source_texts(str(tmp_path / "*"), None, "train", "body", seed=0))
    assert texts == ["first", "plain text file", "second"]
    with pytest.raises(DropquantError, match="no field 'text'"):
        list(source_texts(str(tmp_path / "b.jsonl"), None, "train", "text", seed=0))
    with pytest.raises(DropquantError, match="no file matches"):
        resolve_files(str(tmp_path / "*.parquet"))


def test_a_source_with_no_text_is_refused_as_it_is_read(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n\n" + json.dumps({"text": "  "}) + "\n")
    (tmp_path / "none.jsonl").write_text("")
    for name in ("empty.txt", "blank.txt", "blank.jsonl", "none.jsonl", "*"):
        with pytest.raises(DropquantError, match="calibration.source: '.*' holds no text"):
            source_texts(str(tmp_path / name), None, "train", "text", seed=0)


def test_seed_makes_selection_deterministic(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)))
    first = list(source_texts(str(path), None, "train", "text", seed=3))
    assert first == list(source_texts(str(path), None, "train", "text", seed=3))
    assert first != list(source_texts(str(path), None, "train", "text", seed=4))


def test_generated_calibration_is_deterministic(tiny_llama):
    tok = CharTokenizer()
    a = generate_tokens(tiny_llama, tok, n_samples=3, seq_len=12, seed=7, progress=False)
    b = generate_tokens(tiny_llama, tok, n_samples=3, seq_len=12, seed=7, progress=False)
    c = generate_tokens(tiny_llama, tok, n_samples=3, seq_len=12, seed=8, progress=False)
    assert a.shape == (3, 12) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == tok.bos_token_id).all()


def test_sample_rows_is_the_inverse_cdf_of_the_softmax():
    logits = np.log(np.array([[1.0, 3.0, 1e-300], [2.0, 1.0, 1.0]], dtype=np.float64)).astype(np.float32)
    # row 0: p = (0.25, 0.75, 0); row 1: p = (0.5, 0.25, 0.25)
    assert cal.sample_rows(logits, np.array([0.0, 0.0])).tolist() == [0, 0]
    assert cal.sample_rows(logits, np.array([0.24, 0.49])).tolist() == [0, 0]
    assert cal.sample_rows(logits, np.array([0.26, 0.51])).tolist() == [1, 1]
    assert cal.sample_rows(logits, np.array([0.999999, 0.76])).tolist() == [1, 2]
    # a token of probability 0 is never drawn, even where the draw lands exactly on its (empty) interval
    zero_mid = np.array([[0.0, -1e30, 0.0]], dtype=np.float32)
    assert cal.sample_rows(zero_mid, np.array([0.5])).tolist() == [2]
    # frequencies follow the softmax
    rng = np.random.default_rng(0)
    n = 20000
    draws = cal.sample_rows(np.repeat(logits[1:], n, axis=0), rng.random(n))
    assert np.allclose(np.bincount(draws, minlength=3) / n, [0.5, 0.25, 0.25], atol=0.015)


def test_sample_uniforms_one_stream_per_sequence():
    u = cal.sample_uniforms(5, 3, 10)
    assert u.shape == (3, 10) and ((0 <= u) & (u < 1)).all()
    assert np.array_equal(cal.sample_uniforms(5, 2, 10), u[:2])  # sequence i's draws do not depend on n_samples
    assert not np.array_equal(cal.sample_uniforms(6, 3, 10), u)
    assert not np.array_equal(u[0], u[1])


def test_gguf_sampling_is_deterministic_and_does_not_depend_on_threads(tiny_gguf):
    _, path = tiny_gguf
    a = cal.sample_gguf(path, 1, n_samples=3, seq_len=24, seed=7, threads=1, progress=False)
    b = cal.sample_gguf(path, 1, n_samples=3, seq_len=24, seed=7, threads=2, progress=False)
    c = cal.sample_gguf(path, 1, n_samples=3, seq_len=24, seed=8, threads=2, progress=False)
    assert a.shape == (3, 24) and a.dtype == torch.int64
    assert (a[:, 0] == 1).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gguf_sampling_in_groups(tiny_gguf, monkeypatch):
    """More samples than one llama.cpp context holds: decoded group by group, still deterministic."""
    _, path = tiny_gguf
    monkeypatch.setattr(cal, "SAMPLE_GROUP", 2)
    a = cal.sample_gguf(path, 1, n_samples=5, seq_len=12, seed=0, threads=1, progress=False)
    assert a.shape == (5, 12) and (a[:, 0] == 1).all() and (a[:, 1:] != 1).any(dim=1).all()
    assert torch.equal(a, cal.sample_gguf(path, 1, n_samples=5, seq_len=12, seed=0, threads=1, progress=False))


def test_gguf_sampling_follows_the_model(tiny_gguf):
    """Sampled at temperature 1 from the right context: the mean log-probability (torch, teacher-forced) of the
    tokens drawn is minus the mean entropy of the distributions they were drawn from. Tokens shifted by one
    position or swapped between sequences (a wrong logits row) are far off, and greedy decoding would be above."""
    model, path = tiny_gguf
    ids = cal.sample_gguf(path, 1, n_samples=8, seq_len=48, seed=0, threads=2, progress=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), dim=-1)[:, :-1]
    entropy = -(logp.exp() * logp).sum(-1).mean().item()

    def mean_logp(targets):
        return logp.gather(2, targets[:, :, None]).mean().item()

    drawn = mean_logp(ids[:, 1:])
    assert abs(drawn + entropy) < 0.4, (drawn, -entropy)
    for wrong in (torch.roll(ids[:, 1:], 1, dims=1), torch.roll(ids[:, 1:], 1, dims=0)):
        assert mean_logp(wrong) < -entropy - 1.0


def test_calibrate_stage_samples_a_gguf_source_in_llamacpp(tmp_path, tiny_gguf):
    """A GGUF source is sampled in llama.cpp: the stage's tokens are sample_gguf's and the manifest says so.
    (Two runs giving the same bytes: test_gguf_sampling_is_deterministic_... and test_reproducibility.py.)"""
    from safetensors.torch import load_file

    from stages.calibrate import main

    _, path = tiny_gguf
    params = tmp_path / "params.yaml"
    params.write_text(f"model: {{source: {path}}}\ncalibration: {{n_samples: 2, seq_len: 16, seed: 3}}\n")
    out = tmp_path / "cal"
    assert main(["--params", str(params), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampler"] == "llama.cpp"
    tokens = load_file(str(out / "tokens.safetensors"))["input_ids"]
    assert manifest["sha256"] == cal.tokens_digest(tokens)
    assert torch.equal(tokens, cal.sample_gguf(path, tokens[0, 0].item(), 2, 16, 3, progress=False))


def test_thread_chooser_probes_both_counts_then_keeps_the_faster():
    ch = cal.ThreadChooser(4, period=10, probe=2)
    seen = []
    for step in range(20):
        n = ch.threads(step)
        seen.append(n)
        slow = (n == 4) if step < 10 else (n == 1)  # 4 threads slow at first (a busy machine), then 1 thread
        ch.record(step, n, 1.0 if slow else 0.1)
    assert seen[:4] == [1, 1, 4, 4] and set(seen[4:10]) == {1}
    assert seen[10:14] == [1, 1, 4, 4] and set(seen[14:20]) == {4}
    single = cal.ThreadChooser(1)
    assert {single.threads(s) for s in range(100)} == {1}
