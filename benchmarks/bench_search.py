"""Search against the exhaustive grid, on the embedded model: does the search pick what measuring every candidate
picks, and at what share of the grid's wall time?

Space {attn, mlp, block, joint} x n in {0, 2, ..., 16} x {Q8_0, Q6_K, Q4_K_M}, heal none, objective size. The
ground truth measures every candidate (exported, quantized, full KL from the reference on the evaluate stage's
held-out tokens) with the same Workbench the search uses; a candidate whose file is another's (joint-n dropping
the same attention layers as attn-n) is measured once, as the search does. Each search starts cold (its own empty
cache, the model loaded again, the reference exported again), as does the grid, so both times include that.
The pick's full-pipeline run (accuracy, chat, speed) is left out of both: the grid would need it too.

Needs data/scores/scores.json of the default parameters (`dvc repro score` first; this runs it).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (0.3, 0.6, 1.2)


def _bench(params, cache: Path):
    from dropquant.artifacts import file_sha256, read_json
    from dropquant.search.workbench import Workbench

    scores = ROOT / "data/scores/scores.json"
    return Workbench(params, read_json(scores, "scores", "dvc repro score"), file_sha256(scores), cache,
                     progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--n", type=int, nargs="+", default=list(range(0, 17, 2)))
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from dropquant.params import load_params
    from dropquant.search.pick import NoCandidate, search
    from dropquant.search.space import Space

    subprocess.run([sys.executable, "-m", "dvc", "repro", "score"], cwd=ROOT, check=True, capture_output=True)
    params = load_params(ROOT / "params.yaml")
    space = Space(["attn", "mlp", "block", "joint"], args.n, ["Q8_0", "Q6_K", "Q4_K_M"])
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    try:
        start = time.perf_counter()
        grid = _bench(params, work / "grid")
        truth = {c: grid.measure(c) for c in space.candidates()}
        grid_s = time.perf_counter() - start
        grid_n = grid.counts["measured"]
        grid.close()
        print(f"exhaustive grid: {len(truth)} candidates, {grid_n} distinct files measured, {grid_s:.0f} s")
        out = {"grid": {"seconds": grid_s, "candidates": len(truth), "measured": grid_n}, "budgets": []}
        for budget in args.budgets:
            ok = [(r["size_bytes"], c.name, r["kld"]) for c, r in truth.items() if r["kld"] <= budget]
            best = min(ok) if ok else None
            start = time.perf_counter()
            bench = _bench(params, work / f"search-{budget}")
            try:
                result = search(bench, space, budget, "size")
                pick = (result.pick.measured["size_bytes"], result.pick.candidate.name, result.pick.measured["kld"])
            except NoCandidate as err:
                result, pick = err.result, None
            seconds = time.perf_counter() - start
            counts = dict(bench.counts)
            bench.close()
            same = (pick is None and best is None) or (pick and best and pick[0] == best[0])
            why = ""
            if not same:
                why = (f"grid {best[1] if best else None} ({best[2] if best else ''}) vs search "
                       f"{pick[1] if pick else None}: the search did not measure the grid's pick "
                       "(its estimate was over budget x (1 + slack))")
            row = {"budget": budget, "grid_pick": best and best[1], "grid_kld": best and best[2],
                   "grid_mb": best and best[0] / 1e6, "search_pick": pick and pick[1], "search_kld": pick and pick[2],
                   "search_mb": pick and pick[0] / 1e6, "same_size": bool(same), "search_s": seconds,
                   "share_of_grid": seconds / grid_s, "measured": counts["measured"], "estimated": counts["estimated"],
                   "stepped_back": result.stepped_back, "why_differs": why}
            out["budgets"].append(row)
            print(f"KLD <= {budget:g}: grid {row['grid_pick']} ({row['grid_mb']:.1f} MB, KL {row['grid_kld']:.4f}); "
                  f"search {row['search_pick']} ({row['search_mb']:.1f} MB, KL {row['search_kld']:.4f}) "
                  f"{'same' if same else 'DIFFERENT: ' + why}; search {seconds:.0f} s = {100 * seconds / grid_s:.1f}% "
                  f"of the grid; {counts['measured']} measured + {counts['estimated']} drop estimates"
                  + (f"; stepped back from {result.stepped_back}" if result.stepped_back else ""))
        print("one run on a shared machine: the shares are single measurements (no spread); the grid and the "
              "searches ran one after another, so a load change between them moves the share")
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
