"""`plan`: which attention layers, MLPs or blocks to drop, chosen from scores as the drop stage chooses them."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from dropquant.api._common import build_params
from dropquant.api._scores import Scores
from dropquant.errors import DropquantError
from dropquant.prune.selection import DropPlan


@dataclass
class Plan:
    """A drop plan and the record the drop stage writes for it (plan.json before the cut).

    Attributes:
        drop: the :class:`dropquant.prune.selection.DropPlan` (``attn``, ``mlp``, ``blocks``: layer indices in
            the unpruned model's numbering).
        record: plan.json as the drop stage writes it before the cut: the plan, the model and scores it was
            made from, and ``plan_id``.
        tokens: the calibration tokens of the scores, reused to heal.
    """

    drop: DropPlan
    record: dict
    tokens: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def attn(self) -> list[int]:
        return self.drop.attn

    @property
    def mlp(self) -> list[int]:
        return self.drop.mlp

    @property
    def blocks(self) -> list[int]:
        return self.drop.blocks

    @property
    def plan_id(self) -> str:
        return self.record["plan_id"]

    @property
    def model(self) -> dict:
        """The identity of the model the plan was made for."""
        return self.record["model"]

    def __str__(self) -> str:
        from dropquant.prune.selection import describe

        return describe(self.drop)


def plan(scores: Union[Scores, dict, str, "os.PathLike[str]"], method: str = "attn", n: int = 8, *,
         selection: str = "importance", protect: Sequence[int] = (), layers: Optional[dict] = None,
         seed: int = 0) -> Plan:
    """Choose what to drop, with the drop stage's rules and checks.

    Args:
        scores: :class:`Scores` from :func:`dropquant.score`, a scores.json mapping, or its path.
        method: ``none``, ``attn``, ``mlp``, ``block`` or ``joint`` (attention and MLP ranked together).
        n: how many modules (or blocks) to drop.
        selection: ``importance`` (lowest first), ``random``, ``reverse`` (the last n) or ``contiguous``
            (block only: the n adjacent blocks changing the residual stream least).
        protect: layers never dropped (negative indices count from the end).
        layers: an explicit plan instead of a selection, e.g. ``{"attn": [3, 5]}`` (keys attn, mlp, blocks).
        seed: seed of ``selection="random"``.

    Returns:
        The :class:`Plan`; ``print(plan)`` says what it drops.

    Raises:
        DropquantError: a bad argument (named in the message), or a request the model cannot satisfy.
    """
    from dropquant.prune.cut import plan_record
    from dropquant.prune.selection import check_scores, select

    if not isinstance(scores, Scores):
        if isinstance(scores, (str, os.PathLike)):
            scores = Scores.load(scores)
        elif isinstance(scores, dict):
            scores = Scores(scores)
        else:
            raise DropquantError(f"scores: expected dropquant.Scores, a scores.json mapping or its path, got "
                                 f"{type(scores).__name__}")
    params = build_params("plan", {"method": ("drop.method", method), "n": ("drop.n", n),
                                   "selection": ("drop.selection", selection), "protect": ("drop.protect", list(protect) if isinstance(protect, tuple) else protect),
                                   "layers": ("drop.layers", layers), "seed": ("drop.seed", seed)})
    n_layers = scores.num_layers
    check_scores(scores.data, n_layers, origin="scores")
    chosen = select(params, n_layers, scores.data)
    return Plan(chosen, plan_record(chosen, scores.model, scores.sha256), scores.tokens)
