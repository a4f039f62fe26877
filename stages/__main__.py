"""`dropquant <stage> [--params params.yaml] [-S key=value ...]`: run one pipeline stage by hand, outside DVC."""
from __future__ import annotations

import importlib
import sys

STAGES = ("calibrate", "score", "drop", "heal", "quantize", "evaluate", "report")


def usage() -> str:
    return (__doc__.strip() + "\n\nstages: " + ", ".join(STAGES)
            + "\n`dropquant <stage> --help` lists a stage's options.")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] not in STAGES:
        print(f"dropquant: unknown stage '{argv[0]}' (stages: {', '.join(STAGES)})", file=sys.stderr)
        return 2
    return importlib.import_module(f"stages.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
