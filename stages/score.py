"""Score: importance (1 - cos) of every attention layer, MLP layer and block, in one pass over the calibration tokens."""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from stages._cli import stage_main

log = logging.getLogger("dropquant.score")
CALIBRATION = Path("data/calibration/tokens.safetensors")
OUT = Path("data/scores")


def importance_csv(importance: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "attn", "mlp", "block"])
    for i, row in enumerate(zip(importance["attn"], importance["mlp"], importance["block"])):
        w.writerow([i, *(f"{v:.6f}" for v in row)])
    return buf.getvalue()


def run(params, args) -> None:
    from dropquant.artifacts import read_calibration
    from dropquant.atomic import write_json, write_text
    from dropquant.model.layerwise import StreamedStack, source_stack
    from dropquant.model.loading import load_config, model_identity, resolve_device, resolve_dtype, resolve_source
    from dropquant.plots import importance_heatmap
    from dropquant.prune.scoring import score_stack

    source = resolve_source(params.model.source, params.model.revision)
    identity = model_identity(load_config(source), source)
    input_ids, calibration = read_calibration(args.calibration, identity)
    dtype = resolve_dtype(params.model.dtype, source)
    stack = source_stack(source, dtype, resolve_device(params.model.device), params.model.stream)
    log.info("scoring %s on %d tokens in %s", source.spec, input_ids.numel(), str(dtype).removeprefix("torch."))
    scores = score_stack(stack, input_ids, params.score.batch_size, params.score.metric)
    result = {"model": identity, "calibration": {"sha256": calibration["sha256"]},
              "dtype": str(dtype).removeprefix("torch."), "streamed": isinstance(stack, StreamedStack), **scores}
    imp = scores["importance"]
    for unit in ("attn", "mlp", "block"):
        log.info("mean %s importance %.4f", unit, sum(imp[unit]) / len(imp[unit]))
    out = args.out
    from dropquant.naming import model_name

    importance_heatmap(imp, out / "heatmap.png", f"{model_name(source.spec)}: importance ({params.score.metric}), "
                                                f"{input_ids.numel()} tokens")
    write_text(out / "importance.csv", importance_csv(imp))
    write_json(out / "scores.json", result)  # last: its presence means the stage finished
    log.info("wrote %s", out / "scores.json")


def main(argv=None) -> int:
    def add(p):
        p.add_argument("--calibration", type=Path, default=CALIBRATION, help=f"tokens file (default {CALIBRATION})")
        p.add_argument("--out", type=Path, default=OUT, help=f"output directory (default {OUT})")
    return stage_main("score", __doc__, run, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
