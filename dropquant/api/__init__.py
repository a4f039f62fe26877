"""dropquant's Python API: the pipeline's stages as functions that take plain arguments and return objects.

    import dropquant as dq
    scores = dq.score("embedded", n_samples=8, seq_len=128)
    plan = dq.plan(scores, method="attn", n=8)
    model = dq.drop("embedded", plan, out="pruned/")

Each function checks its arguments with params.yaml's schema (a bad one raises DropquantError naming it) and runs
the same library code as its stage: the same tokens, scores, plan, checkpoint, GGUF and metrics. See docs/python.md.
"""
from dropquant.api._drop import drop
from dropquant.api._evaluate import Evaluation, evaluate
from dropquant.api._gguf import manifest_path, read_manifest, to_gguf
from dropquant.api._plan import Plan, plan
from dropquant.api._scores import Scores, calibrate, score

__all__ = ["Evaluation", "Plan", "Scores", "calibrate", "drop", "evaluate", "manifest_path", "plan",
           "read_manifest", "score", "to_gguf"]
