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
    from dropquant.artifacts import PLAN_ID, check_scores_calibration, file_sha256, read_json
    from dropquant.atomic import atomic_dir, write_json
    from dropquant.model.families import check_gguf_expressible
    from dropquant.model.loading import load_config, load_tokenizer, model_identity, resolve_dtype, resolve_source
    from dropquant.prune.cut import cut_and_save, open_for_cut, plan_record
    from dropquant.prune.selection import check_scores, describe, select
    from dropquant.prune.surgery import layout_for_plan

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
    record = plan_record(plan, identity, file_sha256(args.scores) if scores is not None else None)

    # The pruned checkpoint keeps the source's precision (model.dtype: auto). Streamed, the model is only
    # its meta-device skeleton and the kept tensors are copied from the checkpoint one by one.
    dtype = resolve_dtype(params.model.dtype, source)
    model, stream_from = open_for_cut(source, config, dtype, params.model.stream)
    cut = cut_and_save(model, plan, record[PLAN_ID], args.pruned, dtype=dtype, tokenizer=load_tokenizer(source),
                       stream_from=stream_from)

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

    result = {**record, **cut}
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
