"""`python -m flows <command>`: run the pipeline through Prefect.

  variant  one variant, each DVC stage a Prefect task      python -m flows variant -S drop.n=4 [--name attn-4]
  sweep    a grid of variants as DVC experiments + report  python -m flows sweep -m attn mlp -n 4 8 -q Q8_0
  search   the smallest/fastest variant within a KL budget  python -m flows search --max-kld 0.6 --minimize size
  serve    the sweep (or search) on a schedule, local server python -m flows serve [--cron "0 3 * * *"] [--max-kld 0.6]
  worker   run distributed-sweep variants in this clone    python -m flows worker --pool dropquant
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _jobs(value: str) -> int:
    try:
        jobs = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of jobs, got {value!r}") from None
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {jobs}")
    return jobs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("variant", help="run the pipeline for params.yaml (+ overrides), one Prefect task per stage")
    v.add_argument("--repo", default=".", help="DVC repository (default: the current directory)")
    v.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="write an override into params.yaml first, as `dvc exp run -S` does (repeatable)")
    v.add_argument("--stages", nargs="+", help="run only these stages (in DAG order)")
    v.add_argument("--name", help="save the result as a DVC experiment of this name")
    v.add_argument("--retries", type=int, default=0, help="retries of a stage that crashed (not of a refused input)")

    def grid_args(g):
        g.add_argument("--repo", default=".", help="DVC repository (default: the current directory)")
        g.add_argument("-m", "--methods", nargs="+", help="drop methods (default: params.yaml sweep.methods)")
        g.add_argument("-n", "--n", nargs="+", type=int, help="drop counts (default: sweep.n)")
        g.add_argument("-q", "--quant-types", nargs="+", help="GGUF types, or mix:<target> such as mix:4.8bpw (default: sweep.quant_types)")
        g.add_argument("--heal", nargs="+", help="heal methods (default: sweep.heal)")
        g.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override applied to every variant, e.g. -S eval.limit=50 (repeatable)")

    s = sub.add_parser("sweep", help="run a grid of variants as DVC experiments and write the comparison report")
    grid_args(s)
    s.add_argument("--out", help="report folder (default: reports/sweep-<time>/)")
    s.add_argument("--title", help="report title")
    s.add_argument("--jobs", type=_jobs, default=1, metavar="N",
                   help="variants at once: N >= 2 runs them as DVC queued experiments on this machine, "
                        "cores split between them (default 1: one after another in the workspace)")
    d = s.add_argument_group("distributed (docs/flows.md): variants as flow runs on a work pool, data on a DVC remote")
    d.add_argument("--distributed", action="store_true", help="run the variants on `python -m flows worker`s")
    d.add_argument("--pool", default="dropquant", help="Prefect work pool (default dropquant)")
    d.add_argument("--git-remote", default="origin", help="shared git remote for commits and experiments")
    d.add_argument("--dvc-remote", help="DVC remote for data and run-cache (default: the repository's default)")
    d.add_argument("--attempts", type=int, default=3, help="runs of a variant whose worker crashed (default 3)")
    d.add_argument("--crash-after", type=int, default=90, metavar="SECONDS",
                   help="a variant's run without a heartbeat this long counts as crashed and runs again (default 90)")
    d.add_argument("--port", type=int, default=4200,
                   help="without PREFECT_API_URL: the Prefect server on 127.0.0.1:PORT, started if none answers")

    q = sub.add_parser("search", help="the smallest (or fastest) variant whose KL from the unpruned model is within a "
                                      "budget, run as a DVC experiment with the full metrics")
    grid_args(q)
    q.add_argument("--max-kld", type=float, required=True, help="KL budget, from the unpruned model in its source precision")
    q.add_argument("--minimize", default="size", choices=["size", "tg", "pp", "kv"],
                   help="size: GGUF bytes; tg/pp: generation/prompt cost per token (estimated); kv: KV cache per token")
    q.add_argument("--max-acc-drop", type=float, help="also: average accuracy at most this far below the base's "
                                                      "(checked on the pick's pipeline run)")
    q.add_argument("--slack", type=float, default=0.15,
                   help="measure candidates estimated up to budget x (1 + slack) (default 0.15)")
    q.add_argument("--estimate-tokens", type=int, default=2048, help="held-out tokens for the drop estimates")
    q.add_argument("--no-run", action="store_true", help="pick only: do not run the pick through the pipeline")
    q.add_argument("--out", help="report folder (default: reports/search-<time>/)")
    q.add_argument("--title", help="report title")
    q.add_argument("--jobs", type=_jobs, default=1, metavar="N", help="run the pick as a DVC queued experiment")
    q.add_argument("--distributed", action="store_true", help="run the pick on `python -m flows worker`s")
    q.add_argument("--pool", default="dropquant", help="Prefect work pool (default dropquant)")
    q.add_argument("--git-remote", default="origin", help="shared git remote (distributed)")
    q.add_argument("--dvc-remote", help="DVC remote (distributed; default: the repository's default)")
    q.add_argument("--port", type=int, default=4200, help="Prefect server port (distributed, without PREFECT_API_URL)")

    w = sub.add_parser("worker", help="a Prefect process worker running distributed-sweep variants in this clone")
    w.add_argument("--repo", default=".", help="this worker's clone of the repository (default: the current directory)")
    w.add_argument("--pool", default="dropquant", help="Prefect work pool (default dropquant)")
    w.add_argument("--name", help="worker name (default: <host>-<clone folder>)")
    w.add_argument("--limit", type=int, default=1, help="variants at once on this worker (default 1)")
    w.add_argument("--git-remote", default="origin", help="the git remote sweeps come from (checked at start)")
    w.add_argument("--dvc-remote", help="the DVC remote to check at start (default: any configured)")

    r = sub.add_parser("serve", help="serve the sweep on a schedule from a local Prefect server (127.0.0.1)")
    grid_args(r)
    r.add_argument("--cron", help="cron schedule (default: params.yaml sweep.cron)")
    r.add_argument("--interval", type=float, help="schedule every INTERVAL seconds instead of a cron")
    r.add_argument("--port", type=int, default=4200, help="Prefect server port on 127.0.0.1 (default 4200)")
    r.add_argument("--max-kld", type=float, help="serve the search within this KL budget instead of the sweep")
    r.add_argument("--minimize", default="size", choices=["size", "tg", "pp", "kv"], help="the served search's objective")
    return p


def _grid_parameters(args) -> dict:
    out = {"methods": args.methods, "n": args.n, "quant_types": args.quant_types, "heal": args.heal,
           "overrides": args.overrides or None}
    return {k: v for k, v in out.items() if v is not None}


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "search":
        from dropquant.errors import DropquantError
        from dropquant.search.space import space_from

        try:  # refused before Prefect starts a server or DVC runs a stage
            space_from(args.methods, args.n, args.quant_types, args.heal)
        except DropquantError as err:
            print(f"dropquant flows search: error: {err}", file=sys.stderr)
            return 2
    if args.command in ("sweep", "search") and args.distributed and args.jobs > 1:
        parser.error("--jobs is for a sweep on this machine; a distributed sweep runs one variant per worker "
                     "(start more workers, or `python -m flows worker --limit N`)")
    # Offline by default outside `make` too (before Prefect is imported): its temporary server would send telemetry.
    for key, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"), ("DVC_NO_ANALYTICS", "1")):
        os.environ.setdefault(key, value)
    # Prefect prints flow and task logs itself; this is for the serve helper's own messages.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "serve":
        from flows.serve import serve_sweep

        try:
            search = args.max_kld is not None
            parameters = {**_grid_parameters(args),
                          **({"max_kld": args.max_kld, "minimize": args.minimize} if search else {})}
            serve_sweep(args.repo, cron=args.cron, interval=args.interval, port=args.port, parameters=parameters,
                        search=search)
        except KeyboardInterrupt:
            pass
        return 0

    from flows._dvc import DvcFailed, RepoBusy

    server = None
    try:
        if args.command == "worker":
            from flows.worker import start_worker

            start_worker(args.repo, args.pool, args.name, args.limit, args.git_remote, args.dvc_remote)
        if args.command in ("sweep", "search") and args.distributed and not os.environ.get("PREFECT_API_URL"):
            from flows.serve import start_server

            url, server = start_server("127.0.0.1", args.port)
            os.environ["PREFECT_API_URL"] = url  # before Prefect is first imported
        if args.command == "search":
            from flows.search import search_flow

            distributed = ({"pool": args.pool, "git_remote": args.git_remote, "dvc_remote": args.dvc_remote}
                           if args.distributed else None)
            result = search_flow(repo=args.repo, max_kld=args.max_kld, minimize=args.minimize,
                                 max_acc_drop=args.max_acc_drop, slack=args.slack, estimate_tokens=args.estimate_tokens,
                                 out=args.out, title=args.title, jobs=args.jobs, run_pick=not args.no_run,
                                 distributed=distributed, **_grid_parameters(args))
            print(f"report: {result['report']['report.md']}")
            print(result["experiment"] or result["pick"]["name"])
            return 0
        if args.command == "variant":
            from flows.variant import variant_flow

            result = variant_flow(repo=args.repo, overrides=args.overrides, stages=args.stages,
                                  experiment=args.name, retries=args.retries)
        elif args.distributed:
            from flows.distributed import distributed_sweep_flow

            result = distributed_sweep_flow(repo=args.repo, out=args.out, title=args.title, pool=args.pool,
                                            git_remote=args.git_remote, dvc_remote=args.dvc_remote,
                                            attempts=args.attempts, zombie_after_s=args.crash_after,
                                            **_grid_parameters(args))
        else:
            from flows.sweep import sweep_flow

            result = sweep_flow(repo=args.repo, out=args.out, title=args.title, jobs=args.jobs,
                                **_grid_parameters(args))
        if args.command == "sweep":
            print(f"report: {result['report']['report.md']}")
            for f in result["failures"]:
                print(f"failed: {f['name']}: {f['error']}", file=sys.stderr)
    except (DvcFailed, RepoBusy, FileNotFoundError) as err:
        print(f"dropquant flows {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            from flows.serve import stop

            stop(server)
    if args.command == "variant":
        print(json.dumps(result["stages"]))
    return 1 if args.command == "sweep" and result["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
