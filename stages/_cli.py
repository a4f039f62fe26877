"""What every stage CLI shares: --params/--set parsing, logging, and turning DropquantError into one clear exit."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Callable, Optional, Sequence

from dropquant.errors import DropquantError
from dropquant.params import Params, load_params_with_overrides


def stage_main(
    name: str,
    description: str,
    run: Callable[[Params, argparse.Namespace], None],
    argv: Optional[Sequence[str]] = None,
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None,
) -> int:
    parser = argparse.ArgumentParser(prog=f"dropquant {name}", description=description)
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. -S drop.n=4 (repeatable)")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    try:
        params = load_params_with_overrides(args.params, args.overrides)
        run(params, args)
    except DropquantError as err:
        print(f"dropquant {name}: error: {err}", file=sys.stderr)
        return 2
    logging.getLogger(f"dropquant.{name}").info("done in %.0f s, peak RSS %s", time.perf_counter() - start,
                                                 _peak_rss())
    return 0


def _peak_rss() -> str:
    """This process's own high-water mark (VmHWM; ru_maxrss can carry a parent's across exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return f"{int(line.split()[1]) / 2**20:.2f} GB"
    except OSError:
        pass
    return "unknown"
