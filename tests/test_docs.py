"""The README's commands work and the documentation's links and code paths point at something that exists.

Every command in a fenced ```bash block of README.md is checked with the real parsers, without doing the work:

- `dropquant <stage> ...` / `python -m stages[.<stage>] ...`: the stage's own CLI parses the arguments and
  loads params.yaml with the `-S` overrides (validated by dropquant/params.py), with the stage's work replaced
  by nothing; a `--help` form is run as it is, in a subprocess.
- `python -m flows ...`, `make sweep|serve ARGS="..."`: the flows CLI's own parser, then the `-S` overrides
  against params.yaml's schema and the grid (methods, quant types, heal methods) against `sweep:`'s.
- `dvc ...`: DVC's own argument parser; `-S` overrides against params.yaml's schema; stage names in dvc.yaml.
- `make <target>`: a target of the Makefile.
- `python -m <module>`: the module exists (`--help` forms run in a subprocess).
- `pytest FILE`, `. .venv/bin/activate`: the file exists / the Makefile makes that venv.

A command that is not run as written (anything but a `--help` form: it would train, download or take minutes)
must be listed in EXPENSIVE, with why; a command of a program with no check here (llama-cli, git, ...) too.
EXPENSIVE is kept in step with the README both ways: an entry the README no longer has fails as well.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

# README commands not run as written, each with why. Normalised: comment removed, whitespace collapsed, a
# backslash-continued command on one line. Their cheap checks (parsers, parameters, targets) still run.
EXPENSIVE = {
    "make run": "the whole set-up and pipeline (minutes)",
    "make test": "the whole suite",
    "make setup && . .venv/bin/activate": "installs the venv and builds llama.cpp",
    "dvc exp run -S model.source=Qwen/Qwen2.5-7B -S calibration.source=../shared/data/c4/train-sample.jsonl "
    "-S drop.method=attn -S drop.n=8 -S quantize.type=Q4_K_M": "downloads and prunes a 7B model",
    "dvc exp show --only-changed --drop data/": "needs experiments",
    "llama-cli -m data/gguf/model.gguf -cnv -fa on": "llama.cpp's CLI (not in the venv) on the pipeline's output",
    "dropquant drop -S drop.method=mlp -S drop.n=4": "a drop stage",
    "dropquant report": "needs the pipeline's outputs",
    "dvc repro": "the pipeline",
    "dvc exp run -S drop.method=joint -S drop.n=8": "a pipeline run",
    'make sweep ARGS="-m attn mlp block joint -n 4 8 -q Q8_0 Q4_K_M -S eval.limit=50"': "a sweep",
    'make sweep ARGS="-m attn -n 8 --heal none linear linear+distill"': "a sweep",
    "python -m flows sweep --jobs 2 -m attn mlp -n 4 8 -S eval.speed=false": "a queued sweep",
    "python -m flows sweep --distributed -m attn mlp -n 4 8 -q Q8_0 Q4_K_M": "a distributed sweep",
    "make serve": "a Prefect server until Ctrl-C",
    "python -m flows search --max-kld 0.6 --minimize size": "a search and its pick's pipeline run (12 min here)",
    "python -m flows search --max-kld 0.3 --minimize tg -m attn block -q Q8_0 Q6_K Q4_K_M --heal none linear":
        "a search with healing",
    'make sweep ARGS="-m attn mlp block joint -n 8 -q Q8_0"': "a sweep",
    ".venv/bin/pytest tests/test_scoring.py": "a test file",
    "OMP_NUM_THREADS=1 dvc repro": "the pipeline",
    "make bench": "the benchmarks",
    "dvc exp run -S quantize.type=mix -S quantize.target=93.5MB": "a pipeline run (the mix's parameters are checked)",
    "python -m flows search --max-kld 0.6 -q Q4_K_M mix:4.8bpw mix:5.5bpw": "a search (its axes are checked)",
}


# --- reading commands out of Markdown ----------------------------------------------------------------------

def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # outside quotes, at the start or after whitespace)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def commands(text: str) -> list[str]:
    """Every command of the Markdown's bash blocks, normalised (see EXPENSIVE)."""
    out = []
    for block in bash_blocks(text):
        pending = ""
        for raw in block.splitlines():
            line = strip_comment(raw).rstrip()
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line = " ".join((pending + line).split())
            pending = ""
            if line:
                out.append(line)
    return out


def simple_commands(command: str) -> list[list[str]]:
    """A command line split at &&, ||, ;, | and & into argv lists."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    parts, argv = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            if argv:
                parts.append(argv)
            argv = []
        else:
            argv.append(token)
    if argv:
        parts.append(argv)
    return parts


# --- checks per program; each returns True when it ran the command as written --------------------------------

class Unchecked(Exception):
    """No check for this program: the command must be in EXPENSIVE."""


def check_overrides(overrides: list[str]) -> None:
    from dropquant.params import load_params_with_overrides

    load_params_with_overrides(ROOT / "params.yaml", overrides)  # DropquantError names the key and the value


def quiet_call(fn, *args):
    """fn(*args) with its output captured; a non-zero exit (SystemExit or a returned int) fails with its stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = fn(*args)
        except SystemExit as exit_:
            result = exit_.code or 0
    if isinstance(result, int) and not isinstance(result, bool) and result != 0:
        raise AssertionError(f"exit {result}: {err.getvalue().strip()[-800:]}")
    return result


def run_help(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and "usage" in done.stdout.lower(), (argv, done.stderr[-1000:])


def check_stage(argv: list[str], monkeypatch) -> bool:
    """`dropquant <stage> args`: the stage's CLI parses args and params (+ overrides); its work is skipped."""
    import stages._cli
    from stages.__main__ import STAGES

    assert argv and argv[0] in STAGES, f"unknown stage {argv[:1]} (stages: {STAGES})"
    if any(a in ("-h", "--help") for a in argv[1:]):
        run_help(["-m", "stages", *argv])
        return True
    module = importlib.import_module(f"stages.{argv[0]}")
    original = stages._cli.stage_main
    seen = {}

    def parse_only(name, description, run, args=None, add_arguments=None):
        return original(name, description, lambda params, ns: seen.update(params=params), args, add_arguments)

    monkeypatch.setattr(stages._cli, "stage_main", parse_only)
    if hasattr(module, "stage_main"):
        monkeypatch.setattr(module, "stage_main", parse_only)
    quiet_call(module.main, argv[1:])
    assert "params" in seen, f"dropquant {' '.join(argv)}: the stage did not reach its work"
    return False


def check_flows(argv: list[str]) -> bool:
    from flows.__main__ import _parser

    from dropquant.params import SweepParams

    if any(a in ("-h", "--help") for a in argv):
        quiet_call(_parser().parse_args, argv)
        return True
    args = quiet_call(_parser().parse_args, argv)
    check_overrides(getattr(args, "overrides", []))
    if args.command in ("sweep", "serve"):
        grid = {"methods": args.methods, "n": args.n, "quant_types": args.quant_types, "heal": args.heal}
        SweepParams(**{k: v for k, v in grid.items() if v is not None})
    return False


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def check_make(argv: list[str]) -> bool:
    targets = [a for a in argv if "=" not in a and not a.startswith("-")]
    assignments = dict(a.split("=", 1) for a in argv if "=" in a)
    missing = set(targets) - makefile_targets()
    assert targets and not missing, f"make: no target {sorted(missing)} in the Makefile"
    if "ARGS" in assignments:
        assert len(targets) == 1 and targets[0] in ("sweep", "serve"), "ARGS is read by make sweep / make serve"
        check_flows([targets[0], *shlex.split(assignments["ARGS"])])
    return False


def check_dvc(argv: list[str]) -> bool:
    from dvc.cli.parser import get_main_parser

    try:
        args = quiet_call(get_main_parser().parse_args, argv)
    except Exception as err:  # DVC's parser raises its own error after printing the usage
        raise AssertionError(f"dvc {' '.join(argv)}: {err!r}") from None
    check_overrides(getattr(args, "set_param", None) or [])
    stages = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    unknown = [t for t in getattr(args, "targets", None) or [] if t not in stages]
    assert not unknown, f"dvc {' '.join(argv)}: no stage {unknown} in dvc.yaml"
    return False


def check_python_module(argv: list[str], monkeypatch) -> bool:
    assert len(argv) >= 2 and argv[0] == "-m", f"python {' '.join(argv)}: only `python -m MODULE` is checked"
    module, rest = argv[1], argv[2:]
    if module == "flows":
        return check_flows(rest)
    if module == "stages":
        return check_stage(rest, monkeypatch)
    if module.startswith("stages."):
        return check_stage([module.split(".", 1)[1], *rest], monkeypatch)
    assert module_exists(module), f"no module {module} in this checkout"
    if any(a in ("-h", "--help") for a in rest):
        run_help(argv)
        return True
    return False


def check_command(argv: list[str], monkeypatch) -> bool:
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # environment assignments
        argv = argv[1:]
    program, rest = argv[0], argv[1:]
    if program == "dropquant":
        return check_stage(rest, monkeypatch)
    if program in ("python", "python3", ".venv/bin/python"):
        return check_python_module(rest, monkeypatch)
    if program == "make":
        return check_make(rest)
    if program in ("dvc", ".venv/bin/dvc"):
        return check_dvc(rest)
    if program in ("pytest", ".venv/bin/pytest"):
        files = [a for a in rest if not a.startswith("-")]
        missing = [f for f in files if not (ROOT / f.split("::")[0]).exists()]
        assert not missing, f"pytest: no such test file {missing}"
        return False
    if program in (".", "source"):
        assert rest == [".venv/bin/activate"] and "VENV := .venv" in (ROOT / "Makefile").read_text(), rest
        return False
    raise Unchecked(program)


README_COMMANDS = commands(README.read_text())


@pytest.mark.parametrize("command", README_COMMANDS)
def test_readme_command(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    check_readme_command(command, monkeypatch)


def check_readme_command(command: str, monkeypatch) -> None:
    ran = True
    for argv in simple_commands(command):
        try:
            ran &= check_command(argv, monkeypatch)
        except Unchecked as program:
            assert command in EXPENSIVE, (f"README command `{command}`: no check for `{program}`; list it in "
                                          "EXPENSIVE in tests/test_docs.py with why")
            ran = False
    if not ran:
        assert command in EXPENSIVE, (f"README command `{command}` is not run by this test: make it cheap "
                                      "(a --help form) or list it in EXPENSIVE in tests/test_docs.py with why")


def test_expensive_list_in_step_with_readme():
    stale = sorted(set(EXPENSIVE) - set(README_COMMANDS))
    assert not stale, f"EXPENSIVE lists commands the README no longer has: {stale}"


def test_readme_has_commands():
    assert len(README_COMMANDS) >= 10 and any("--help" in c for c in README_COMMANDS)


# --- links and code paths in README.md and docs/ -----------------------------------------------------------

MARKDOWN = [README, *DOCS]


def links(text: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # not inside code blocks
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(page):
    broken = []
    for target in links(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # http(s)://, mailto:, same-page anchors
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files {broken}"


def test_docs_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text()
    unlisted = [p.name for p in DOCS if p.name != "README.md" and f"]({p.name})" not in index]
    assert not unlisted, f"docs/README.md does not link {unlisted}"


CODE_PATH = re.compile(r"(?<![\w/.])((?:dropquant|stages|flows|benchmarks|tests|scripts)/[\w/.-]*\w)")
# `dropquant.x.y` that are config or JSON keys, not Python names.
NOT_PYTHON = {"dropquant.plan_id"}


def test_code_paths_exist():
    """Every dropquant/..., stages/..., tests/... path and dropquant.x.y name in README.md and docs/ exists."""
    missing = []
    for page in MARKDOWN:
        text = page.read_text()
        for path in set(CODE_PATH.findall(text)):
            if "<" in path or "*" in path:
                continue
            if not (ROOT / path).exists():
                missing.append(f"{page.name}: {path}")
        for name in set(re.findall(r"`[^`]*?(?<![\w/.-])(dropquant(?:\.[A-Za-z_]\w*)+)", text)):
            if name in NOT_PYTHON:
                continue
            if not resolves(name):
                missing.append(f"{page.name}: {name}")
    assert not missing, f"paths or names that do not exist: {sorted(missing)}"


def module_exists(name: str) -> bool:
    """A module of this checkout (an editable install elsewhere on the path does not count)."""
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return False
    origin = spec and (spec.origin or next(iter(spec.submodule_search_locations or []), None))
    return bool(origin) and Path(origin).resolve().is_relative_to(ROOT)


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        if not module_exists(module):
            continue
        obj = importlib.import_module(module)
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
            file = getattr(obj, "__file__", None) if obj is not None else None
            if obj is None or (file and not Path(file).resolve().is_relative_to(ROOT)):
                return False
        return True
    return False


# --- the checks can fail -------------------------------------------------------------------------------------

@pytest.mark.parametrize("command, error", [
    ("dropquant drop -S drop.methd=mlp", "unknown key"),
    ("dropquant drop -S drop.method=heads", "drop.method"),
    ("dropquant nosuchstage", "unknown stage"),
    ("python -m dropquant.no_such_module --layers 2", "no module"),
    ("dvc exp run -S eval.nosuch=1", "unknown key"),
    ("dvc repro nosuchstage", "no stage"),
    ('make sweep ARGS="-m heads -n 4"', "methods"),
    ("make nosuchtarget", "no target"),
    ("python -m flows sweep --no-such-flag", "exit 2"),
    (".venv/bin/pytest tests/test_nosuch.py", "no such test file"),
])
def test_checks_catch_bad_commands(command, error, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(Exception, match=error):
        for argv in simple_commands(command):
            check_command(argv, monkeypatch)


@pytest.mark.parametrize("command, error", [
    ("dropquant drop -S drop.n=2", "not run by this test"),           # valid, but neither cheap nor listed
    ("llama-server -m data/gguf/model.gguf", "no check for `llama-server`"),
])
def test_new_readme_command_must_be_cheap_or_listed(command, error, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(AssertionError, match=error):
        check_readme_command(command, monkeypatch)
