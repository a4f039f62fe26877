"""Score: importance (1 - cos) of every attention layer, MLP layer and block, in one pass over the calibration tokens."""
from __future__ import annotations

import logging
from pathlib import Path

from stages._cli import stage_main

log = logging.getLogger("dropquant.score")
CALIBRATION = Path("data/calibration/tokens.safetensors")
OUT = Path("data/scores")


def run(params, args) -> None:
    from dropquant.artifacts import read_calibration
    from dropquant.model.layerwise import source_stack
    from dropquant.model.loading import load_config, model_identity, resolve_device, resolve_dtype, resolve_source
    from dropquant.prune.scoring import importance_title, scores_file, write_scores

    source = resolve_source(params.model.source, params.model.revision)
    identity = model_identity(load_config(source), source)
    input_ids, calibration = read_calibration(args.calibration, identity)
    dtype = resolve_dtype(params.model.dtype, source)
    stack = source_stack(source, dtype, resolve_device(params.model.device), params.model.stream)
    result = scores_file(stack, input_ids, identity=identity, calibration_sha256=calibration["sha256"], dtype=dtype,
                         batch_size=params.score.batch_size, metric=params.score.metric, name=source.spec)
    write_scores(args.out, result, importance_title(source.spec, params.score.metric, input_ids.numel()))
    log.info("wrote %s", args.out / "scores.json")


def main(argv=None) -> int:
    def add(p):
        p.add_argument("--calibration", type=Path, default=CALIBRATION, help=f"tokens file (default {CALIBRATION})")
        p.add_argument("--out", type=Path, default=OUT, help=f"output directory (default {OUT})")
    return stage_main("score", __doc__, run, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
