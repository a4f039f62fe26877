"""Calibration tokens: texts from calibration.source joined by EOS, cut into n_samples x seq_len blocks."""
from __future__ import annotations

import logging
from pathlib import Path

from stages._cli import stage_main

log = logging.getLogger("dropquant.calibrate")
OUT = Path("data/calibration")


def run(params, args) -> None:
    from safetensors.torch import save_file

    from dropquant import calibration as cal
    from dropquant.atomic import atomic_dir, write_json
    from dropquant.errors import DropquantError
    from dropquant.model.layerwise import should_stream
    from dropquant.model.loading import (checkpoint_dir, load_config, load_model, load_tokenizer, model_identity,
                                         resolve_device, resolve_dtype, resolve_source)

    c = params.calibration
    # Local text files are read before the model: an empty one is refused at once, not after the tokenizer loads.
    texts = None if c.source == cal.GENERATED else cal.source_texts(c.source, c.hf_config, c.split, c.text_field,
                                                                     c.seed)
    source = resolve_source(params.model.source, params.model.revision)
    config = load_config(source)
    cal.check_seq_len(config, c.seq_len)
    identity = model_identity(config, source)
    tokenizer = load_tokenizer(source)
    if c.source == cal.GENERATED:
        dtype, device = resolve_dtype(params.model.dtype, source), resolve_device(params.model.device)
        if should_stream(params.model.stream, checkpoint_dir(source), dtype, device, source.spec):
            raise DropquantError("calibration.source=generated samples text from the whole model, which does not fit "
                                 "in memory here (or model.stream is true): use a text source (a .txt/.jsonl path "
                                 "or hf:<dataset>)")
        sampler = "llama.cpp" if source.gguf_path is not None else "torch"
        log.info("data-free calibration: sampling %d x %d tokens from %s in %s", c.n_samples, c.seq_len, source.spec,
                 sampler)
        if source.gguf_path is not None:  # the GGUF itself, in llama.cpp: docs/performance.md#calibration
            input_ids = cal.generate_tokens_gguf(source.gguf_path, tokenizer, c.n_samples, c.seq_len, c.seed)
        else:
            input_ids = cal.generate_tokens(load_model(source, dtype, device), tokenizer, c.n_samples, c.seq_len,
                                            c.seed)
        texts_used = None
    else:
        sampler = None
        log.info("packing %d x %d tokens from %s", c.n_samples, c.seq_len, c.source)
        input_ids, texts_used = cal.pack(texts, tokenizer, c.n_samples, c.seq_len)
    manifest = {
        "source": c.source, "split": c.split if c.source.startswith(cal.HF_PREFIX) else None,
        "n_samples": c.n_samples, "seq_len": c.seq_len, "n_tokens": input_ids.numel(), "seed": c.seed,
        "texts_used": texts_used, "sampler": sampler, "sha256": cal.tokens_digest(input_ids), "model": identity,
    }
    with atomic_dir(args.out) as tmp:
        save_file({"input_ids": input_ids.contiguous()}, str(tmp / "tokens.safetensors"))
        write_json(tmp / "manifest.json", manifest)
    log.info("wrote %s (%d tokens, sha256 %s)", args.out, input_ids.numel(), manifest["sha256"][:12])


def main(argv=None) -> int:
    return stage_main("calibrate", __doc__, run, argv,
                      lambda p: p.add_argument("--out", type=Path, default=OUT, help=f"output directory (default {OUT})"))


if __name__ == "__main__":
    raise SystemExit(main())
