"""Quantize: the pruned (or healed) checkpoint -> a GGUF file that llama.cpp runs, at quantize.type
(--baseline: the unpruned model). heal.json says which checkpoint: the heal stage's, or the pruned one as it is.

--reference: the unpruned model in its source precision (F32/F16/BF16, not quantized), the one scale
`eval.source_kld` measures every variant on; with eval.source_kld false only a manifest saying so is written."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from stages._cli import stage_main

log = logging.getLogger("dropquant.quantize")
PRUNED = Path("data/pruned")
PLAN = Path("data/drop/plan.json")
HEALED = Path("data/healed")
CALIBRATION = Path("data/calibration/tokens.safetensors")
SCORES = Path("data/scores/scores.json")
OUT = Path("data/gguf")
BASELINE_OUT = Path("data/baseline/gguf")
REFERENCE_OUT = Path("data/reference/gguf")


def run(params, args) -> None:
    from dropquant.artifacts import check_pruned_matches_plan, file_sha256, read_calibration, read_json, read_plan
    from dropquant.atomic import atomic_dir, write_json
    from dropquant.errors import DropquantError
    from dropquant.model.families import check_gguf_expressible
    from dropquant.naming import model_name
    from dropquant.gguf.export import export_checkpoint, export_model
    from dropquant.heal.apply import read_heal
    from dropquant.model.layerwise import InMemoryStack, checkpoint_stack, source_stack
    from dropquant.model.loading import (checkpoint_dir, load_config, load_model, model_identity, resolve_device,
                                         resolve_dtype, resolve_source)
    from dropquant.gguf.quantize import NEEDS_IMATRIX, UNQUANTIZED, llama_ftype, quantize_gguf
    from dropquant.gguf.imatrix import (collect_imatrix_stack, imatrix_means, module_gguf_names, neutral_stats,
                                        write_imatrix)

    if args.reference and not params.eval.source_kld:
        with atomic_dir(args.out or REFERENCE_OUT) as tmp:
            write_json(tmp / "manifest.json", {"requested": False, "reason": "eval.source_kld is false"})
        log.info("reference: not requested (eval.source_kld: false)")
        return
    from dropquant.gguf.mix import MIX

    qtype = "source" if args.reference else params.quantize.type
    if not args.reference and qtype != MIX:
        llama_ftype(qtype)
    mix_by = params.quantize.mix_by if qtype == MIX and not args.reference else None
    if qtype in NEEDS_IMATRIX and not params.quantize.imatrix:
        raise DropquantError(f"quantize.type={qtype} needs an importance matrix: set quantize.imatrix: true")
    use_imatrix = params.quantize.imatrix and qtype not in UNQUANTIZED and not args.reference
    if params.quantize.imatrix and not use_imatrix and not args.reference:
        log.info("quantize.imatrix ignored: %s is not a quantized type", qtype)
    source = resolve_source(params.model.source, params.model.revision)
    config = load_config(source)
    identity = model_identity(config, source)
    out = args.out or (REFERENCE_OUT if args.reference else BASELINE_OUT if args.baseline else OUT)
    calibration = read_calibration(args.calibration, identity)[0] if use_imatrix or mix_by == "sensitivity" else None
    importance = _importance(args.scores, identity, config.num_hidden_layers) if mix_by == "importance" else None
    dtype, device = resolve_dtype(params.model.dtype, source), resolve_device(params.model.device)

    heal_record = None
    if args.baseline or args.reference:
        plan = kept_layers = None
        directory = checkpoint_dir(source)  # None: a GGUF source, loaded (dequantized) whole
        check_gguf_expressible(config, [], [], source.spec)
    else:
        from dropquant.prune.selection import DropPlan
        from dropquant.prune.surgery import RECORD_KEY, layout_for_plan

        # The plan must be this model's, and the checkpoint the one it cut: checked before any weight is read.
        plan = read_plan(args.plan, identity)
        pruned_config = read_json(args.pruned / "config.json", "pruned checkpoint", "run the drop stage")
        check_pruned_matches_plan(pruned_config.get(RECORD_KEY), plan, args.pruned, args.plan)
        check_gguf_expressible(config, *layout_for_plan(DropPlan.from_json(plan))[1:], source.spec,
                               method=plan["method"])
        heal_record, healed = read_heal(args.healed, plan, params.heal)
        kept_layers = (pruned_config.get(RECORD_KEY) or {}).get("kept_layers")  # original index of each layer
        directory = healed or args.pruned

    with atomic_dir(out) as tmp:
        # Tokenizer: a GGUF source's own tokenizer keys are carried over verbatim; otherwise the checkpoint's.
        tok = {"tokenizer_gguf": source.gguf_path} if source.gguf_path is not None else {}
        name = f"{source.spec} {'reference' if args.reference else 'baseline' if args.baseline else 'dropquant'}"
        intermediate = tmp / "model.source.gguf"
        model = None
        if directory is not None:
            log.info("exporting %s to GGUF in its own precision, tensor by tensor", directory)
            info = export_checkpoint(directory, intermediate, name=name, **tok)
        else:
            model = load_model(source, dtype)
            log.info("exporting the unpruned model to GGUF")
            info = export_model(model, intermediate, name=name, **tok)
        log.info("layout: %s", json.dumps({k: v for k, v in info.summary().items() if k != "source_layers"}))

        def open_stack():
            """The model the GGUF was exported from, layer by layer (streamed when it does not fit)."""
            if model is not None:
                return InMemoryStack(model)
            if args.baseline:
                return source_stack(source, dtype, device, params.model.stream)
            return checkpoint_stack(directory, dtype, device, params.model.stream)

        imatrix_record = None
        means = None
        if use_imatrix:
            modules = module_gguf_names(info.tensor_names)
            stack = open_stack()
            stats = collect_imatrix_stack(stack, calibration, modules, batch_size=1, progress=True)
            del stack
            n_tok = int(calibration.numel())
            stats.update(neutral_stats(list(info.standin_columns), info.standin_columns, n_tok))
            write_imatrix(tmp / "imatrix.gguf", stats, chunk_size=calibration.shape[1],
                          chunk_count=calibration.shape[0], datasets=[str(args.calibration)])
            means = imatrix_means(stats)
            imatrix_record = {"file": "imatrix.gguf", "tensors": len(stats), "tokens": n_tok}
            log.info("importance matrix: %d tensors from %d calibration tokens", len(stats), n_tok)

        final = tmp / "model.gguf"
        mix_summary = None
        if qtype != MIX:
            model = None  # llama.cpp quantizes from the file: the torch model's memory goes first
        if args.reference:
            qtype = info.out_type
        if qtype == MIX:
            from dropquant.gguf.mix_build import build_mix
            from dropquant.plots import mix_heatmap

            q = params.quantize
            mix_summary = build_mix(intermediate, final, target=q.target, types=q.mix_types, by=q.mix_by, info=info,
                                    open_stack=open_stack, tokens=calibration, mix_tokens=q.mix_tokens,
                                    importance=importance, layer_map=kept_layers, imatrix=means,
                                    work=tmp / "mix-candidates")
            intermediate.unlink()
            mix_heatmap(mix_summary, tmp / "mix.png", f"{model_name(source.spec)}"
                        f"{'' if plan is None else ' ' + plan['method'] + '-' + str(plan['n'])}: types per tensor")
        elif qtype == info.out_type:
            intermediate.rename(final)
        else:
            log.info("quantizing %s to %s with llama.cpp%s", info.out_type, qtype,
                     " and the importance matrix" if means else "")
            quantize_gguf(intermediate, final, qtype, imatrix=means)
            intermediate.unlink()
        manifest = {
            "type": qtype,
            "size_bytes": final.stat().st_size,
            "sha256": file_sha256(final),
            "arch": info.arch,
            "source_type": info.out_type,  # the GGUF type llama.cpp quantized from: the checkpoint's own precision
            "plan": plan,
            "plan_id": None if plan is None else plan["plan_id"],
            "model": identity,
            "baseline": bool(args.baseline),
            "reference": bool(args.reference),
            "heal": None if heal_record is None else {k: heal_record.get(k) for k in ("method", "heal_id")},
            "imatrix": imatrix_record,
            "layout": info.summary(),
            "mix": mix_summary,
        }
        write_json(tmp / "manifest.json", manifest)
    log.info("wrote %s/model.gguf (%s, %s, %.1f MB)", out, qtype, info.arch, manifest["size_bytes"] / 1e6)


def _importance(path: Path, identity: dict, n_layers: int) -> dict:
    """The drop scores' importance, for quantize.mix_by: importance: this model's, or one error saying so."""
    from dropquant.artifacts import read_json
    from dropquant.prune.selection import check_scores

    scores = read_json(path, "scores", "run the score stage (quantize.mix_by: importance reads them)")
    check_scores(scores, n_layers, identity["fingerprint"], origin=str(path))
    return scores["importance"]


def main(argv=None) -> int:
    def add(p):
        p.add_argument("--baseline", action="store_true",
                       help=f"export the unpruned model.source instead (default output {BASELINE_OUT})")
        p.add_argument("--reference", action="store_true",
                       help=f"the unpruned model in its own precision, for eval.source_kld (default output {REFERENCE_OUT})")
        p.add_argument("--pruned", type=Path, default=PRUNED, help=f"pruned checkpoint (default {PRUNED})")
        p.add_argument("--plan", type=Path, default=PLAN, help=f"drop plan (default {PLAN})")
        p.add_argument("--healed", type=Path, default=HEALED, help=f"the heal stage's output (default {HEALED})")
        p.add_argument("--scores", type=Path, default=SCORES,
                       help=f"drop scores, read by quantize.mix_by: importance (default {SCORES})")
        p.add_argument("--calibration", type=Path, default=CALIBRATION,
                       help=f"calibration tokens for quantize.imatrix (default {CALIBRATION})")
        p.add_argument("--out", type=Path, default=None, help=f"output directory (default {OUT}, or {BASELINE_OUT})")
    return stage_main("quantize", __doc__, run, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
