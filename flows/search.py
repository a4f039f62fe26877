"""Search: the smallest (or fastest) variant whose KL divergence from the unpruned model stays within a budget.

1. The shared stages (calibrate, score) run through DVC, cached as in any run: the drop order comes from them.
2. The library's search (dropquant/search) estimates and measures candidates in this process, charging every one
   on one scale (KL from the unpruned model in its source precision); measured candidates are cached in
   .dropquant/search/, so a search run again never measures one twice.
3. The pick runs as an ordinary DVC experiment, the whole pipeline with `eval.source_kld=true`, on the sweep's
   back-ends (one after another, `--jobs N` queued, `--distributed` on workers): nothing new runs it. When the
   pipeline's KL (or accuracy drop, with --max-acc-drop) is over the bound, the next measured candidate runs.
4. The report: candidates.json, report.md, report.html and frontier.png in reports/search-<time>/.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows._dvc import DvcFailed, check, find_repo, repo_lock, run_dvc

SEARCH_CACHE = ".dropquant/search"
# Overrides the search cannot honour: the scores it reads come from the workspace's own calibrate/score stages.
FIXED_SECTIONS = ("model.", "calibration.", "score.", "drop.layers")


def check_overrides(overrides: list[str]) -> None:
    fixed = [o for o in overrides if o.startswith(FIXED_SECTIONS)]
    if fixed:
        raise DvcFailed(f"search: {fixed} would change the model or its scores; edit params.yaml instead (the "
                        "search reads the scores of the workspace's score stage)", user_error=True)


@task(name="shared stages", cache_policy=NONE, persist_result=False)
def prime(repo: str) -> None:
    log = get_run_logger()
    check(run_dvc(["repro", "score"], Path(repo), log.info))


@task(name="search", cache_policy=NONE, persist_result=False)
def run_search(repo: str, overrides: list[str], max_kld: float, objective: str, space: dict, slack: float,
               estimate_tokens: int):
    from dropquant.artifacts import file_sha256, read_calibration, read_json
    from dropquant.params import load_params_with_overrides
    from dropquant.search.pick import search
    from dropquant.search.space import Space
    from dropquant.search.workbench import Workbench

    root = Path(repo)
    params = load_params_with_overrides(root / "params.yaml", overrides)
    scores_path = root / "data/scores/scores.json"
    scores = read_json(scores_path, "scores", "run the score stage")
    calibration = None
    if any(h != "none" for h in space["heal"]):
        from dropquant.model.loading import load_config, model_identity, resolve_source

        source = resolve_source(params.model.source, params.model.revision)
        tokens, manifest = read_calibration(root / "data/calibration/tokens.safetensors",
                                            model_identity(load_config(source), source))
        calibration = (tokens, manifest["sha256"])
    bench = Workbench(params, scores, file_sha256(scores_path), root / SEARCH_CACHE, calibration=calibration,
                      estimate_tokens=estimate_tokens, threads=params.eval.threads)
    try:
        return search(bench, Space(space["methods"], space["n"], space["quant_types"], space["heal"]), max_kld,
                      objective, slack=slack)
    finally:
        bench.close()


def _run_pick(root: Path, candidate, overrides: list[str], jobs: int, distributed: dict, out: Path) -> dict:
    """The candidate through the sweep's own back-ends (a grid of one); its row of `dvc exp show`."""
    name = candidate.name
    c = candidate.to_json()
    grid = {"methods": [c["method"]], "n": [c["n"]], "quant_types": [c["quant_type"]], "heal": [c["heal"]],
            "overrides": ["eval.source_kld=true", *overrides]}
    if distributed:
        from flows.distributed import distributed_sweep_flow

        result = distributed_sweep_flow(repo=str(root), out=str(out), title=f"search pick {name}", **distributed,
                                        **grid)
    elif jobs > 1:
        from flows.plan import plan_sweep
        from flows.queue import queue_sweep

        plan = plan_sweep(root, grid["methods"], grid["n"], grid["quant_types"], grid["heal"],
                                     grid["overrides"])
        result = queue_sweep(root, plan, jobs, str(out), f"search pick {name}", get_run_logger())
    else:
        from flows.sweep import sweep_flow

        result = sweep_flow(repo=str(root), out=str(out), title=f"search pick {name}", **grid)
    if result["failures"] or not result["rows"]:
        raise DvcFailed(f"the pipeline run of {name} failed: {result['failures'][0]['error'] if result['failures'] else 'no metrics'}")
    return result["rows"][0]


@flow(name="dropquant-search")
def search_flow(repo: str = ".", max_kld: float = 0.6, minimize: str = "size", methods: Optional[list[str]] = None,
                n: Optional[list[int]] = None, quant_types: Optional[list[str]] = None,
                heal: Optional[list[str]] = None, overrides: Optional[list[str]] = None,
                max_acc_drop: Optional[float] = None, slack: float = 0.15, estimate_tokens: int = 2048,
                out: Optional[str] = None, title: Optional[str] = None, jobs: int = 1, run_pick: bool = True,
                distributed: Optional[dict] = None) -> dict:
    """Find the best variant by `minimize` (size | tg | pp | kv) whose KL from the unpruned model is <= max_kld
    (and whose accuracy drop is <= max_acc_drop, when given), and run it as a DVC experiment."""
    from dropquant.errors import DropquantError
    from dropquant.search.pick import NoCandidate
    from dropquant.search.report import write_search_report
    from dropquant.search.space import check_objective, space_from

    log = get_run_logger()
    root = find_repo(repo)
    overrides = list(overrides or [])
    try:  # everything that can be refused is refused before any work
        space = space_from(methods, n, quant_types, heal).to_json()
        check_objective(minimize)
    except DropquantError as err:
        raise DvcFailed(str(err), user_error=True) from None
    check_overrides(overrides)
    started = time.monotonic()
    out_dir = Path(out) if out else root / "reports" / f"search-{time.strftime('%Y%m%d-%H%M%S')}"
    with repo_lock(root, "search"):
        prime(str(root))
    summary = {"max_kld": max_kld, "objective": minimize, "max_acc_drop": max_acc_drop, "space": space,
               "slack": slack, "overrides": overrides, "reference": "the unpruned model in its source precision"}
    try:
        result = run_search(str(root), overrides, max_kld, minimize, space, slack, estimate_tokens)
    except NoCandidate as err:
        r = err.result
        write_search_report(out_dir, {**summary, "pick": None, "counts": r.counts},
                            r.candidates_json(), [str(err), *r.notes], title)
        raise DvcFailed(f"{err} (report: {out_dir})", user_error=True) from None
    except DropquantError as err:
        raise DvcFailed(str(err), user_error=True) from None
    notes = [f"Budget: KL <= {max_kld:g} from the unpruned model in its source precision"
             + (f", accuracy drop <= {max_acc_drop:g}" if max_acc_drop is not None else "")
             + f"; objective: {minimize}; space: {json.dumps(space)}.",
             f"Search: {result.counts['estimated']} drop estimate(s), {result.counts['measured']} candidate(s) "
             f"measured, {result.counts['reused']} reused from earlier searches, in {result.seconds:.0f} s "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in result.phases.items())}).", *result.notes]
    for name in result.stepped_back:
        notes.append(f"Stepped back: {name} was estimated within the budget but measured over it.")
    pipeline = None
    experiment = None
    if run_pick:
        tried = []
        for e in result.ranked_after_pick():
            name = e.candidate.name
            log.info("running the pick %s through the whole pipeline as a DVC experiment", name)
            row = _run_pick(root, e.candidate, overrides, jobs, distributed or {}, out_dir / "runs" / name)
            drop = -(row.get("avg_delta") or 0.0)
            tried.append(name)
            reasons = []
            if row.get("kld_source") is None or row["kld_source"] > max_kld:
                reasons.append(f"the pipeline measured KL {row.get('kld_source')} > {max_kld:g}")
            if max_acc_drop is not None and drop > max_acc_drop:
                reasons.append(f"accuracy drop {drop:.4f} > {max_acc_drop:g}")
            if not reasons:
                pipeline, experiment = row, name
                break
            notes.append(f"Stepped back: {name}: {'; '.join(reasons)}.")
            log.warning("%s: %s; stepping back to the next candidate", name, "; ".join(reasons))
        if experiment is None:
            write_search_report(out_dir, {**summary, "pick": None, "tried": tried}, result.candidates_json(), notes,
                                title)
            raise DvcFailed(f"search: no measured candidate passed the whole pipeline's check ({', '.join(tried)}); "
                            f"report: {out_dir}", user_error=True)
    pick = result.pick if experiment is None else next(e for e in result.entries if e.candidate.name == experiment)
    pick.status = "picked"
    if pick is not result.pick:
        result.pick.status = "measured within budget (failed the pipeline's check)"
    summary.update({"pick": pick.candidate.to_json(), "experiment": experiment, "pipeline": pipeline,
                    "counts": result.counts, "search_seconds": result.seconds,
                    "seconds": round(time.monotonic() - started, 1)})
    if pipeline is not None:
        notes.insert(0, f"Pick: {experiment} ({pick.measured['size_bytes'] / 1e6:.1f} MB, KL {pick.measured['kld']:.4f} "
                        f"measured by the search, {pipeline['kld_source']:.4f} by the pipeline; avg accuracy "
                        f"{pipeline.get('avg')} vs base {pipeline.get('base_avg')}). Reproduce: "
                        f"`dvc exp apply {experiment}` then `dvc repro`.")
    else:
        notes.insert(0, f"Pick: {pick.candidate.name} ({pick.measured['size_bytes'] / 1e6:.1f} MB, KL "
                        f"{pick.measured['kld']:.4f}); not run through the pipeline (--no-run).")
    paths = write_search_report(out_dir, summary, result.candidates_json(), notes, title)
    log.info("search report: %s", out_dir)
    return {"report": {k: str(p) for k, p in paths.items()}, "experiment": experiment,
            "pick": pick.candidate.to_json(), "measured": pick.measured, "pipeline": pipeline, "notes": notes}
