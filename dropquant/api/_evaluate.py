"""`evaluate`: a GGUF file against the unpruned model's, as the baseline_eval and evaluate stages measure it.

stages/evaluate.py keeps its own body (long, and changed by others): this calls the same library functions in the
same order (accuracy and the fidelity reference of the base, then accuracy, fidelity and speed of the variant, then
`build_metrics`). The base's logits are kept from building the reference instead of running the base again, as the
stage's source-precision fidelity does. What is not here: chat quality and the transcripts page; use the stage.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from dropquant.api._common import build_params, existing_path
from dropquant.errors import DropquantError

log = logging.getLogger("dropquant.evaluate")


@dataclass
class Evaluation:
    """The evaluate stage's numbers for one variant against its base.

    Attributes:
        metrics: metrics.json as the evaluate stage computes it (``kld``, ``ppl``, ``base_ppl``, ``top1_agree``,
            ``avg``, ``base_avg``, ``avg_delta``, ``tasks``, ``size_mb``, the speed-ups when measured, ...).
        accuracy: lm-eval results of the variant per task (with item counts).
        base_accuracy: the same for the base.
        fidelity: perplexity, KL divergence and top-1 agreement in detail (None when ``fidelity_tokens=0``).
        speed: llama.cpp speed and memory, variant against base (None unless ``speed=True``).
        variant: the GGUF evaluated.
        base: the base GGUF it was compared with.
    """

    metrics: dict
    accuracy: dict = field(repr=False)
    base_accuracy: dict = field(repr=False)
    fidelity: Optional[dict] = field(default=None, repr=False)
    speed: Optional[dict] = field(default=None, repr=False)
    variant: Optional[Path] = None
    base: Optional[Path] = None

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]

    @property
    def kld(self) -> Optional[float]:
        """Mean KL divergence of the variant's next-token distribution from the base's."""
        return self.metrics.get("kld")

    @property
    def ppl(self) -> Optional[float]:
        return self.metrics.get("ppl")

    @property
    def base_ppl(self) -> Optional[float]:
        return self.metrics.get("base_ppl")

    @property
    def top1_agree(self) -> Optional[float]:
        """Share of tokens where variant and base agree on the most likely next token."""
        return self.metrics.get("top1_agree")

    @property
    def avg(self) -> Optional[float]:
        """Average accuracy over the tasks both were evaluated on (None without tasks)."""
        return self.metrics.get("avg")

    def __str__(self) -> str:
        m = self.metrics
        lines = [f"{m['method']}-{m['n']} {m['quant_type']}: {m['size_mb']} MB"]
        if m.get("ppl") is not None:
            lines.append(f"fidelity: KLD {m['kld']}, top-1 {m['top1_agree']}, ppl {m['ppl']} (base {m['base_ppl']})")
        for task, t in m["tasks"].items():
            lines.append(f"{task}: acc_norm {t['acc_norm']} (base {t['base_acc_norm']}), acc {t['acc']} "
                         f"(base {t['base_acc']})")
        if m.get("avg") is not None:
            lines.append(f"average: {m['avg']} (base {m['base_avg']}, delta {m['avg_delta']})")
        if m.get("speedup_pp") is not None:
            lines.append(f"speed-up: prompt {m['speedup_pp']}x, generation {m['speedup_tg']}x")
        return "\n".join(lines)


def _data_dir(value: Optional[str]) -> Optional[Path]:
    from dropquant.evaluation.tasks import resolve_data_dir

    data_dir = resolve_data_dir(value)
    if data_dir is not None and not data_dir.is_dir():
        log.warning("data_dir %s does not exist: reading task data from the Hugging Face hub instead", data_dir)
        return None
    return data_dir


def _base_gguf(base, quant_type: Optional[str], scratch: Path) -> Path:
    """`base` as a GGUF file: a .gguf path as it is, else the model exported like the variant (same type)."""
    from dropquant.api._gguf import to_gguf

    if not isinstance(base, (str, os.PathLike)):
        raise DropquantError(f"base: expected a GGUF path or a model id/path, got {type(base).__name__}")
    spec = os.fspath(base)
    if spec.endswith(".gguf") and Path(spec).expanduser().is_file() and spec != "embedded":
        return Path(spec).expanduser()
    if quant_type is None:
        raise DropquantError("base: the variant has no manifest saying its quant type, so the base cannot be "
                             "exported to match it: pass the base as a GGUF file")
    return to_gguf(spec, scratch / f"base-{quant_type}.gguf", quant_type)


def evaluate(gguf: Union[str, "os.PathLike[str]"], base: Union[str, "os.PathLike[str]"], *,
             tasks: Sequence[str] = (), limit: int = 100, fewshot: Union[int, str] = 0,
             data_dir: Optional[str] = "../shared/data", fidelity_tokens: int = 4096, kld: str = "full",
             threads: int = 2, n_ctx: int = 2048, speed: bool = False,
             gpu_layers: Union[str, int] = "auto") -> Evaluation:
    """Measure a GGUF file against the unpruned model's, as the evaluate stage does.

    Args:
        gguf: the variant, e.g. from :func:`dropquant.to_gguf`.
        base: the unpruned model: a GGUF file, or a model id/path (``"embedded"``, a hub id, an HF directory),
            then exported at the variant's quant type first (as the baseline stage does).
        tasks: lm-eval tasks for accuracy (``eval.tasks``: ``arc_easy``, ``hellaswag``, ``piqa``, ...); none by
            default. Their data is read from ``data_dir``; a task whose data is missing is skipped with a warning.
        limit: items per task (0 = all).
        fewshot: shots per task, or ``"paper"``.
        data_dir: the shared benchmark data folder (relative paths from the workspace).
        fidelity_tokens: held-out tokens for perplexity, KL divergence and top-1 agreement (0 = off; else at least
            one chunk of 512).
        kld: ``"full"`` (whole-vocabulary KL) or ``"top64-bound"`` (a cheap lower bound).
        threads: llama.cpp threads.
        n_ctx: llama.cpp context for the tasks.
        speed: also measure llama.cpp speed and memory, variant against base (minutes).
        gpu_layers: llama.cpp layers on the GPU (``eval.gpu_layers``): ``"auto"`` (every layer where the llama.cpp
            build has a GPU backend, else none), ``-1`` (every layer) or a number; refused without a GPU backend.

    Returns:
        An :class:`Evaluation`; ``result.kld``, ``result["avg"]``, ``print(result)``.

    Raises:
        DropquantError: a bad argument (named in the message) or an unreadable file.
    """
    from dropquant.api._gguf import read_manifest
    from dropquant.evaluation.accuracy import evaluate_accuracy, make_lm
    from dropquant.evaluation.device import describe, resolve_gpu_layers
    from dropquant.evaluation.fidelity import build_reference, compare, heldout_text
    from dropquant.evaluation.metrics import build_metrics
    from dropquant.evaluation.speed import ab_compare

    tasks = list(tasks) if isinstance(tasks, (list, tuple)) else tasks
    params = build_params("evaluate", {
        "tasks": ("eval.tasks", tasks), "limit": ("eval.limit", limit), "fewshot": ("eval.fewshot", fewshot),
        "data_dir": ("eval.data_dir", data_dir), "fidelity_tokens": ("eval.fidelity_tokens", fidelity_tokens),
        "kld": ("eval.kld", kld), "threads": ("eval.threads", threads), "n_ctx": ("eval.n_ctx", n_ctx),
        "speed": ("eval.speed", speed), "gpu_layers": ("eval.gpu_layers", gpu_layers)})
    e = params.eval
    gpu = resolve_gpu_layers(e.gpu_layers, params.model.device)
    variant = existing_path(gguf, "gguf")
    manifest = read_manifest(variant) or {}
    plan = manifest.get("plan") or {}
    with tempfile.TemporaryDirectory(prefix="dropquant-eval-") as scratch:
        base_path = _base_gguf(base, manifest.get("type"), Path(scratch))
        data = _data_dir(e.data_dir)
        empty = {"tasks": {}, "skipped": [], "avg": None}
        base_accuracy = (evaluate_accuracy(make_lm(base_path, e.n_ctx, e.threads, gpu_layers=gpu), list(e.tasks),
                                           e.limit, e.fewshot, data) if e.tasks else empty)
        fidelity, logits = None, [] if e.kld == "full" else None
        ref = None
        if e.fidelity_tokens:
            text, origin = heldout_text(data)
            ref = build_reference(base_path, text, e.fidelity_tokens, e.threads, source=origin, keep_logits=logits,
                                  gpu_layers=gpu)
        accuracy = (evaluate_accuracy(make_lm(variant, e.n_ctx, e.threads, gpu_layers=gpu), list(e.tasks), e.limit,
                                      e.fewshot, data) if e.tasks else empty)
        if ref is not None:
            fidelity = compare(variant, ref, e.threads, cached_base=logits, kld=e.kld, gpu_layers=gpu)
        speed_result = ab_compare(variant, base_path, rounds=e.speed_rounds, max_rounds=e.speed_max_rounds,
                                  tolerance=e.speed_tolerance, threads=e.speed_threads,
                                  tg_tokens=e.speed_tg_tokens, gpu_layers=gpu) if e.speed else None
        metrics = build_metrics(method=plan.get("method", "none" if manifest.get("baseline") else "unknown"),
                                n=plan.get("n", 0), quant_type=manifest.get("type", "unknown"), tasks=list(e.tasks),
                                accuracy=accuracy, base_accuracy=base_accuracy, fidelity=fidelity, speed=speed_result,
                                variant_bytes=os.path.getsize(variant),
                                heal=(manifest.get("heal") or {}).get("method") or "none", device=describe(gpu, variant))
        kept_base = base_path if Path(base_path).parent != Path(scratch) else None
    return Evaluation(metrics, accuracy, base_accuracy, fidelity, speed_result, variant, kept_base)
