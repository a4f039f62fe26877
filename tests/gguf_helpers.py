"""Helpers shared by the GGUF export tests: tiny random models of each family, llama.cpp and torch logits."""
from __future__ import annotations

import numpy as np
import torch

from dropquant.gguf.quantize import quantize_gguf
from dropquant.prune.selection import DropPlan

GGML_TYPE_F32 = 0
L = 6
VOCAB = 49152  # the embedded model's tokenizer, reused so the tiny GGUF is a complete, runnable file
# Q8_0 (weights and, in llama.cpp's CPU matmuls, activations in 8-bit blocks) is not exact. Bounds from
# measurements (docs/quantize.md): SmolLM2 unpruned 4.1e-3 nats over 512 wikitext tokens, 5e-3..1.3e-2 with
# 4 modules dropped, against 6e-2..2e-1 at Q4_K_M; a layout error costs > 1 nat. The tiny random model is
# chaotic (large random weights amplify rounding): 1.4e-3..1.6e-2 measured, Q4_K_M 5e-2..4e-1.
Q8_KL_BOUND_EMBEDDED = 0.03
Q8_KL_BOUND_TINY = 0.05


def _spread(model, seed: int, bias_scale: float = 0.3) -> None:
    """Move every parameter off its init, norms and biases far off, so a missing or misplaced one shows."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=g) * bias_scale)


def tiny_llama(seed=0, layers=L, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so a missing or misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _tiny_qwen(family: str, seed: int, layers: int, tie: bool, **extra):
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=1e6, tie_word_embeddings=tie, bos_token_id=1,
        eos_token_id=2, initializer_range=0.2, **extra)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    _spread(model, seed)
    return model


def tiny_qwen2(seed=0, layers=L, tie=False):
    """A tiny random Qwen2 (q/k/v biases, rope theta 1e6); Qwen2.5's small models tie their embeddings."""
    return _tiny_qwen("Qwen2", seed, layers, tie)


def tiny_qwen3(seed=0, layers=L, tie=False):
    """A tiny random Qwen3: per-head q/k norms with random weights, head_dim 32 != hidden / heads."""
    return _tiny_qwen("Qwen3", seed, layers, tie, head_dim=32)


TINY_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3}


def plan(attn=(), mlp=(), blocks=(), layers=L, method="explicit"):
    return DropPlan(method=method, n=len(attn) + len(mlp) + len(blocks), selection="explicit",
                    attn=sorted(attn), mlp=sorted(mlp), blocks=sorted(blocks), num_layers=layers)


def random_ids(n=48, seed=7):
    return [int(i) for i in torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))]


def llama_logits(path, ids, **kw):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=max(64, len(ids)), n_batch=512, n_threads=2,
                          verbose=False, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, **kw)
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def kl_divergence(ref, got):
    """Mean over positions of KL(softmax(ref) || softmax(got)), in nats."""
    lp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lq = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def torch_params(model):
    return sum(p.numel() for p in model.parameters())  # parameters() lists a tied weight once


def check_q8_0_runs(path, tmp_path, ref, ids, name="model.Q8_0.gguf"):
    """The file quantized to Q8_0 stays close to the torch logits and generates in llama.cpp; returns its path."""
    import llama_cpp

    q8 = tmp_path / name
    quantize_gguf(path, q8, "Q8_0")
    kl = kl_divergence(ref, llama_logits(q8, ids))
    assert kl < Q8_KL_BOUND_TINY, f"Q8_0 KL divergence {kl:.2e}"
    llm = llama_cpp.Llama(str(q8), n_ctx=128, n_threads=2, verbose=False)
    try:
        out = llm.create_completion("Once upon a time", max_tokens=6, temperature=0.0)
        assert out["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()
    return q8


def gguf_tensors(path) -> dict:
    """GGUF tensor name -> (type name, shape in torch order, raw bytes)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape)), bytes(np.asarray(t.data).tobytes()))
            for t in reader.tensors}
