"""Heal: win back what the drop cost (linear stand-ins or merged maps fitted in closed form, a short distillation, or
both)."""
from __future__ import annotations

import logging
from pathlib import Path

from stages._cli import stage_main

log = logging.getLogger("dropquant.heal")
PLAN = Path("data/drop/plan.json")
PRUNED = Path("data/pruned")
CALIBRATION = Path("data/calibration/tokens.safetensors")
OUT = Path("data/healed")


def run(params, args) -> None:
    from dropquant.artifacts import check_pruned_matches_plan, read_calibration, read_json, read_plan
    from dropquant.atomic import atomic_dir, write_json
    from dropquant.heal.apply import HEAL_FILE, heal, nothing_to_heal
    from dropquant.model.layerwise import source_stack
    from dropquant.model.loading import load_config, model_identity, resolve_device, resolve_dtype, resolve_source
    from dropquant.prune.surgery import RECORD_KEY

    # Refused before any work: a plan made for another model, a checkpoint the plan did not cut.
    source = resolve_source(params.model.source, params.model.revision)
    identity = model_identity(load_config(source), source)
    plan = read_plan(args.plan, identity)
    pruned_config = read_json(args.pruned / "config.json", "pruned checkpoint", "run the drop stage")
    check_pruned_matches_plan(pruned_config.get(RECORD_KEY), plan, args.pruned, args.plan)
    method = params.heal.method
    work = method != "none" and not nothing_to_heal(plan)
    tokens, calibration = read_calibration(args.calibration, identity) if work else (None, {})
    dtype, device = resolve_dtype(params.model.dtype, source), resolve_device(params.model.device)

    with atomic_dir(args.out) as tmp:
        record = heal(method=method, heal_params=params.heal, plan=plan, pruned_dir=args.pruned, out_dir=tmp,
                      tokens=tokens, calibration_sha256=calibration.get("sha256"),
                      open_base=lambda: source_stack(source, dtype, device, params.model.stream),
                      dtype=dtype, device="cuda:0" if device == "auto" else device, batch_size=params.score.batch_size)
        write_json(tmp / HEAL_FILE, record)
    if record["checkpoint"]:
        log.info("wrote the healed checkpoint %s (%s)", args.out / record["checkpoint"], method)
    elif not record.get("skipped"):  # a skipped heal said why already
        log.info("heal.method=%s: nothing changed; quantize exports %s as it is", method, args.pruned)


def main(argv=None) -> int:
    def add(p):
        p.add_argument("--plan", type=Path, default=PLAN, help=f"drop plan (default {PLAN})")
        p.add_argument("--pruned", type=Path, default=PRUNED, help=f"pruned checkpoint (default {PRUNED})")
        p.add_argument("--calibration", type=Path, default=CALIBRATION, help=f"calibration tokens (default {CALIBRATION})")
        p.add_argument("--out", type=Path, default=OUT, help=f"output directory (default {OUT})")
    return stage_main("heal", __doc__, run, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
