"""Report: print the current variant's plan and metrics as a table (what `make run` ends with)."""
from __future__ import annotations

import json
from pathlib import Path

from stages._cli import stage_main

PLAN = Path("data/drop/plan.json")
METRICS = Path("data/eval/metrics.json")


def flatten(d: dict, prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def run(params, args) -> None:
    from rich.console import Console
    from rich.table import Table

    from dropquant.errors import DropquantError

    console = Console()
    if args.plan.is_file():
        plan = json.loads(args.plan.read_text())
        console.print(f"[bold]plan[/bold]: method={plan.get('method')} n={plan.get('n')} "
                      f"attn={plan.get('attn')} mlp={plan.get('mlp')} blocks={plan.get('blocks')}")
    if not args.metrics.is_file():
        raise DropquantError(f"no metrics at {args.metrics}: run `dvc repro` first")
    metrics = json.loads(args.metrics.read_text())
    table = Table(title=f"dropquant results ({args.metrics})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in flatten(metrics):
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


def main(argv=None) -> int:
    def add(p):
        p.add_argument("--plan", type=Path, default=PLAN)
        p.add_argument("--metrics", type=Path, default=METRICS)
    return stage_main("report", __doc__, run, argv, add)


if __name__ == "__main__":
    raise SystemExit(main())
