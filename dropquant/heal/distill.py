"""A short knowledge distillation of a pruned (or linearly healed) model from the unpruned one.

The teacher's next-token distribution on the calibration tokens is computed once through the layer-wise
runner (so a teacher larger than memory streams) and cached as its top-k probabilities; the student is
trained to match it with the KL divergence over the k tokens plus one bucket for the rest of the
vocabulary (a lower bound on the full KL, exact when the teacher's tail is empty), optionally plus the
matching of the final (normed) hidden state. What is trained: `norms` (every RMSNorm weight), `lora`
(peft LoRA adapters on every projection and linear stand-in, merged back into the weights afterwards)
or `all` kept weights. Held-out calibration samples, never trained on, give the held-out KL that is
logged and stops the training early; the best held-out state is the one kept.

Deterministic for a seed on the CPU (same thread count): seeded adapter initialization and batch order,
deterministic algorithms. On a GPU the same, with cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from dropquant.errors import DropquantError
from dropquant.model.layerwise import LayerPass, layer_output, walk_layers

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "linear_attn")


def bf16_supported(device: str) -> bool:
    """Whether `device` has bfloat16 arithmetic (CPU: AVX512-BF16 or AMX; an emulated bfloat16 is slower, not faster)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check and check())
    return False


def check_precision(precision: str, device: str) -> None:
    if precision not in ("float32", "bfloat16"):
        raise DropquantError(f"heal.precision={precision!r}: expected float32 or bfloat16")
    if precision == "bfloat16" and not bf16_supported(device):
        raise DropquantError(f"heal.precision=bfloat16: {device} has no bfloat16 arithmetic that torch can use "
                             "(on a CPU it needs AVX512-BF16 or AMX); use heal.precision=float32")


def deterministic_cublas(device: str) -> None:
    """cuBLAS gives the same sums run to run only with a fixed workspace, which torch's deterministic mode asks for
    (warning at every product without it). torch reads it when it first makes a cuBLAS handle: call this before the
    first product on the GPU (the heal does, before fitting)."""
    if torch.device(device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def training_precision(precision: str, device: str):
    """The training forward's context: float32 as it is, or torch autocast to bfloat16 (the weights, the LoRA
    adapters, the optimizer state and the loss stay float32)."""
    check_precision(precision, device)
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


@dataclass
class TeacherTargets:
    """The teacher's top-k log-probabilities per token (and optionally its final normed hidden state)."""

    input_ids: torch.Tensor  # [n, seq]
    top_ids: torch.Tensor    # [n, seq, k] int64
    top_logp: torch.Tensor   # [n, seq, k] float32
    hidden: Optional[torch.Tensor] = None  # [n, seq, hidden] float32

    def select(self, rows: slice | torch.Tensor) -> "TeacherTargets":
        return TeacherTargets(self.input_ids[rows], self.top_ids[rows], self.top_logp[rows],
                              None if self.hidden is None else self.hidden[rows])


@torch.inference_mode()
def teacher_targets(stack, input_ids: torch.Tensor, topk: int, *, hidden: bool = False, batch_size: int = 2,
                    progress: bool = True) -> TeacherTargets:
    """One pass of the unpruned model (`stack`) over `input_ids`, keeping what distillation needs."""
    n, seq = input_ids.shape
    top_ids = torch.empty(n, seq, topk, dtype=torch.int64)
    top_logp = torch.empty(n, seq, topk, dtype=torch.float32)
    final = torch.empty(n, seq, int(stack.config.hidden_size), dtype=torch.float32) if hidden else None
    last = len(stack.layers) - 1
    head = stack.head()

    def visit(i: int, layer, lp: LayerPass) -> None:
        for sl, kw in lp.batches():
            y = layer_output(layer, lp.read("main", sl), kw)
            lp.write("main", sl, y)
            if i == last:
                logp = torch.log_softmax(head(y).float(), dim=-1)
                values, ids = logp.topk(topk, dim=-1)
                top_ids[sl], top_logp[sl] = ids.cpu(), values.cpu()
                if final is not None:
                    final[sl] = _final_norm(stack)(y).float().cpu()

    walk_layers(stack, input_ids, visit, ("main",), batch_size, progress, "teacher top-k")
    return TeacherTargets(input_ids, top_ids, top_logp, final)


def _final_norm(stack):
    model = getattr(stack, "model", None)
    if model is None:
        raise DropquantError("heal.hidden_weight > 0 needs the unpruned model in memory (it is streamed here)")
    return model.model.norm


def bucket_kl(logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) per token over the teacher's top-k tokens plus one bucket for the rest."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    logq_k = logq.gather(-1, top_ids)
    p_k = top_logp.exp()
    p_rest = (1 - p_k.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - logq_k.exp().sum(-1)).clamp_min(1e-12)
    kl = (p_k * (top_logp - logq_k)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean()


# --- what is trained ------------------------------------------------------------------------------------------

def prepare_trainable(model, what: str, lora_rank: int, seed: int):
    """(model to train, its trainable parameters): norms, peft LoRA adapters, or every weight."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    if what == "lora":
        from peft import LoraConfig, get_peft_model

        present = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS})
        config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0, target_modules=present, bias="none")
        model = get_peft_model(model, config)
        params = [p for n, p in model.named_parameters() if "lora_" in n]
    elif what == "norms":
        params = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    elif what == "all":
        params = list(model.parameters())
    else:
        raise DropquantError(f"heal.train={what!r}: expected norms, lora or all")
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise DropquantError(f"heal.train={what}: the model has no such parameters")
    return model, params


def finish_trainable(model, what: str):
    """The plain model with what was trained in its weights (LoRA adapters merged)."""
    if what == "lora":
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --- training --------------------------------------------------------------------------------------------------

@dataclass
class DistillResult:
    trained: str
    trainable_params: int
    precision: str = "float32"
    steps: int = 0
    best_step: int = 0
    heldout_kl_start: float = math.nan
    heldout_kl_best: float = math.nan
    heldout: list = field(default_factory=list)  # [step, held-out KL]
    heldout_seconds: list = field(default_factory=list)  # seconds since the start at each held-out evaluation
    train_loss: list = field(default_factory=list)  # [step, mean loss since the last evaluation]
    stopped_early: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def _loss(model, batch: TeacherTargets, hidden_weight: float, device) -> torch.Tensor:
    ids = batch.input_ids.to(device)
    if hidden_weight > 0:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        h = base.model(input_ids=ids, use_cache=False).last_hidden_state
        logits = base.lm_head(h)
        t = batch.hidden.to(device)
        match = ((h.float() - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-12)
    else:
        logits, match = model(input_ids=ids, use_cache=False).logits, 0.0
    return bucket_kl(logits, batch.top_ids.to(device), batch.top_logp.to(device)) + hidden_weight * match


@torch.no_grad()
def heldout_kl(model, targets: TeacherTargets, device, batch_size: int = 1) -> float:
    """Token-weighted bucketed KL of `model` against the teacher on `targets`."""
    model.eval()
    total = 0.0
    for start in range(0, targets.input_ids.shape[0], batch_size):
        batch = targets.select(slice(start, start + batch_size))
        logits = model(input_ids=batch.input_ids.to(device), use_cache=False).logits
        total += float(bucket_kl(logits, batch.top_ids.to(device), batch.top_logp.to(device))) * batch.input_ids.shape[0]
    return total / targets.input_ids.shape[0]


def distill(model, train: TeacherTargets, holdout: TeacherTargets, *, what: str, lora_rank: int, steps: int,
            lr: float, batch_size: int, hidden_weight: float, eval_every: int, patience: int, seed: int,
            device: str = "cpu", precision: str = "float32", progress: bool = True):
    """Train `model` (in memory, float32) towards the teacher; returns (the trained plain model, DistillResult).

    `precision` is the training forward's (bfloat16: autocast); held-out evaluations run in float32, as the
    model is exported."""
    from tqdm import tqdm

    if hidden_weight > 0 and train.hidden is None:
        raise DropquantError("hidden-state matching needs the teacher's hidden states (teacher_targets(hidden=True))")
    forward_precision = training_precision(precision, device)
    deterministic_cublas(device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    start_time = time.perf_counter()
    try:
        model, params = prepare_trainable(model, what, lora_rank, seed)
        result = DistillResult(trained=what, trainable_params=sum(p.numel() for p in params), precision=precision)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        warmup = max(1, steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
        gen = torch.Generator().manual_seed(seed)
        order: list[int] = []

        best = heldout_kl(model, holdout, device)
        result.heldout_kl_start = result.heldout_kl_best = best
        result.heldout.append([0, best])
        result.heldout_seconds.append(round(time.perf_counter() - start_time, 2))
        best_state = {id(p): p.detach().clone() for p in params}
        log.info("distillation: %d trainable parameters (%s), held-out KL %.4f before", result.trainable_params,
                 what, best)
        bad_evals, running = 0, []
        bar = tqdm(range(1, steps + 1), desc=f"distilling ({what})", unit="step", disable=not progress)
        for step in bar:
            model.train()
            if len(order) < batch_size:
                order += torch.randperm(train.input_ids.shape[0], generator=gen).tolist()
            rows, order = torch.tensor(order[:batch_size]), order[batch_size:]
            with forward_precision:
                loss = _loss(model, train.select(rows), hidden_weight, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            running.append(float(loss.detach()))
            bar.set_postfix(loss=f"{sum(running[-10:]) / len(running[-10:]):.4f}", heldout=f"{best:.4f}")
            result.steps = step
            if step % eval_every == 0 or step == steps:
                kl = heldout_kl(model, holdout, device)
                result.heldout.append([step, kl])
                result.heldout_seconds.append(round(time.perf_counter() - start_time, 2))
                result.train_loss.append([step, sum(running) / len(running)])
                running = []
                if kl < best:
                    best, bad_evals, result.best_step = kl, 0, step
                    best_state = {id(p): p.detach().clone() for p in params}
                    log.info("step %d: held-out KL %.4f (new best)", step, kl)
                else:
                    log.info("step %d: held-out KL %.4f (best %.4f at step %d)", step, kl, best, result.best_step)
                    bad_evals += 1
                    if bad_evals >= patience:
                        result.stopped_early = True
                        log.info("held-out KL has not improved for %d evaluations: stopping at step %d", patience, step)
                        break
        bar.close()
        with torch.no_grad():
            for p in params:
                p.copy_(best_state[id(p)])
        result.heldout_kl_best = best
        model = finish_trainable(model, what)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    result.seconds = time.perf_counter() - start_time
    return model.eval(), result
