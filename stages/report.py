"""Report: the current variant against the unpruned model on one screen (what `make run` ends with).

Base and variant side by side with the difference and standard errors, from data/eval/details.json; what was not
measured is named once; the last line is the verdict. `--all` prints every figure of metrics.json as it is.
"""
from __future__ import annotations

import json
from pathlib import Path

from stages._cli import stage_main

PLAN = Path("data/drop/plan.json")
METRICS = Path("data/eval/metrics.json")
DETAILS = Path("data/eval/details.json")


def run(params, args) -> None:
    from dropquant.artifacts import params_digest
    from dropquant.errors import DropquantError
    from dropquant.summary import render

    if not args.metrics.is_file():
        raise DropquantError(f"no metrics at {args.metrics}: run `dvc repro` first")
    if not args.details.is_file():
        raise DropquantError(f"no evaluation details at {args.details}: run `dvc repro` first")
    if args.all:
        print(args.metrics.read_text(), end="")
        return
    details = json.loads(args.details.read_text())
    m = details.get("metrics")
    if m is None:
        raise DropquantError(f"{args.details} was written by an older evaluate stage: run `dvc repro` again")
    recorded = (m.get("variant") or {}).get("params")
    stale = recorded is not None and recorded != params_digest(params)
    plan = details.get("plan") or (json.loads(args.plan.read_text()) if args.plan.is_file() else None)
    model = None
    try:
        from dropquant.naming import model_name

        model = model_name(((plan or {}).get("model") or {}).get("source") or params.model.source)
    except Exception:  # a name for the heading is never worth failing the report over
        pass
    print(render(m, details.get("speed"), plan, params.model_dump(mode="json"), model), end="")
    if stale:
        print("note: these figures were measured with other parameters than params.yaml's: run `dvc repro`")


def main(argv=None) -> int:
    def add(p):
        p.add_argument("--plan", type=Path, default=PLAN)
        p.add_argument("--metrics", type=Path, default=METRICS)
        p.add_argument("--details", type=Path, default=DETAILS)
        p.add_argument("--all", action="store_true", help="print metrics.json as it is")
    return stage_main("report", __doc__, run, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
