"""`make bench`: every performance target, each measured as a ratio side by side in one run."""
import importlib
import pkgutil
import sys
from pathlib import Path


def main() -> int:
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_"))
    only = sys.argv[1:]
    sys.argv = sys.argv[:1]  # each benchmark parses its own (default) options
    for name in names:
        if only and name not in only and name.removeprefix("bench_") not in only:
            continue
        print(f"== {name} ==", flush=True)
        importlib.import_module(f"benchmarks.{name}").main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
