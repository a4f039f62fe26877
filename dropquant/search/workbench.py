"""Where a search gets its figures: drop plans, the fixed reference, cheap estimates and measured candidates.

Every candidate is charged on one scale: KL divergence from the unpruned model at its source precision (its own
GGUF, F32/F16/BF16), on the held-out text of the evaluate stage, with the same code (`fidelity.compare`). A
measured candidate is written exactly as the drop, heal and quantize stages write it (same selection, surgery,
heal, exporter and llama.cpp quantizer), measured, and only its figures are kept: one JSON file per candidate in
the search's cache folder, named by everything it was computed from, so a search run again (interrupted or
not) never measures a candidate twice.
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from dropquant.artifacts import file_sha256, json_digest
from dropquant.atomic import write_json
from dropquant.errors import DropquantError
from dropquant.gguf.mix import axis_target
from dropquant.search.estimate import Drop, estimate_kl
from dropquant.search.space import Candidate

log = logging.getLogger(__name__)

ATTN_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm")
MLP_TENSORS = ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


class Workbench:
    """The figures of one model's candidates. `params` are the pipeline's (model, drop selection, heal,
    eval.fidelity_tokens and eval.data_dir are read); `scores` the score stage's scores.json; `calibration`
    (tokens, sha256) is needed only to heal."""

    def __init__(self, params, scores: Optional[dict], scores_sha256: str, cache_dir: Path, *,
                 calibration: Optional[tuple[torch.Tensor, str]] = None, estimate_tokens: int = 2048,
                 threads: int = 2, progress: bool = True):
        from dropquant.evaluation.device import resolve_gpu_layers
        from dropquant.evaluation.tasks import resolve_data_dir
        from dropquant.model.loading import load_config, model_identity, resolve_dtype, resolve_source

        if params.drop.layers is not None:
            raise DropquantError("search: drop.layers is set in params.yaml, which fixes the plan; the search chooses "
                                 "the layers from drop.method and drop.n: set drop.layers: null")
        if params.quantize.imatrix:
            raise DropquantError("search: quantize.imatrix is true, but the search measures candidates without an "
                                 "importance matrix, so its figures would not be the pick's: set quantize.imatrix: "
                                 "false (-S quantize.imatrix=false)")
        self.params, self.scores, self.calibration = params, scores, calibration
        self.threads, self.progress, self.estimate_tokens = threads, progress, estimate_tokens
        self.source = resolve_source(params.model.source, params.model.revision)
        self.config = load_config(self.source)
        self.identity = model_identity(self.config, self.source)
        self.dtype = resolve_dtype(params.model.dtype, self.source)
        data_dir = resolve_data_dir(params.eval.data_dir)
        self.data_dir = data_dir if data_dir is not None and data_dir.is_dir() else None
        self.key = {"model": self.identity["fingerprint"], "dtype": str(self.dtype), "scores": scores_sha256,
                    "drop": params.drop.model_dump(mode="json", exclude={"method", "n"}),
                    "fidelity_tokens": params.eval.fidelity_tokens, "data_dir": str(self.data_dir)}
        # llama.cpp's layers on the GPU for the reference and every candidate; a GPU's KLs are cached apart from
        # the CPU's (their kernels round differently), and a CPU run keeps the cache it had.
        self.gpu_layers = resolve_gpu_layers(params.eval.gpu_layers, params.model.device)
        if self.gpu_layers:
            self.key["gpu_layers"] = self.gpu_layers
        self.dir = Path(cache_dir) / json_digest(self.key)[:16]
        (self.dir / "measured").mkdir(parents=True, exist_ok=True)
        self.scratch = self.dir / "scratch"
        shutil.rmtree(self.scratch, ignore_errors=True)  # a killed search's intermediates
        self.scratch.mkdir()
        self._model = None
        self._reference = None
        self._fidelity = None
        self._chunks = None
        self._estimate_base = None
        self.counts = {"measured": 0, "reused": 0, "estimated": 0}
        self.seconds = {"measure": 0.0, "estimate": 0.0, "reference": 0.0}

    # --- plans -----------------------------------------------------------------------------------------------

    def plan(self, method: str, n: int):
        """The drop stage's plan for drop.method/drop.n under these parameters (refused as the stage refuses)."""
        from dropquant.prune.selection import select

        params = self.params.model_copy(deep=True)
        params.drop.method, params.drop.n = ("none", 0) if n == 0 else (method, n)
        return select(params, int(self.config.num_hidden_layers), self.scores)

    def plan_record(self, method: str, n: int) -> dict:
        from dropquant.artifacts import PLAN_ID, plan_id

        record = {**self.plan(method, n).to_json(self.identity), "scores_sha256": self.key["scores"]}
        record[PLAN_ID] = plan_id(record)
        return record

    # --- the unpruned model and the fixed reference ----------------------------------------------------------

    def model(self):
        """The unpruned model, loaded once (in memory; a model larger than memory is streamed instead)."""
        if self._model is None:
            from dropquant.model.loading import load_model

            self._model = load_model(self.source, self.dtype)
        return self._model

    def _streamed(self) -> bool:
        from dropquant.model.layerwise import should_stream
        from dropquant.model.loading import checkpoint_dir

        return should_stream(self.params.model.stream, checkpoint_dir(self.source), self.dtype, "cpu",
                             self.source.spec)

    def stack(self):
        from dropquant.model.layerwise import InMemoryStack, source_stack

        if self._model is not None or not self._streamed():
            return InMemoryStack(self.model())
        return source_stack(self.source, self.dtype, "cpu", self.params.model.stream)

    def reference(self) -> Path:
        """The unpruned model as a GGUF in its source precision: what every candidate's KL is taken from."""
        path = self.dir / "reference" / "model.gguf"
        if not path.is_file() or not path.with_suffix(".names.json").is_file():
            start = time.perf_counter()
            log.info("search: writing the reference, the unpruned model in its own precision, as GGUF")
            self._export(None, path)
            self.seconds["reference"] += time.perf_counter() - start
        return path

    def fidelity(self):
        """(the fidelity Reference on the held-out text, the reference's logits at its scored positions)."""
        if self._fidelity is None:
            from dropquant.evaluation.fidelity import build_reference, heldout_text

            start = time.perf_counter()
            text, origin = heldout_text(self.data_dir)
            logits: list = []
            ref = build_reference(self.reference(), text, self.params.eval.fidelity_tokens, self.threads,
                                  source=origin, keep_logits=logits, gpu_layers=self.gpu_layers)
            self._fidelity = ref, logits
            self.seconds["reference"] += time.perf_counter() - start
        return self._fidelity

    # --- estimates -------------------------------------------------------------------------------------------

    def _estimate_chunks(self) -> torch.Tensor:
        ref, _ = self.fidelity()
        n = max(1, min(len(ref.chunks), self.estimate_tokens // ref.chunks.shape[1]))
        return torch.as_tensor(ref.chunks[:n], dtype=torch.long)

    def estimate(self, drops: list[tuple[str, int]]) -> dict[tuple[str, int], float]:
        """Estimated KL of each unhealed drop (method, n) from the unpruned torch model: one layer-wise pass."""
        of = {(m, n): Drop.of(self.plan(m, n)) for m, n in drops}
        todo = {str(k): d for k, d in enumerate(dict.fromkeys(of.values()))}  # joint-n can be attn-n
        if not todo:
            return {}
        start = time.perf_counter()
        kl, self._estimate_base = estimate_kl(self.stack(), self._estimate_chunks(), todo, self._estimate_base,
                                              progress=self.progress)
        self.seconds["estimate"] += time.perf_counter() - start
        self.counts["estimated"] += len(todo)
        by_drop = {d: kl[k] for k, d in todo.items()}
        return {key: by_drop[d] for key, d in of.items()}

    def estimate_healed(self, method: str, n: int, heal: str) -> float:
        """Estimated KL of a healed drop: the heal runs (as the heal stage runs it), the healed torch model is
        compared with the unpruned one on the estimate tokens."""
        from dropquant.model.layerwise import checkpoint_stack

        if self._estimate_base is None:
            _, self._estimate_base = estimate_kl(self.stack(), self._estimate_chunks(), {}, None,
                                                 progress=self.progress)
        checkpoint = self._healed(method, n, heal)
        start = time.perf_counter()
        kl, _ = estimate_kl(checkpoint_stack(checkpoint, self.dtype, "cpu", self.params.model.stream),
                            self._estimate_chunks(), {"healed": None}, self._estimate_base, progress=self.progress)
        self.seconds["estimate"] += time.perf_counter() - start
        self.counts["estimated"] += 1
        return kl["healed"]

    # --- measured candidates ---------------------------------------------------------------------------------

    def _record_path(self, c: Candidate) -> Path:
        """Named by what the file would hold: joint-8 is attn-8 when both drop the same attention layers."""
        heal = self.params.heal.model_dump(mode="json") if c.heal != "none" else None
        calib = self.calibration[1] if c.heal != "none" and self.calibration else None
        plan = self.plan(c.method, c.n)
        layers = {"attn": plan.attn, "mlp": plan.mlp, "blocks": plan.blocks}
        key = {"layers": layers, "quant_type": c.quant_type, "heal_method": c.heal, "heal": heal, "calibration": calib}
        if axis_target(c.quant_type) is not None:  # what the mix's types were chosen from
            key["mix"] = self.params.quantize.model_dump(mode="json", include={"mix_types", "mix_by", "mix_tokens"})
            key["mix_data"] = self.calibration[1] if self.params.quantize.mix_by == "sensitivity" else self.key["scores"]
        digest = json_digest(key)[:16]
        return self.dir / "measured" / f"{digest}.json"

    def cached(self, c: Candidate) -> Optional[dict]:
        path = self._record_path(c)
        return {**json.loads(path.read_text()), **c.to_json()} if path.is_file() else None

    def measure(self, c: Candidate) -> dict:
        """The candidate's GGUF size and its KL divergence, perplexity and top-1 agreement against the reference
        (measured once; a cached figure is returned as it was measured)."""
        from dropquant.evaluation.fidelity import compare
        from dropquant.gguf.header import tensor_bytes
        from dropquant.gguf.quantize import quantize_gguf

        record = self.cached(c)
        if record is not None:
            self.counts["reused"] += 1
            return record
        ref, logits = self.fidelity()
        start = time.perf_counter()
        log.info("search: measuring %s", c.name)
        source = self._source_gguf(c.method, c.n, c.heal)
        out = self.scratch / f"{c.name}.gguf"
        try:
            if axis_target(c.quant_type) is not None:
                mix = self._mix(c, source, out)
            elif c.quant_type in ("F32", "F16", "BF16") and c.quant_type == self.source_type():
                shutil.copyfile(source, out)
            else:
                quantize_gguf(source, out, c.quant_type)
            fid = compare(out, ref, self.threads, cached_base=logits, gpu_layers=self.gpu_layers)
            sizes = tensor_bytes(out)
            record = {**c.to_json(), "size_bytes": out.stat().st_size, "kld": fid["kld"],
                      "kld_stderr": fid["kld_stats"]["stderr"], "ppl": fid["ppl"], "reference_ppl": fid["base_ppl"],
                      "top1_agree": fid["top1_agree"], "fidelity_tokens": fid["fidelity_tokens"],
                      "reference_type": self.source_type(), "gguf_sha256": file_sha256(out),
                      "tensor_bytes": sizes, "seconds": round(time.perf_counter() - start, 2)}
            if axis_target(c.quant_type) is not None:
                record["mix"] = {k: mix[k] for k in ("target", "by", "bpw", "estimated_kl", "tensor_counts")}
        finally:
            out.unlink(missing_ok=True)
        write_json(self._record_path(c), record)
        self.counts["measured"] += 1
        self.seconds["measure"] += time.perf_counter() - start
        return record

    # --- writing candidates as the stages do -----------------------------------------------------------------

    def _mix(self, c: Candidate, source: Path, out: Path) -> dict:
        """quantize.type: mix at the candidate's target, as the quantize stage makes it (dropquant.gguf.mix_build)."""
        from dropquant.gguf.mix_build import build_mix
        from dropquant.model.layerwise import checkpoint_stack

        q = self.params.quantize
        info = json.loads(source.with_suffix(".names.json").read_text())
        if q.mix_by == "sensitivity" and self.calibration is None:
            raise DropquantError("search: a mix by sensitivity needs the calibration tokens (run the calibrate "
                                 "stage), or quantize.mix_by: importance")
        plan = self.plan(c.method, c.n) if c.n else None
        if plan is None:
            open_stack = self.stack
        else:
            directory = self._healed(c.method, c.n, c.heal) if c.heal != "none" else self._pruned_checkpoint(c.method,
                                                                                                            c.n)
            open_stack = lambda: checkpoint_stack(directory, self.dtype, "cpu", self.params.model.stream)  # noqa: E731
        kept = None if plan is None else [i for i in range(self.config.num_hidden_layers) if i not in plan.blocks]
        names = SimpleNamespace(tensor_names=info["tensor_names"], permuted=info["permuted"])
        return build_mix(source, out, target=axis_target(c.quant_type), types=q.mix_types, by=q.mix_by, info=names,
                         open_stack=open_stack, tokens=None if self.calibration is None else self.calibration[0],
                         mix_tokens=q.mix_tokens, importance=(self.scores or {}).get("importance"),
                         layer_map=kept, work=self.scratch / f"{c.name}.mix")

    def source_type(self) -> str:
        from dropquant.gguf.header import read_metadata

        ftype = read_metadata(self.reference(), "general.file_type").get("general.file_type", (0,))[0]
        return {0: "F32", 1: "F16", 32: "BF16"}.get(ftype, "F32")

    def _source_gguf(self, method: str, n: int, heal: str) -> Path:
        """The drop (healed or not) as a GGUF in the source's precision, kept in scratch for every quant type."""
        if n == 0:
            return self.reference()
        path = self.scratch / f"{method}-{n}-{heal.replace('+', '-')}.source.gguf"
        if not path.is_file():
            self._export((method, n, heal), path)
        return path

    def _pruned_checkpoint(self, method: str, n: int) -> Path:
        from dropquant.model.loading import build_skeleton, checkpoint_dir, load_tokenizer
        from dropquant.prune.pruned_checkpoint import save_pruned, save_pruned_from
        from dropquant.prune.surgery import prune_model

        path = self.scratch / f"{method}-{n}.pruned"
        if not path.is_dir():
            plan = self.plan(method, n)
            record = self.plan_record(method, n)
            if self._model is None and self._streamed():
                model = prune_model(build_skeleton(self.config, self.dtype), plan)
                model.config.dropquant["plan_id"] = record["plan_id"]
                save_pruned_from(model, checkpoint_dir(self.source), path, tokenizer=load_tokenizer(self.source),
                                 progress=self.progress)
            else:
                model = prune_model(copy.deepcopy(self.model()), plan)
                model.config.dropquant["plan_id"] = record["plan_id"]
                save_pruned(model, path, tokenizer=load_tokenizer(self.source))
            del model
        return path

    def _healed(self, method: str, n: int, heal: str) -> Path:
        """The healed checkpoint of a drop, written by the heal stage's library call."""
        from dropquant.heal.apply import heal as run_heal

        out = self.scratch / f"{method}-{n}-{heal.replace('+', '-')}.healed"
        if not (out / "model").is_dir():
            if self.calibration is None:
                raise DropquantError("search: healing needs the calibration tokens (run the calibrate stage)")
            tokens, sha = self.calibration
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            run_heal(method=heal, heal_params=self.params.heal.model_copy(update={"method": heal}),
                     plan=self.plan_record(method, n), pruned_dir=self._pruned_checkpoint(method, n), out_dir=out,
                     tokens=tokens, calibration_sha256=sha, open_base=self.stack, dtype=self.dtype, device="cpu",
                     progress=self.progress)
        if not (out / "model").is_dir():  # nothing this heal method can heal in this drop (as the heal stage)
            log.info("search: heal.method=%s has nothing to heal in %s-%d: the pruned model as it is", heal, method, n)
            return self._pruned_checkpoint(method, n)
        return out / "model"

    def _export(self, drop: Optional[tuple[str, int, str]], out: Path) -> None:
        from dropquant.gguf.export import export_checkpoint, export_model
        from dropquant.model.loading import checkpoint_dir
        from dropquant.prune.surgery import prune_model

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        names = out.with_suffix(".names.json")  # the exporter's name map, for a mix's costs
        # A GGUF source's tokenizer keys are carried over; a checkpoint (pruned or not) holds its own tokenizer.
        tok = {"tokenizer_gguf": self.source.gguf_path} if self.source.gguf_path is not None else {}
        in_memory = tok or {"tokenizer_dir": checkpoint_dir(self.source)}
        name = f"{self.source.spec} dropquant"
        if drop is not None and drop[2] != "none":
            info = export_checkpoint(self._healed(*drop), tmp, name=name, **tok)
        elif drop is not None and (self._model is not None or not self._streamed()):
            model = prune_model(copy.deepcopy(self.model()), self.plan(drop[0], drop[1]))
            info = export_model(model, tmp, name=name, **in_memory)
        elif drop is not None:
            info = export_checkpoint(self._pruned_checkpoint(drop[0], drop[1]), tmp, name=name, **tok)
        elif checkpoint_dir(self.source) is not None:
            info = export_checkpoint(checkpoint_dir(self.source), tmp, name=name)
        else:
            info = export_model(self.model(), tmp, name=name, **tok)
        write_json(names, {"tensor_names": info.tensor_names, "permuted": info.permuted})
        tmp.rename(out)

    # --- figures that need no measurement --------------------------------------------------------------------

    def dropped_tensor_prefixes(self, method: str, n: int) -> list[str]:
        """GGUF tensor name prefixes (original layer numbering) of everything the drop removes."""
        plan = self.plan(method, n)
        out = [f"blk.{i}." for i in plan.blocks]
        out += [f"blk.{i}.{t}." for i in plan.attn for t in ATTN_TENSORS]
        out += [f"blk.{i}.{t}." for i in plan.mlp for t in MLP_TENSORS]
        return out

    def kv_layers(self, method: str, n: int) -> int:
        plan = self.plan(method, n)
        return int(self.config.num_hidden_layers) - len(set(plan.attn) | set(plan.blocks))

    def kv_bytes_per_token(self, method: str, n: int) -> int:
        heads = int(self.config.num_attention_heads)
        kv = int(getattr(self.config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(self.config, "head_dim", None) or self.config.hidden_size // heads)
        return self.kv_layers(method, n) * 2 * kv * head_dim * 2

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        self._model = None
        self._fidelity = None
