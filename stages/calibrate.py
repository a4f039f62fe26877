"""Calibration tokens: texts from calibration.source joined by EOS, cut into n_samples x seq_len blocks."""
from __future__ import annotations

import logging
from pathlib import Path

from stages._cli import stage_main

log = logging.getLogger("dropquant.calibrate")
OUT = Path("data/calibration")


def run(params, args) -> None:
    from safetensors.torch import save_file

    from dropquant.atomic import atomic_dir, write_json
    from dropquant.calibration import GENERATED, make_calibration, source_texts
    from dropquant.model.loading import load_config, resolve_source

    c = params.calibration
    # Local text files are read before the model: an empty one is refused at once, not after the tokenizer loads.
    texts = None if c.source == GENERATED else source_texts(c.source, c.hf_config, c.split, c.text_field, c.seed)
    source = resolve_source(params.model.source, params.model.revision)
    input_ids, manifest = make_calibration(params, source, load_config(source), texts=texts)
    with atomic_dir(args.out) as tmp:
        save_file({"input_ids": input_ids.contiguous()}, str(tmp / "tokens.safetensors"))
        write_json(tmp / "manifest.json", manifest)
    log.info("wrote %s (%d tokens, sha256 %s)", args.out, input_ids.numel(), manifest["sha256"][:12])


def main(argv=None) -> int:
    return stage_main("calibrate", __doc__, run, argv,
                      lambda p: p.add_argument("--out", type=Path, default=OUT, help=f"output directory (default {OUT})"))


if __name__ == "__main__":
    raise SystemExit(main())
