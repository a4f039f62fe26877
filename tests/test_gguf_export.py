"""The GGUF that llama.cpp runs computes exactly the pruned torch model, for every drop pattern.

Parity runs use an F32 GGUF and an F32 KV cache without flash attention, so the only differences left are
float summation order: llama.cpp's default F16 KV cache (and CPU flash attention, which works in F16) adds
rounding that a badly damaged model can amplify to tenths of a logit, which would hide real layout bugs.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dropquant.errors import DropquantError
from dropquant.gguf.export import ARCH_DECI, ARCH_LLAMA, ZERO_FFN_WIDTH, export_checkpoint, export_model, plan_blocks
from dropquant.prune.surgery import prune_model
from dropquant.prune.pruned_checkpoint import save_pruned
from dropquant.gguf.quantize import kv_cache_mib, quantize_gguf
from tests.gguf_helpers import (L, Q8_KL_BOUND_EMBEDDED, VOCAB, check_q8_0_runs, kl_divergence, llama_logits, plan,
                                tiny_llama, torch_logits, torch_params)

torch.set_num_threads(2)
TEXT = ("The history of the city begins in 1821, when a small group of settlers built a mill by the river. "
        "def add(a, b):\n    return a + b  # 42 🦙\nBy 1900 it had 12,000 inhabitants.")


TINY_PLANS = {
    "none": plan(),
    "attn4": plan(attn=[0, 2, 3, 5]),            # includes the first layer's attention
    "mlp4": plan(mlp=[0, 1, 3, 5]),
    "block2": plan(blocks=[1, 4]),
    "joint4": plan(attn=[1, 3], mlp=[3, 5]),      # layer 3 loses both halves and is left out
    "attn5_high": plan(attn=[0, 1, 2, 3, 4]),
    "joint9_high": plan(attn=[0, 1, 2, 4, 5], mlp=[0, 2, 3, 5]),
}


# --- layout -----------------------------------------------------------------------------------------

def test_plan_blocks_layouts():
    assert plan_blocks(4, [], [])[0] == ARCH_LLAMA
    arch, blocks = plan_blocks(4, [0, 2], [2, 3])
    assert arch == ARCH_DECI
    assert [b.layer for b in blocks] == [0, 1, 3]            # layer 2 lost both halves
    assert blocks[0].attn == "zero"                          # first block keeps a head count
    assert (blocks[2].attn, blocks[2].mlp) == ("keep", "zero")
    with pytest.raises(DropquantError, match="every attention and MLP"):
        plan_blocks(2, [0, 1], [0, 1])
    # No attention left: llama.cpp needs a KV cache of some size, so the first block keeps a zero one.
    assert [b.attn for b in plan_blocks(3, [0, 1, 2], [1])[1]] == ["zero_kv", "drop"]


# --- exact parity on a tiny random Llama -----------------------------------------------------------

@pytest.mark.parametrize("name", list(TINY_PLANS))
def test_tiny_f32_parity_q8_and_generation(name, tmp_path, tokenizer_gguf):
    import gguf

    base = tiny_llama()
    p = TINY_PLANS[name]
    pruned = prune_model(copy.deepcopy(base), p)
    ids = [int(i) for i in torch.randint(3, VOCAB, (48,), generator=torch.Generator().manual_seed(7))]
    ref = torch_logits(pruned, ids)
    assert ref.std() > 1.0, "logits too flat for the parity check to mean anything"

    path = tmp_path / "model.gguf"
    info = export_model(pruned, path, tokenizer_gguf=tokenizer_gguf)
    assert info.arch == (ARCH_LLAMA if not (p.attn or p.mlp) else ARCH_DECI)
    got = llama_logits(path, ids)
    assert np.abs(got - ref).max() <= 1e-2
    assert (got.argmax(-1) == ref.argmax(-1)).all()

    # Every stored weight is the pruned model's; the rest are the small all-zero stand-ins.
    assert info.n_params - info.n_standin_params == torch_params(pruned)
    mlp_only = len([i for i in p.mlp if i not in p.attn])
    assert info.n_standin_params <= mlp_only * (3 * ZERO_FFN_WIDTH * 64 + 64) + 64 * 64 + 64

    # The trap: no block that computes attention may have feed_forward_length 0.
    reader = gguf.GGUFReader(str(path))
    if info.arch == ARCH_DECI:
        hc = list(reader.fields["deci.attention.head_count"].contents())
        ff = list(reader.fields["deci.feed_forward_length"].contents())
        assert all(f > 0 for h, f in zip(hc, ff) if h > 0)
        assert hc[0] > 0

    check_q8_0_runs(path, tmp_path, ref, ids)


@pytest.mark.parametrize("drops", [{}, {"attn": [0, 2], "mlp": [4]}])
def test_llama3_rope_scaling_parity(drops, tmp_path, tokenizer_gguf):
    """Llama 3.x frequency scaling travels as llama.cpp's rope_freqs tensor, in both architectures."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=L,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                         rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2)
    model = prune_model(LlamaForCausalLM(config).eval(), plan(**drops))
    ids = list(range(2000, 2060))
    export_model(model, tmp_path / "m.gguf", tokenizer_gguf=tokenizer_gguf)
    ref, got = torch_logits(model, ids), llama_logits(tmp_path / "m.gguf", ids)
    assert np.abs(got - ref).max() <= 1e-2


def test_tied_embeddings_and_hf_checkpoint_dir(tmp_path, tokenizer_gguf, hf_tokenizer):
    """A checkpoint directory written by save_pruned (tied head omitted on disk) exports the same model."""
    base = tiny_llama(seed=3, tie=True)
    pruned = prune_model(base, plan(attn=[2], mlp=[4]))
    save_pruned(pruned, tmp_path / "pruned", tokenizer=hf_tokenizer)
    info = export_checkpoint(tmp_path / "pruned", tmp_path / "model.gguf", tokenizer_gguf=tokenizer_gguf)
    assert "output.weight" not in info.tensor_names.values()
    ids = list(range(100, 140))
    got, ref = llama_logits(tmp_path / "model.gguf", ids), torch_logits(pruned, ids)
    assert np.abs(got - ref).max() <= 1e-2


def test_sublayer_dropped_checkpoint_tokenizer_loads_without_a_model_type_warning(tmp_path, hf_tokenizer):
    """Regression: every export of an attention drop warned "You are using a model of type dropquant-pruned (...)
    to instantiate a model of type ``": the tokenizer was loaded without the checkpoint's real config."""
    import logging

    import gguf

    class Capture(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    pruned = prune_model(tiny_llama(), plan(attn=[1, 3]))
    save_pruned(pruned, tmp_path / "pruned", tokenizer=hf_tokenizer)
    capture, logger = Capture(), logging.getLogger("transformers")  # transformers' loggers do not propagate to root
    logger.addHandler(capture)
    try:
        export_checkpoint(tmp_path / "pruned", tmp_path / "model.gguf")
    finally:
        logger.removeHandler(capture)
    assert not [m for m in capture.messages if "model of type" in m], capture.messages
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == len(hf_tokenizer)


def test_every_attention_dropped_parity_and_context(tmp_path, tokenizer_gguf):
    """Regression: with no attention at all, llama.cpp could not create a context ("failed to allocate buffer
    for kv cache"). The first block now carries one zero attention with one KV head: exact, and a tiny cache."""
    pruned = prune_model(tiny_llama(), plan(attn=range(L), mlp=[2]))
    ids = [int(i) for i in torch.randint(3, VOCAB, (48,), generator=torch.Generator().manual_seed(7))]
    ref = torch_logits(pruned, ids)
    path = tmp_path / "model.gguf"
    info = export_model(pruned, path, tokenizer_gguf=tokenizer_gguf)
    assert (info.head_count, info.head_count_kv) == ([4, 0, 0, 0, 0], [1, 0, 0, 0, 0])
    assert info.n_params - info.n_standin_params == torch_params(pruned)
    got = llama_logits(path, ids)
    assert np.abs(got - ref).max() <= 1e-3
    # One KV head of 16 dims in F16, K and V, 4096 cells: 0.25 MiB.
    assert kv_cache_mib(path, n_ctx=4096, flash_attn=True) == pytest.approx(0.25, abs=0.01)

    check_q8_0_runs(path, tmp_path, ref, ids)


def test_mlp_drop_written_with_ffn_length_zero_is_wrong(tmp_path, tokenizer_gguf):
    """Regression: the deci graph drops a block's attention output when its FFN length is 0 (DESIGN.md).

    The same file rewritten in that form (no stand-in FFN) must fail parity badly, so the parity test above
    is able to catch an exporter that writes an MLP drop that way.
    """
    import gguf

    pruned = prune_model(tiny_llama(), plan(mlp=[1, 3]))
    ids = list(range(200, 248))
    ref = torch_logits(pruned, ids)
    good = tmp_path / "good.gguf"
    export_model(pruned, good, tokenizer_gguf=tokenizer_gguf)

    bad = tmp_path / "bad.gguf"
    reader = gguf.GGUFReader(str(good))
    w = gguf.GGUFWriter(str(bad), "deci")
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = f.contents()
        if key == "deci.feed_forward_length":
            value = [0 if i in (1, 3) else v for i, v in enumerate(value)]
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, f.types[0], sub_type=sub)
    for t in reader.tensors:
        if any(t.name.startswith(f"blk.{i}.ffn_") for i in (1, 3)):
            continue
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    assert np.abs(llama_logits(good, ids) - ref).max() <= 1e-2
    assert np.abs(llama_logits(bad, ids) - ref).max() > 0.5


def test_kv_cache_shrinks_with_dropped_attention(tmp_path, tokenizer_gguf):
    base = tiny_llama()
    full, cut = tmp_path / "full.gguf", tmp_path / "cut.gguf"
    export_model(base, full, tokenizer_gguf=tokenizer_gguf)
    export_model(prune_model(copy.deepcopy(base), plan(attn=[0, 2, 3, 5])), cut, tokenizer_gguf=tokenizer_gguf)
    kv_full = kv_cache_mib(full, n_ctx=4096, flash_attn=True)
    kv_cut = kv_cache_mib(cut, n_ctx=4096, flash_attn=True)
    # K and V in F16: 4096 cells x 2 KV heads x 16 dims x 2 bytes x 2 per attention layer = 0.5 MiB each.
    assert kv_full == pytest.approx(L * 0.5, abs=0.01)
    assert kv_cut == pytest.approx(2 * 0.5, abs=0.01)     # 2 of 6 attention layers remain


def test_file_size_follows_dropped_parameters(tmp_path, tokenizer_gguf):
    base = tiny_llama()
    sizes, infos = {}, {}
    for name in ("none", "attn4", "block2", "mlp4"):
        path = tmp_path / f"{name}.gguf"
        infos[name] = export_model(prune_model(copy.deepcopy(base), TINY_PLANS[name]), path, tokenizer_gguf=tokenizer_gguf)
        sizes[name] = path.stat().st_size
    for name in ("attn4", "block2", "mlp4"):
        d_params = infos["none"].n_params - infos[name].n_params
        d_bytes = sizes["none"] - sizes[name]
        assert d_params > 0
        assert abs(d_bytes - 4 * d_params) <= 64 * 32  # tensor data alignment (32 bytes) and metadata only


def test_bad_inputs_are_refused(tmp_path, tokenizer_gguf):
    from dropquant.gguf.export import write_gguf

    model = tiny_llama()
    with pytest.raises(DropquantError, match="F32, F16, BF16 or auto"):
        export_model(model, tmp_path / "x.gguf", tokenizer_gguf=tokenizer_gguf, out_type="Q4_0")
    with pytest.raises(DropquantError, match="exactly one tokenizer"):
        export_model(model, tmp_path / "x.gguf")
    state = {k: v for k, v in model.state_dict().items() if "layers.2.mlp.up_proj" not in k}
    with pytest.raises(DropquantError, match="layers.2.mlp.up_proj.weight is missing"):
        write_gguf(tmp_path / "x.gguf", state, model.config, tokenizer_gguf=tokenizer_gguf)


# --- tokenizer ----------------------------------------------------------------------------------------

def test_hf_tokenizer_written_token_for_token(tmp_path, hf_tokenizer, shared_data_lines):
    """A checkpoint without a GGUF source gets its HF tokenizer written; llama.cpp must tokenize identically."""
    import gguf
    import llama_cpp

    from dropquant.gguf.tokenizer import CHKTXT

    tok_dir = tmp_path / "tok"
    hf_tokenizer.save_pretrained(tok_dir)
    path = tmp_path / "model.gguf"
    export_model(tiny_llama(layers=2), path, tokenizer_dir=tok_dir)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert "im_start" in reader.fields["tokenizer.chat_template"].contents()
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == hf_tokenizer.eos_token_id

    texts = [TEXT, CHKTXT, "  leading spaces\tand\ttabs\n\nnew lines", "<|im_start|>user\nHi<|im_end|>",
             "Ünïcödé — 日本語のテキスト, émojis 👍🏽 and numbers 3.14159 1234567"] + shared_data_lines
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        for text in texts:
            want = hf_tokenizer.encode(text, add_special_tokens=False)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text[:60]
            assert llm.detokenize(want, special=True).decode("utf-8", errors="replace") == text
    finally:
        llm.close()


@pytest.fixture
def shared_data_lines():
    root = Path(os.environ.get("DROPQUANT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = root / "wikitext2" / "wiki.test.raw-lines.txt"
    if not path.is_file():
        return []
    return path.read_text().splitlines()[:200]


# --- the embedded model (SmolLM2-135M) ------------------------------------------------------------------

EMBEDDED_PLANS = {
    "none": plan(layers=30),
    "attn4": plan(attn=[20, 22, 24, 26], layers=30),
    "mlp4": plan(mlp=[20, 23, 25, 27], layers=30),
    "block4": plan(blocks=[21, 22, 23, 24], layers=30),
    "joint4": plan(attn=[18, 25], mlp=[25, 28], layers=30),
    "attn15_high_with_layer0": plan(attn=[0] + list(range(15, 29)), layers=30),
    "joint24_high": plan(attn=list(range(6, 28)) + [0], mlp=[27], layers=30),
    "attn30_all": plan(attn=range(30), layers=30),
}


@pytest.fixture(scope="module")
def embedded_text_ids(embedded_model):
    _, tok = embedded_model
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
            "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")
    return tok.encode(text, add_special_tokens=False)


def chat(path, question):
    """One greedy chat turn through the carried-over chat template: (answer, finish reason)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, verbose=False)
    try:
        out = llm.create_chat_completion([{"role": "user", "content": question}], max_tokens=32, temperature=0.0)
    finally:
        llm.close()
    return out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"]


@pytest.mark.parametrize("name", list(EMBEDDED_PLANS))
def test_embedded_f32_parity(name, tmp_path, embedded_model, embedded_text_ids, tokenizer_gguf):
    model, _ = embedded_model
    p = EMBEDDED_PLANS[name]
    pruned = model if p.is_empty else prune_model(copy.deepcopy(model), p)
    ids = embedded_text_ids
    ref = torch_logits(pruned, ids)
    path = tmp_path / "model.gguf"
    info = export_model(pruned, path, tokenizer_gguf=tokenizer_gguf)
    got = llama_logits(path, ids)
    assert np.abs(got - ref).max() <= 0.1
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert info.n_params - info.n_standin_params == torch_params(pruned)
    if name in ("none", "attn4", "mlp4"):
        q8 = tmp_path / "model.Q8_0.gguf"
        quantize_gguf(path, q8, "Q8_0")
        kl = kl_divergence(ref, llama_logits(q8, ids))
        assert kl < Q8_KL_BOUND_EMBEDDED, f"Q8_0 KL divergence {kl:.2e}"
        if name in ("none", "attn4"):
            answer, finish = chat(q8, "What is the capital of Germany?")
            assert "Berlin" in answer
            if name == "none":  # the end-of-turn token is recognized: special tokens came over
                assert finish == "stop"
    if name == "attn15_high_with_layer0":
        # 15 of 30 attention layers gone: half the KV cache (90 MiB -> 45 MiB at 4096 tokens).
        assert kv_cache_mib(path, n_ctx=4096, flash_attn=True) == pytest.approx(45.0, abs=0.01)
