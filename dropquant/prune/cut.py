"""Cutting a model by a drop plan and writing the pruned checkpoint: the drop stage's work, shared with
`dropquant.drop` so that both write the same directory from the same plan record."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from dropquant.artifacts import PLAN_ID, plan_id
from dropquant.prune.pruned_checkpoint import checkpoint_tensor_bytes, save_pruned, save_pruned_from
from dropquant.prune.selection import DropPlan
from dropquant.prune.surgery import dropped_parameters, prune_model, summary

log = logging.getLogger("dropquant.drop")  # the drop stage's log lines, wherever the cut is made


def plan_record(plan: DropPlan, identity: dict, scores_sha256: Optional[str]) -> dict:
    """plan.json before the cut: the plan, the model and scores it was made from, and its id."""
    record = {**plan.to_json(identity), "scores_sha256": scores_sha256}
    record[PLAN_ID] = plan_id(record)
    return record


def open_for_cut(source, config, dtype, stream) -> tuple[object, Optional[Path]]:
    """The model to cut, in the source's precision: loaded whole, or (streamed) only its meta-device skeleton,
    and then the safetensors directory its kept tensors are copied from (None when loaded whole)."""
    from dropquant.model.layerwise import should_stream
    from dropquant.model.loading import build_skeleton, checkpoint_dir, load_model

    directory = checkpoint_dir(source)
    streamed = should_stream(stream, directory, dtype, "cpu", source.spec)
    return (build_skeleton(config, dtype), directory) if streamed else (load_model(source, dtype), None)


def cut(model, plan: DropPlan, record_id: str, *, dtype=None) -> dict:
    """Prune `model` in place by `plan` (its config names the plan, `record_id`); returns the sizes before and
    after, which `save_cut` completes with what was written."""
    dtype = dtype if dtype is not None else next(model.parameters()).dtype
    before = summary(model)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dropped = dropped_parameters(model, plan)
    prune_model(model, plan)
    model.config.dropquant[PLAN_ID] = record_id  # the checkpoint names the plan that cut it
    return {"dtype": dtype, "before": before, "after": summary(model), "base_bytes": base_bytes, "dropped": dropped}


def save_cut(model, sizes: dict, out: Path, *, tokenizer=None, stream_from: Optional[Path] = None) -> dict:
    """Write the model `cut` pruned to `out` (from `stream_from`'s tensors for a skeleton); returns what plan.json
    adds after the cut: the kept layers and the sizes before and after."""
    dtype, before, after = sizes["dtype"], sizes["before"], sizes["after"]
    base_bytes, dropped = sizes["base_bytes"], sizes["dropped"]
    if stream_from is not None:
        save_pruned_from(model, stream_from, out, tokenizer=tokenizer)
    else:
        save_pruned(model, out, tokenizer=tokenizer)
    written = checkpoint_tensor_bytes(out)
    if written != base_bytes - dropped["bytes"]:
        log.warning("checkpoint holds %d tensor bytes, expected %d", written, base_bytes - dropped["bytes"])
    log.info("pruned model: %d -> %d layers, %d -> %d attention, %d -> %d MLP; %d -> %d parameters",
             before["layers"], after["layers"], before["attention_layers"], after["attention_layers"],
             before["mlp_layers"], after["mlp_layers"], before["params"], after["params"])
    log.info("checkpoint tensors (%s) %.1f MB -> %.1f MB (-%.1f MB, -%.1f%%)", str(dtype).removeprefix("torch."),
             base_bytes / 1e6, written / 1e6, dropped["bytes"] / 1e6, 100 * dropped["bytes"] / base_bytes)
    return {
        "kept_layers": model.config.dropquant["kept_layers"],
        "size": {"base_tensor_bytes": base_bytes, "pruned_tensor_bytes": written,
                 "dropped_params": dropped["params"], "dropped_bytes": dropped["bytes"],
                 "base_params": before["params"], "pruned_params": after["params"],
                 "dtype": str(dtype).removeprefix("torch."), "streamed": stream_from is not None},
    }


def cut_and_save(model, plan: DropPlan, record_id: str, out: Path, *, dtype=None, tokenizer=None,
                 stream_from: Optional[Path] = None) -> dict:
    """`cut`, then `save_cut`: the drop stage's whole cut."""
    return save_cut(model, cut(model, plan, record_id, dtype=dtype), out, tokenizer=tokenizer,
                    stream_from=stream_from)
