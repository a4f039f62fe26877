"""Benchmark tasks for lm-evaluation-harness: the built-in configs, re-pointed at local JSONL files when asked.

A local task is a YAML that `include:`s lm-eval's own task YAML (absolute path) and overrides only where the
data comes from, under the same task name, so the prompt, choices and metrics stay lm-eval's. TaskManager
lets an include_path task override a built-in one of the same name, and a `!function` in the included
file still resolves next to that file, so HellaSwag and WinoGrande keep their preprocessing.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from ..workspace import workspace_path

log = logging.getLogger(__name__)

DATA_DIR_ENV = "DROPQUANT_EVAL_DATA"

# The paper's few-shot settings (He et al. 2024, following the Open LLM Leaderboard); the rest are 0-shot.
PAPER_FEWSHOT = {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "winogrande": 5}


@dataclass(frozen=True)
class TaskSpec:
    """One task of EVAL_TASKS: lm-eval's built-in config, and the local files (folder/split.jsonl) it can read."""

    name: str          # our name, the key in metrics
    lm_eval_name: str  # lm-eval's task (or group) name
    yaml: str          # built-in YAML, relative to lm_eval/tasks
    splits: dict = field(default_factory=dict)  # lm-eval split role -> local file name


TASKS = {
    "arc_challenge": TaskSpec("arc_challenge", "arc_challenge", "arc/arc_challenge.yaml", {"test_split": "test.jsonl"}),
    "arc_easy": TaskSpec("arc_easy", "arc_easy", "arc/arc_easy.yaml", {"test_split": "test.jsonl"}),
    "boolq": TaskSpec("boolq", "boolq", "super_glue/boolq/default.yaml", {"validation_split": "validation.jsonl"}),
    "hellaswag": TaskSpec("hellaswag", "hellaswag", "hellaswag/hellaswag.yaml", {"validation_split": "validation.jsonl"}),
    # Local and hub RTE data are SuperGLUE's (premise/hypothesis); lm-eval's GLUE `rte` has the same prompt.
    "rte": TaskSpec("rte", "sglue_rte", "super_glue/rte/default.yaml", {"validation_split": "validation.jsonl"}),
    "openbookqa": TaskSpec("openbookqa", "openbookqa", "openbookqa/openbookqa.yaml", {"test_split": "test.jsonl"}),
    "piqa": TaskSpec("piqa", "piqa", "piqa/piqa.yaml", {"validation_split": "validation.jsonl"}),
    "winogrande": TaskSpec("winogrande", "winogrande", "winogrande/default.yaml", {"validation_split": "validation.jsonl"}),
    "mmlu": TaskSpec("mmlu", "mmlu", "mmlu/default/_mmlu.yaml", {"test_split": "test.jsonl", "fewshot_split": "dev.jsonl"}),
}
# Generative tasks, asked under the model's chat template (eval.chat); their prompts and checkers are lm-eval's.
# gsm8k_cot_llama: chain of thought with 8 fixed exemplars given as earlier chat turns (no train split needed).
CHAT_TASKS = {
    "ifeval": TaskSpec("ifeval", "ifeval", "ifeval/ifeval.yaml", {"test_split": "train.jsonl"}),
    "gsm8k": TaskSpec("gsm8k", "gsm8k_cot_llama", "gsm8k/gsm8k-cot-llama.yaml", {"test_split": "test.jsonl"}),
}
SPECS = {**TASKS, **CHAT_TASKS}
_ROLE_TO_SPLIT = {"test_split": "test", "validation_split": "validation", "fewshot_split": "dev"}


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def fewshot_for(task: str, fewshot: Union[int, str]) -> int:
    if fewshot == "paper":
        return PAPER_FEWSHOT.get(task, 0)
    return int(fewshot)


def resolve_data_dir(data_dir: Optional[str]) -> Optional[Path]:
    """eval.data_dir, else $DROPQUANT_EVAL_DATA; a relative path is taken from the workspace (dropquant.workspace:
    $DROPQUANT_WORKSPACE if set, else the current directory)."""
    value = data_dir or os.environ.get(DATA_DIR_ENV) or None
    return None if value is None else workspace_path(value).resolve()


def _local_yaml(spec: TaskSpec, files: dict, include: Path) -> dict:
    cfg = {
        "include": str(include),
        "task": spec.lm_eval_name if spec.name != "mmlu" else None,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {_ROLE_TO_SPLIT[role]: str(path) for role, path in files.items()}},
        # Only the local splits exist; few-shot examples then come from the evaluated split, minus the item itself.
        "training_split": None,
        "validation_split": None,
        "test_split": None,
    }
    for role in files:
        cfg[role] = _ROLE_TO_SPLIT[role]
    return cfg


def _write_mmlu(spec: TaskSpec, folder: Path, out: Path) -> None:
    """MMLU is a group of 57 subject tasks over one local file: split it per subject, one overriding YAML each."""
    builtin = lm_eval_tasks_dir() / "mmlu" / "default"
    per_subject: dict[str, dict[str, list[str]]] = {}
    for split_file in ("test.jsonl", "dev.jsonl"):
        with open(folder / split_file, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    subject = json.loads(line)["subject"]
                    per_subject.setdefault(subject, {}).setdefault(split_file, []).append(line.rstrip("\n"))
    mdir = out / "mmlu"
    mdir.mkdir(parents=True, exist_ok=True)
    for sub_yaml in sorted(builtin.glob("mmlu_*.yaml")):
        subject = sub_yaml.stem[len("mmlu_"):]
        rows = per_subject.get(subject)
        if not rows or "test.jsonl" not in rows:
            continue
        files = {}
        for role, split_file in (("test_split", "test.jsonl"), ("fewshot_split", "dev.jsonl")):
            if split_file in rows:
                path = mdir / f"{subject}.{split_file}"
                path.write_text("\n".join(rows[split_file]) + "\n", encoding="utf-8")
                files[role] = path
        cfg = _local_yaml(spec, files, sub_yaml)
        cfg["task"] = f"mmlu_{subject}"
        (mdir / f"mmlu_{subject}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def prepare_tasks(tasks: list[str], data_dir: Optional[Path], include_dir: Path) -> tuple[list[str], list[str]]:
    """Write local task YAMLs into include_dir; return (tasks to run, tasks skipped for want of data).

    With data_dir None the built-in configs read the Hugging Face hub, and a task that cannot be loaded
    is found out later (`load_task_manager`), not here.
    """
    include_dir.mkdir(parents=True, exist_ok=True)
    if data_dir is None:
        return list(tasks), []
    runnable, skipped = [], []
    for name in tasks:
        spec = SPECS[name]
        folder = data_dir / name
        missing = [f for f in spec.splits.values() if not (folder / f).is_file()]
        if missing:
            log.warning("eval: skipping task '%s': no local data (%s missing)", name,
                        ", ".join(str(folder / f) for f in missing))
            skipped.append(name)
            continue
        if name == "mmlu":
            _write_mmlu(spec, folder, include_dir)
        else:
            files = {role: folder / f for role, f in spec.splits.items()}
            cfg = _local_yaml(spec, files, lm_eval_tasks_dir() / spec.yaml)
            (include_dir / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        runnable.append(name)
    return runnable, skipped


def offline_env(data_dir: Optional[Path]) -> dict:
    """Environment for a local-data run: nothing may reach the hub."""
    if data_dir is None:
        return {}
    return {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
