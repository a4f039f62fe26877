"""Evaluate a variant against the unpruned model: lm-eval accuracy, fidelity (perplexity, KL divergence,
top-1 agreement), chat quality (IFEval, GSM8K, MT-Bench drift) and llama.cpp speed and memory, side by side.

`--baseline` evaluates the unpruned GGUF once (accuracy, the fidelity reference, its chat results and MT-Bench
conversations) into data/baseline/eval, which DVC caches per quant type and eval parameters; the plain stage
reuses it, and writes the metrics, details and the MT-Bench transcripts page. Every llama.cpp model both open
gets `eval.gpu_layers` layers on the GPU (resolved once: dropquant/evaluation/device.py); where it ran is recorded.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dropquant.artifacts import check_same, params_digest, read_gguf_manifest, read_json, read_plan
from dropquant.atomic import atomic_dir, write_json
from dropquant.errors import DropquantError
from dropquant.evaluation.accuracy import evaluate_accuracy, make_lm
from dropquant.evaluation.chat_eval import compare_chat, evaluate_chat
from dropquant.evaluation.device import describe, resolve_gpu_layers
from dropquant.evaluation.fidelity import Reference, build_reference, compare, heldout_text
from dropquant.evaluation.metrics import build_metrics, headline
from dropquant.evaluation.plots import write_heatmap, write_offline_template, write_plots
from dropquant.evaluation.speed import ab_compare
from dropquant.evaluation.tasks import resolve_data_dir
from dropquant.evaluation.transcripts import write_transcripts

log = logging.getLogger("dropquant.evaluate")

VARIANT_GGUF = "data/gguf/model.gguf"
BASE_GGUF = "data/baseline/gguf/model.gguf"
PLAN = "data/drop/plan.json"
BASE_EVAL = "data/baseline/eval"
REFERENCE_GGUF = "data/reference/gguf/model.gguf"
HEALED = "data/healed"
OUT = "data/eval"


def _data_dir(params):
    data_dir = resolve_data_dir(params.eval.data_dir)
    if data_dir is not None and not data_dir.is_dir():
        log.warning("eval.data_dir %s does not exist: reading task data from the Hugging Face hub instead", data_dir)
        return None
    return data_dir


def _reuse_key(params) -> dict:
    """The eval parameters the baseline's numbers depend on: a variant is only compared with a matching baseline."""
    e = params.eval
    return {"tasks": list(e.tasks), "limit": e.limit, "fewshot": e.fewshot, "data_dir": e.data_dir,
            "fidelity_tokens": e.fidelity_tokens, "n_ctx": e.n_ctx, "quant_type": params.quantize.type,
            "chat": e.chat.model_dump(exclude={"transcripts"})}


def _gpu_layers(params) -> int:
    return resolve_gpu_layers(params.eval.gpu_layers, params.model.device)


BASE_HINT = "run the baseline stage: python -m stages.quantize --baseline"
BASE_EVAL_HINT = "run the baseline_eval stage: python -m stages.evaluate --baseline"


def run_baseline(params, args) -> None:
    e = params.eval
    base = Path(args.base_gguf)
    base_manifest = read_gguf_manifest(base.parent, BASE_HINT)
    gpu = _gpu_layers(params)
    data_dir = _data_dir(params)
    accuracy = evaluate_accuracy(make_lm(base, e.n_ctx, e.threads, gpu_layers=gpu), list(e.tasks), e.limit, e.fewshot,
                                 data_dir)
    ref = None
    if e.fidelity_tokens:
        text, source = heldout_text(data_dir)
        ref = build_reference(base, text, e.fidelity_tokens, e.threads, source=source, gpu_layers=gpu)
    chat = evaluate_chat(base, e.chat, e.threads, data_dir, gpu_layers=gpu) if e.chat.tasks else None
    with atomic_dir(args.base_eval) as tmp:
        write_json(tmp / "accuracy.json", accuracy)
        if chat is not None:
            write_json(tmp / "chat.json", chat)
        if ref is not None:
            ref.save(tmp / "fidelity_ref.npz")
        write_json(tmp / "manifest.json", {"gguf": str(base), "gguf_bytes": os.path.getsize(base),
                                           "gguf_sha256": base_manifest["sha256"],
                                           "base_ppl": ref.ppl if ref is not None else None,
                                           "params": _reuse_key(params), "device": describe(gpu, base)})
    log.info("baseline: avg %s, ppl %s -> %s", accuracy["avg"], ref.ppl if ref is not None else None, args.base_eval)


def check_inputs(params, args) -> dict:
    """Variant GGUF <-> plan, base GGUF <-> same model and quant type, baseline evaluation <-> base GGUF and
    parameters: all checked before any work, so a stale or mismatched input is one clear error."""
    variant_dir, base_dir = Path(args.gguf).parent, Path(args.base_gguf).parent
    variant = read_gguf_manifest(variant_dir, "run the quantize stage")
    base = read_gguf_manifest(base_dir, BASE_HINT)
    plan = read_plan(args.plan)
    hint = "re-run the quantize stage (dvc repro does)"
    check_same(f"{variant_dir}/manifest.json", "plan_id", variant.get("plan_id"), plan["plan_id"], hint)
    check_same(f"{base_dir}/manifest.json", "model fingerprint", (base.get("model") or {}).get("fingerprint"),
               (variant.get("model") or {}).get("fingerprint"), f"the base GGUF is another model's; {BASE_HINT}")
    for who, manifest in (("variant", variant), ("base", base)):
        check_same(f"{who} GGUF manifest", "type", manifest.get("type"), params.quantize.type,
                   f"quantize.type is {params.quantize.type}; {hint if who == 'variant' else BASE_HINT}")
    base_eval = Path(args.base_eval)
    manifest = read_json(base_eval / "manifest.json", "baseline evaluation", BASE_EVAL_HINT)
    if manifest.get("params") != _reuse_key(params):
        raise DropquantError(f"{base_eval} was computed with {manifest.get('params')}, but the current parameters are "
                             f"{_reuse_key(params)}: rerun python -m stages.evaluate --baseline (dvc repro does)")
    check_same(f"{base_eval}/manifest.json", "gguf_sha256", manifest.get("gguf_sha256"), base["sha256"],
               "rerun python -m stages.evaluate --baseline (dvc repro does)")
    heal = (variant.get("heal") or {}).get("method") or "none"
    check_same(f"{variant_dir}/manifest.json", "heal method", heal, params.heal.method, hint)
    if params.quantize.type == "mix":
        for who, manifest in (("variant", variant), ("base", base)):
            check_same(f"{who} GGUF manifest", "mix target", (manifest.get("mix") or {}).get("target"),
                       params.quantize.target, "run the quantize and baseline stages")
    reference = check_reference(params, args, (variant.get("model") or {}).get("fingerprint"))
    return {"plan": plan, "gguf_sha256": variant["sha256"], "base_gguf_sha256": base["sha256"], "heal": heal,
            "reference": reference, "heal_kl": heal_recovery(args, variant, heal), "mix": variant.get("mix"),
            "base_device": manifest.get("device")}


def heal_recovery(args, variant: dict, heal: str) -> dict | None:
    """The heal stage's held-out KL of the unhealed and the healed checkpoint (heal.json), for the heal that made
    this GGUF; None for an unhealed variant or a heal record from before it was measured."""
    if heal == "none":
        return None
    path = Path(args.healed) / "heal.json"
    record = read_json(path, "heal record", "run the heal stage (dvc repro does)")
    check_same(str(path), "heal_id", record.get("heal_id"), (variant.get("heal") or {}).get("heal_id"),
               "the GGUF was quantized from another heal; re-run the quantize stage (dvc repro does)")
    return record.get("heldout_kl")


def check_reference(params, args, variant_model: str | None) -> dict | None:
    """eval.source_kld: the reference GGUF's manifest, checked against the variant's model before any work."""
    if not params.eval.source_kld or not params.eval.fidelity_tokens:
        return None
    ref_dir = Path(args.reference_gguf).parent
    hint = "run the reference stage: python -m stages.quantize --reference (dvc repro does)"
    manifest = read_json(ref_dir / "manifest.json", "reference GGUF manifest", hint)
    if not manifest.get("requested", True):
        raise DropquantError(f"{ref_dir} holds no reference GGUF (written with eval.source_kld: false); {hint}")
    check_same(f"{ref_dir}/manifest.json", "model fingerprint", (manifest.get("model") or {}).get("fingerprint"),
               variant_model, f"the reference GGUF is another model's; {hint}")
    return manifest


def source_fidelity(params, args, variant: Path, data_dir, manifest: dict, gpu_layers: int = 0) -> dict:
    """Fidelity against the unpruned model in its source precision (data/reference/gguf), the same scale for
    every quant type (the one `python -m flows search` budgets on)."""
    e = params.eval
    text, origin = heldout_text(data_dir)
    logits: list = []
    ref = build_reference(args.reference_gguf, text, e.fidelity_tokens, e.threads, source=origin, keep_logits=logits,
                          gpu_layers=gpu_layers)
    out = compare(variant, ref, e.threads, cached_base=logits, gpu_layers=gpu_layers)
    out["reference_type"] = manifest.get("type")
    return out


def run_variant(params, args) -> None:
    e = params.eval
    inputs = check_inputs(params, args)
    variant, base, base_eval = Path(args.gguf), Path(args.base_gguf), Path(args.base_eval)
    base_accuracy = json.loads((base_eval / "accuracy.json").read_text())
    plan = inputs["plan"]
    method, n = plan["method"], plan["n"]
    gpu = _gpu_layers(params)
    device = describe(gpu, variant)
    base_device = inputs["base_device"]
    if base_device is not None and base_device.get("device") != device["device"]:
        log.warning("the baseline evaluation ran on %s, this variant on %s: their accuracy is compared across devices "
                    "(llama.cpp's kernels round differently); `dvc repro -f baseline_eval` re-measures the base here",
                    base_device.get("device"), device["device"])

    data_dir = _data_dir(params)
    accuracy = evaluate_accuracy(make_lm(variant, e.n_ctx, e.threads, gpu_layers=gpu), list(e.tasks), e.limit,
                                 e.fewshot, data_dir)
    fidelity = compare(variant, Reference.load(base_eval / "fidelity_ref.npz"), e.threads, base_path=base,
                       kld=e.kld, gpu_layers=gpu) if e.fidelity_tokens else None
    fidelity_source = (source_fidelity(params, args, variant, data_dir, inputs["reference"], gpu)
                       if inputs["reference"] is not None else None)
    chat = base_chat = None
    if e.chat.tasks:
        base_chat = read_json(base_eval / "chat.json", "baseline chat results", BASE_EVAL_HINT)
        chat = compare_chat(variant, base, e.chat, e.threads, data_dir, base_chat, gpu_layers=gpu)
    speed = ab_compare(variant, base, rounds=e.speed_rounds, max_rounds=e.speed_max_rounds, tolerance=e.speed_tolerance,
                       threads=e.speed_threads, tg_tokens=e.speed_tg_tokens, gpu_layers=gpu) if e.speed else None

    metrics = build_metrics(method=method, n=n, quant_type=params.quantize.type, tasks=list(e.tasks),
                            accuracy=accuracy, base_accuracy=base_accuracy, fidelity=fidelity, speed=speed,
                            variant_bytes=os.path.getsize(variant), chat=chat, heal=inputs["heal"],
                            base_bytes=os.path.getsize(base), device=device)
    if fidelity_source is not None:
        metrics["kld_source"] = fidelity_source["kld"]
        metrics["kld_source_stderr"] = fidelity_source["kld_stats"]["stderr"]
    metrics["heal_kl"] = inputs["heal_kl"]
    metrics["mix"] = inputs["mix"]  # quantize.type: mix: the types, each tensor's cost, the bits per weight
    # What these numbers measured: `dvc exp show` lists it, and a report refuses metrics of another variant.
    metrics["variant"] = {"plan_id": plan["plan_id"], "gguf_sha256": inputs["gguf_sha256"][:16],
                          "base_gguf_sha256": inputs["base_gguf_sha256"][:16],
                          "model": (plan.get("model") or {}).get("fingerprint"), "params": params_digest(params)}
    out = Path(args.out)
    label = f"{method}-{n} {params.quantize.type}" + ("" if inputs["heal"] == "none" else f" healed ({inputs['heal']})")
    with atomic_dir(out / "plots") as tmp:
        write_plots(tmp, accuracy, base_accuracy, speed, label)
        write_heatmap(tmp / "heatmap.png", plan, f"{label}: red x = dropped")
        write_offline_template(tmp / "offline_template.html")
    mt = (chat or {}).get("mt_bench")
    with atomic_dir(out / "transcripts") as tmp:
        if mt is not None:
            write_transcripts(tmp, base_chat["mt_bench"], mt["conversations"], mt["teacher_forced"],
                              e.chat.transcripts, label, summary=mt["summary"])
    # details.json: every figure (`metrics`, which `dropquant report` and the plots read) and the raw sections.
    write_json(out / "details.json", {"metrics": metrics, "accuracy": accuracy, "base_accuracy": base_accuracy,
                                      "fidelity": fidelity, "fidelity_source": fidelity_source, "chat": chat,
                                      "speed": speed, "heal_kl": inputs["heal_kl"], "plan": plan_summary(plan),
                                      "variant": str(variant), "base": str(base), "base_device": base_device})
    write_json(out / "metrics.json", headline(metrics))
    log.info("evaluate %s: avg %s (base %s), ppl %s (base %s), kld %s, top1 %s, speedup pp %s tg %s",
             label, metrics["avg"], metrics["base_avg"], metrics["ppl"], metrics["base_ppl"], metrics["kld"],
             metrics["top1_agree"], metrics["speedup_pp"], metrics["speedup_tg"])
    if e.chat.tasks:
        ifeval, gsm8k, mt_m = (metrics["chat"][t] for t in ("ifeval", "gsm8k", "mt_bench"))
        log.info("chat %s: ifeval prompt-strict %s (base %s), gsm8k %s (base %s), mt_bench kld %s rougeL %s loops %s "
                 "(base %s)", label, ifeval["prompt_strict"], ifeval["prompt_strict_base"], gsm8k["strict"],
                 gsm8k["strict_base"], mt_m["kld"], mt_m["rougeL"], mt_m["loop_rate"], mt_m["base_loop_rate"])


def plan_summary(plan: dict) -> dict:
    """What the report says about the plan: the dropped units and the model, without its scores."""
    return {k: plan.get(k) for k in ("method", "n", "selection", "attn", "mlp", "blocks", "num_layers", "plan_id",
                                     "model")}


def run(params, args) -> None:
    (run_baseline if args.baseline else run_variant)(params, args)


def add_arguments(parser) -> None:
    parser.add_argument("--baseline", action="store_true",
                        help="evaluate the unpruned GGUF once (accuracy + fidelity reference) into data/baseline/eval")
    parser.add_argument("--gguf", default=VARIANT_GGUF, help=f"variant GGUF (default {VARIANT_GGUF})")
    parser.add_argument("--base-gguf", default=BASE_GGUF, help=f"unpruned GGUF, same quant type (default {BASE_GGUF})")
    parser.add_argument("--plan", default=PLAN, help=f"drop plan the variant was cut by (default {PLAN})")
    parser.add_argument("--base-eval", default=BASE_EVAL, help=f"baseline evaluation folder (default {BASE_EVAL})")
    parser.add_argument("--reference-gguf", default=REFERENCE_GGUF,
                        help=f"unpruned GGUF in its own precision, for eval.source_kld (default {REFERENCE_GGUF})")
    parser.add_argument("--healed", default=HEALED,
                        help=f"heal stage output, for a healed variant's held-out KL (default {HEALED})")
    parser.add_argument("--out", default=OUT, help=f"output folder (default {OUT})")


def main(argv=None) -> int:
    from stages._cli import stage_main

    return stage_main("evaluate", __doc__, run, argv, add_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
