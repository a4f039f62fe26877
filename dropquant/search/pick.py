"""The search: the best candidate (by the objective) whose KL divergence from the reference stays within budget,
found with few measurements.

1. Quantization's own KL: the unpruned model at every quant type is measured (one candidate per type).
2. Each drop's KL is estimated on the torch model (`Workbench.estimate`), by bisection on n per method and heal:
   the drop order is fixed by the scores, so the estimate should grow with n. That is checked, not assumed: when
   the probes of a method are not increasing, every n of that method is estimated. A candidate's estimate is the
   drop's estimate plus its quant type's measured KL (no order among quant types is assumed either).
3. Candidates are walked best objective first. One whose estimate is over budget x (1 + slack) is skipped; the
   others are measured (exported, quantized, full KL) until one is within budget. A measured candidate over
   budget is a step back, and said so. Candidates whose objective is within `tie` of the pick are measured too,
   and the best measured one is the pick.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from dropquant.errors import DropquantError
from dropquant.gguf.header import tensor_bytes
from dropquant.search.space import Candidate, Space, check_objective, check_space

log = logging.getLogger(__name__)

NOT_MONOTONE = 0.05  # relative drop in a method's estimated KL as n grows that counts as not increasing


@dataclass
class Entry:
    candidate: Candidate
    quant_kl: float
    size_est: int
    cost: tuple
    drop_est: Optional[float] = None   # estimated KL of the drop alone (torch, float)
    bound: Optional[str] = None        # what bisection says when the drop itself was not estimated
    tg_cost: int = 0                   # weight bytes read per generated token
    measured: Optional[dict] = None
    status: str = "not examined (objective worse than the pick)"

    @property
    def kl_estimate(self) -> Optional[float]:
        return None if self.drop_est is None else self.drop_est + self.quant_kl

    def to_json(self, objective: str) -> dict:
        m = self.measured or {}
        return {**self.candidate.to_json(), "status": self.status,
                "size_bytes": m.get("size_bytes", self.size_est), "size_measured": bool(m),
                "kld": m.get("kld", self.kl_estimate), "kld_measured": bool(m), "kld_stderr": m.get("kld_stderr"),
                "kld_estimate": self.kl_estimate, "kld_bound": self.bound, "drop_kld_estimate": self.drop_est,
                "quant_kld": self.quant_kl, "ppl": m.get("ppl"), "top1_agree": m.get("top1_agree"),
                "objective": objective, "objective_cost": self.cost[0], "objective_measured": objective == "size"
                and bool(m), "tg_cost": self.tg_cost}


@dataclass
class SearchResult:
    max_kld: float
    objective: str
    space: Space
    entries: list[Entry]
    pick: Optional[Entry]
    stepped_back: list[str]
    notes: list[str]
    counts: dict
    seconds: float
    phases: dict = field(default_factory=dict)

    def candidates_json(self) -> list[dict]:
        return [e.to_json(self.objective) for e in self.entries]

    def ranked_after_pick(self) -> list[Entry]:
        """Measured candidates within budget, best objective first (the pick first): where to step back to when
        the full pipeline finds the pick over a bound."""
        ok = [e for e in self.entries if e.measured and e.measured["kld"] <= self.max_kld]
        return sorted(ok, key=lambda e: e.cost)


class _Costs:
    """Objective costs (lower is better) from the unpruned model's tensor sizes at each quant type."""

    def __init__(self, bench, base: dict[str, dict], elements: dict[str, int], objective: str):
        # base: quant type -> the unpruned model's measured record; elements: tensor name -> element count
        self.bench, self.base, self.elements, self.objective = bench, base, elements, objective

    def _kept(self, sizes: dict[str, int], method: str, n: int) -> dict[str, int]:
        gone = tuple(self.bench.dropped_tensor_prefixes(method, n)) if n else ()
        return {k: v for k, v in sizes.items() if not (gone and k.startswith(gone))}

    def predicted_size(self, c: Candidate) -> int:
        rec = self.base[c.quant_type]
        header = rec["size_bytes"] - sum(rec["tensor_bytes"].values())
        return header + sum(self._kept(rec["tensor_bytes"], c.method, c.n).values())

    def tg(self, c: Candidate) -> int:
        """Bytes read per generated token: every weight but the embedding lookup's (unless tied to the output)."""
        tied = "output.weight" not in self.base[c.quant_type]["tensor_bytes"]
        kept = self._kept(self.base[c.quant_type]["tensor_bytes"], c.method, c.n)
        return sum(v for k, v in kept.items() if tied or k != "token_embd.weight")

    def cost(self, c: Candidate, size: Optional[int] = None) -> tuple:
        """(the objective's cost, the size as tie-break); `size` is the measured one when there is one."""
        size = self.predicted_size(c) if size is None else size
        if self.objective == "size":
            return (size,)
        if self.objective == "kv":
            return (self.bench.kv_bytes_per_token(c.method, c.n), size)
        if self.objective == "tg":
            return (self.tg(c), size)
        tied = "output.weight" not in self.base[c.quant_type]["tensor_bytes"]
        kept = self._kept(self.elements, c.method, c.n)  # pp: multiply-adds per token
        return (sum(v for k, v in kept.items() if (tied or k != "token_embd.weight") and not k.endswith("norm.weight")),
                size)


def _bisect(values: dict[str, dict[int, float]], ns: list[int], thresholds: list[float],
            estimate: Callable[[list[tuple[str, int]]], dict[tuple[str, int], float]]) -> None:
    """For every method and threshold, the largest n whose value is within it (values rising with n), estimating
    as few n as that takes: each round estimates the midpoints of every method's open intervals together."""
    spans = {(m, t): [-1, len(ns)] for m in values for t in thresholds}  # last index within, first beyond
    while True:
        probes = set()
        for (m, t), span in spans.items():
            while span[1] - span[0] > 1:
                mid = (span[0] + span[1]) // 2
                if ns[mid] not in values[m]:
                    probes.add((m, ns[mid]))
                    break
                span[:] = [mid, span[1]] if values[m][ns[mid]] <= t else [span[0], mid]
        if not probes:
            return
        for (m, n), v in estimate(sorted(probes)).items():
            values[m][n] = v


def _rising(values: dict[int, float]) -> bool:
    seq = [values[n] for n in sorted(values)]
    return all(b >= a * (1 - NOT_MONOTONE) for a, b in zip(seq, seq[1:]))


def search(bench, space: Space, max_kld: float, objective: str = "size", *, slack: float = 0.15,
           tie: float = 0.01) -> SearchResult:
    """The best candidate of `space` by `objective` with measured KL <= max_kld (see the module's docstring)."""
    check_space(space)
    check_objective(objective)
    if not max_kld > 0:
        raise DropquantError(f"search: the KL budget must be > 0, got {max_kld}")
    start = time.perf_counter()
    notes: list[str] = []
    drops = sorted({(c.method, c.n) for c in space.candidates() if c.n > 0})
    for m, n in drops:  # every plan is made (and an impossible n refused) before any work
        bench.plan(m, n)

    base = {q: bench.measure(Candidate("none", 0, q)) for q in space.quant_types}
    quant_kl = {q: base[q]["kld"] for q in space.quant_types}
    ref_bytes = tensor_bytes(bench.reference())
    width = {"F32": 4, "F16": 2, "BF16": 2}[bench.source_type()]
    costs = _Costs(bench, base, {k: v // width for k, v in ref_bytes.items()}, objective)
    by_size = sorted(space.quant_types, key=lambda q: base[q]["size_bytes"])
    for small, big in zip(by_size, by_size[1:]):
        if quant_kl[big] > quant_kl[small]:
            notes.append(f"{big} ({base[big]['size_bytes'] / 1e6:.1f} MB) has a higher KL than {small} "
                         f"({base[small]['size_bytes'] / 1e6:.1f} MB): {quant_kl[big]:.4f} > {quant_kl[small]:.4f}")

    ceiling = max_kld * (1 + slack)
    thresholds = sorted({ceiling - quant_kl[q] for q in space.quant_types})
    drop_est: dict[tuple[str, int, str], float] = {}
    ns = sorted(n for n in space.ns if n > 0)
    for heal in space.heals:
        def estimate(probes: list[tuple[str, int]], heal=heal) -> dict[tuple[str, int], float]:
            if heal == "none":
                return bench.estimate(probes)
            return {(m, n): bench.estimate_healed(m, n, heal) for m, n in probes}

        values: dict[str, dict[int, float]] = {m: {} for m in space.methods}
        _bisect(values, ns, [t for t in thresholds if t > 0], estimate)
        for method in space.methods:
            if not _rising(values[method]):
                notes.append(f"{method} ({'unhealed' if heal == 'none' else heal}): estimated KL does not rise "
                             f"with n ({', '.join(f'n={n}: {v:.3f}' for n, v in sorted(values[method].items()))}); "
                             "every n estimated instead of bisecting")
                rest = estimate([(method, n) for n in ns if n not in values[method]])
                values[method].update({n: v for (_, n), v in rest.items()})
            drop_est.update({(method, n, heal): v for n, v in values[method].items()})

    entries = []
    for c in space.candidates():
        e = Entry(c, quant_kl[c.quant_type], costs.predicted_size(c), costs.cost(c), tg_cost=costs.tg(c))
        if c.n == 0:
            e.drop_est = 0.0
        else:
            e.drop_est = drop_est.get((c.method, c.n, c.heal))
            if e.drop_est is None:
                known = {n: v for (m, n, h), v in drop_est.items() if m == c.method and h == c.heal}
                above = [known[n] for n in known if n > c.n]
                below = [known[n] for n in known if n < c.n]
                t = ceiling - e.quant_kl
                if below and max(below) > t:
                    e.bound = f"> {max(below) + e.quant_kl:.4f} (a smaller n of {c.method} is over budget)"
                elif above and min(above) <= t:
                    e.bound = f"<= {min(above) + e.quant_kl:.4f} (a larger n of {c.method} is within budget)"
                else:
                    e.bound = "> budget (every n is over it)" if t <= 0 else None
        entries.append(e)

    for e in entries:  # measured by an earlier search: its measurement counts, not the estimate
        e.measured = bench.cached(e.candidate)
        if e.measured is not None:
            e.cost = costs.cost(e.candidate, e.measured["size_bytes"])
    entries.sort(key=lambda e: (e.cost, e.candidate))

    def within(e: Entry) -> bool:
        if e.measured is not None or e.kl_estimate is not None:
            return (e.measured["kld"] if e.measured else e.kl_estimate) <= ceiling
        return bool(e.bound) and e.bound.startswith("<=")

    pick: Optional[Entry] = None
    stepped_back: list[str] = []
    for e in entries:
        if pick is not None and e.cost[0] > pick.cost[0] * (1 + tie):
            break
        if not within(e):
            e.status = "measured over budget" if e.measured else "estimated over budget"
            continue
        e.measured = bench.measure(e.candidate)
        e.cost = costs.cost(e.candidate, e.measured["size_bytes"])
        if e.measured["kld"] <= max_kld:
            e.status = "measured within budget"
            if pick is None or e.cost < pick.cost:
                pick = e
        else:
            e.status = "measured over budget"
            if pick is None:
                stepped_back.append(e.candidate.name)
                log.info("search: %s measured KL %.4f > %g (estimate %s): stepping back to the next candidate",
                         e.candidate.name, e.measured["kld"], max_kld,
                         f"{e.kl_estimate:.4f}" if e.kl_estimate is not None else e.bound)
    for e in entries:
        if e.status.startswith("not examined") and not within(e):
            e.status = "measured over budget" if e.measured else "estimated over budget"
        elif e.status.startswith("not examined") and e.measured is not None:
            e.status = "measured earlier"
    if pick is not None:
        pick.status = "picked"
    result = SearchResult(max_kld, objective, space, entries, pick, stepped_back, notes, dict(bench.counts),
                          round(time.perf_counter() - start, 1), {k: round(v, 1) for k, v in bench.seconds.items()})
    if pick is None:
        measured = [e for e in entries if e.measured]
        best = min(measured, key=lambda e: e.measured["kld"])
        raise NoCandidate(result, f"search: no candidate meets KL <= {max_kld:g}: the best found is "
                                  f"{best.candidate.name} with a measured KL of {best.measured['kld']:.4f}")
    return result


class NoCandidate(DropquantError):
    """No candidate of the space is within the budget; `result` holds what the search found."""

    def __init__(self, result: SearchResult, message: str):
        super().__init__(message)
        self.result = result
