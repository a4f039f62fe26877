"""`dropquant <stage> [--params params.yaml] [-S key=value ...]`: run one pipeline stage by hand, outside DVC."""
from __future__ import annotations

import importlib
import sys

STAGES = ("calibrate", "score", "drop", "quantize", "evaluate")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print(__doc__.strip())
        print("\nstages: " + ", ".join(STAGES) + "\n`dropquant <stage> --help` lists a stage's options.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(f"stages.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
