"""Packing: texts joined by EOS, cut into exact blocks, no padding, deterministic for a seed."""
from __future__ import annotations

import json

import pytest
import torch

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
