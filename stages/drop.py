"""Drop: choose the attention layers, MLPs or blocks to remove (one shot, from the scores) and write the pruned model."""
from __future__ import annotations

import logging
from pathlib import Path

from stages._cli import stage_main

log = logging.getLogger("dropquant.drop")
SCORES = Path("data/scores/scores.json")
CALIBRATION = Path("data/calibration")
PLAN_DIR = Path("data/drop")
PRUNED = Path("data/pruned")
EXPORT = Path("data/export")


def run(params, args) -> None:
    from dropquant.artifacts import PLAN_ID, check_scores_calibration, file_sha256, plan_id, read_json
    from dropquant.atomic import atomic_dir, write_json
    from dropquant.model.families import check_gguf_expressible
    from dropquant.model.layerwise import should_stream
    from dropquant.model.loading import (build_skeleton, checkpoint_dir, load_config, load_model, load_tokenizer,
                                         model_identity, resolve_dtype, resolve_source)
    from dropquant.prune.pruned_checkpoint import checkpoint_tensor_bytes, save_pruned, save_pruned_from
    from dropquant.prune.surgery import dropped_parameters, layout_for_plan, prune_model, summary
    from dropquant.prune.selection import check_scores, describe, select

    # Everything that can be refused is checked before a weight is loaded or a file written.
    source = resolve_source(params.model.source, params.model.revision)
    config = load_config(source)
    n_layers = config.num_hidden_layers
    identity = model_identity(config, source)
    # Only importance/contiguous selection needs scores; select() says so when they are missing.
    scores = read_json(args.scores, "scores", "run the score stage") if args.scores.is_file() else None
    if scores is not None:
        check_scores(scores, n_layers, identity["fingerprint"], origin=str(args.scores))
        check_scores_calibration(scores, args.calibration, str(args.scores))
    if params.drop.export == "nemotron-nas":
        from dropquant.prune.nemotron import check_exportable

        check_exportable(config.model_type)
    plan = select(params, n_layers, scores)
    # The pipeline exports every plan as a GGUF: one it cannot express is refused here, not after drop and heal.
    _, sub_attn, sub_mlp = layout_for_plan(plan)
    check_gguf_expressible(config, sub_attn, sub_mlp, source.spec, method=params.drop.method)
    log.info("plan: %s", describe(plan))
    record = {**plan.to_json(identity), "scores_sha256": file_sha256(args.scores) if scores is not None else None}
    record[PLAN_ID] = plan_id(record)

    # The pruned checkpoint keeps the source's precision (model.dtype: auto). Streamed, the model is only
    # its meta-device skeleton and the kept tensors are copied from the checkpoint one by one.
    dtype = resolve_dtype(params.model.dtype, source)
    directory = checkpoint_dir(source)
    streamed = should_stream(params.model.stream, directory, dtype, "cpu", source.spec)
    model = build_skeleton(config, dtype) if streamed else load_model(source, dtype)
    before = summary(model)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dropped = dropped_parameters(model, plan)
    prune_model(model, plan)
    model.config.dropquant[PLAN_ID] = record[PLAN_ID]  # the checkpoint names the plan that cut it
    after = summary(model)
    if streamed:
        save_pruned_from(model, directory, args.pruned, tokenizer=load_tokenizer(source))
    else:
        save_pruned(model, args.pruned, tokenizer=load_tokenizer(source))
    written = checkpoint_tensor_bytes(args.pruned)
    if written != base_bytes - dropped["bytes"]:
        log.warning("checkpoint holds %d tensor bytes, expected %d", written, base_bytes - dropped["bytes"])
    log.info("pruned model: %d -> %d layers, %d -> %d attention, %d -> %d MLP; %d -> %d parameters",
             before["layers"], after["layers"], before["attention_layers"], after["attention_layers"],
             before["mlp_layers"], after["mlp_layers"], before["params"], after["params"])
    log.info("checkpoint tensors (%s) %.1f MB -> %.1f MB (-%.1f MB, -%.1f%%)", str(dtype).removeprefix("torch."),
             base_bytes / 1e6, written / 1e6, dropped["bytes"] / 1e6, 100 * dropped["bytes"] / base_bytes)

    export = {"export": params.drop.export}
    if params.drop.export == "nemotron-nas":
        from dropquant.prune.nemotron import export_nemotron

        export["path"] = str(args.export / "nemotron-nas")
        with atomic_dir(args.export) as tmp:
            export_nemotron(args.pruned, tmp / "nemotron-nas")
            write_json(tmp / "manifest.json", export)
        log.info("wrote the Nemotron-NAS (DeciLM) layout to %s", export["path"])
    else:
        with atomic_dir(args.export) as tmp:
            write_json(tmp / "manifest.json", export)

    result = {
        **record,
        "kept_layers": model.config.dropquant["kept_layers"],
        "size": {"base_tensor_bytes": base_bytes, "pruned_tensor_bytes": written,
                 "dropped_params": dropped["params"], "dropped_bytes": dropped["bytes"],
                 "base_params": before["params"], "pruned_params": after["params"],
                 "dtype": str(dtype).removeprefix("torch."), "streamed": streamed},
    }
    write_json(args.plan / "plan.json", result)  # last: its presence means the stage finished
    log.info("wrote %s and %s", args.plan / "plan.json", args.pruned)


def main(argv=None) -> int:
    def add(p):
        p.add_argument("--scores", type=Path, default=SCORES, help=f"scores file (default {SCORES})")
        p.add_argument("--calibration", type=Path, default=CALIBRATION,
                       help=f"calibration folder the scores must come from, when present (default {CALIBRATION})")
        p.add_argument("--plan", type=Path, default=PLAN_DIR, help=f"plan directory (default {PLAN_DIR})")
        p.add_argument("--pruned", type=Path, default=PRUNED, help=f"pruned checkpoint directory (default {PRUNED})")
        p.add_argument("--export", type=Path, default=EXPORT,
                       help=f"directory for drop.export layouts (default {EXPORT})")
    return stage_main("drop", __doc__, run, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
