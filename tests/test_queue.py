"""The workspace rule behind queued sweeps (`python -m flows sweep --jobs N`), the thread split, the queue-log
parsing and `dvc queue status` asked again after a transient failure. The queued sweep end to end is in
tests/test_flows.py (test_queued_sweep_matches_the_sequential_one): its reference is that file's sequential sweep
of the same grid, on the same tiny model.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# --- the workspace rule ---------------------------------------------------------------------------------------------

def test_workspace_path_takes_relative_paths_from_the_workspace(tmp_path, monkeypatch):
    from dropquant.workspace import WORKSPACE_ENV, workspace_path

    monkeypatch.delenv(WORKSPACE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert workspace_path("../shared/data") == tmp_path / "../shared/data"
    assert workspace_path("/abs/x") == Path("/abs/x")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert workspace_path("~/m") == tmp_path / "home" / "m"
    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path / "ws"))
    assert workspace_path("data/c4") == tmp_path / "ws" / "data" / "c4"
    assert workspace_path("/abs/x") == Path("/abs/x")  # absolute paths never move
    monkeypatch.setenv(WORKSPACE_ENV, "")
    assert workspace_path("a") == tmp_path / "a"  # empty = unset


def test_stages_resolve_params_paths_from_the_workspace(tmp_path, monkeypatch, tiny_llama):
    from dropquant.calibration import resolve_files
    from dropquant.errors import DropquantError
    from dropquant.evaluation.tasks import resolve_data_dir
    from dropquant.model.loading import resolve_source
    from dropquant.workspace import WORKSPACE_ENV

    ws, elsewhere = tmp_path / "ws", tmp_path / "copy"
    (ws / "texts").mkdir(parents=True)
    elsewhere.mkdir()
    (ws / "texts" / "b.txt").write_text("b")
    (ws / "texts" / "a.jsonl").write_text('{"text": "a"}\n')
    tiny_llama.save_pretrained(ws / "model")
    monkeypatch.chdir(elsewhere)  # a stage running in a copy of the project
    monkeypatch.setenv(WORKSPACE_ENV, str(ws))
    assert resolve_files("texts/*") == [ws / "texts" / "a.jsonl", ws / "texts" / "b.txt"]
    assert resolve_source("model").location == str((ws / "model").resolve())
    assert resolve_data_dir("../data") == (tmp_path / "data").resolve()
    monkeypatch.delenv(WORKSPACE_ENV)
    with pytest.raises(DropquantError, match="no file matches 'texts/\\*'"):
        resolve_files("texts/*")
    with pytest.raises(DropquantError):
        resolve_source("./model")
    assert resolve_data_dir("../data") == (tmp_path / "data").resolve()  # from the copy's parent: tmp_path too
    assert resolve_data_dir(None) is None or os.environ.get("DROPQUANT_EVAL_DATA")


def test_threads_per_job_split_the_cores():
    from flows.queue import thread_overrides, threads_per_job

    assert [threads_per_job(j, cpus=2) for j in (1, 2, 3)] == [2, 1, 1]
    assert threads_per_job(2, cpus=16) == 8 and threads_per_job(3, cpus=16) == 5
    assert thread_overrides(1, []) == ["eval.threads=1", "eval.speed_threads=1"]
    assert thread_overrides(4, ["eval.threads=2", "eval.limit=5"]) == ["eval.speed_threads=4"]  # the user's wins


def test_queue_logs_parse_like_a_streamed_run():
    from flows._dvc import failure_message
    from flows.queue import parse_log

    lines = ["Reproducing experiment 'attn-9-Q8_0'", "Stage 'calibrate' is cached - skipping run, checking out outputs",
             "Stage 'score' didn't change, skipping", "Running stage 'drop':", "> python -m stages.drop",
             "dropquant drop: error: drop.n=9 is larger than method 'attn' can drop",
             "ERROR: failed to reproduce 'drop': failed to run: python -m stages.drop, exited with 2"]
    result = parse_log(lines, 1)
    assert [(e.stage, e.status) for e in result.stages] == [("calibrate", "run-cache"), ("score", "unchanged"),
                                                            ("drop", "failed")]
    err = failure_message(result)
    assert str(err).startswith("dropquant drop: error: drop.n=9") and err.stage == "drop" and err.user_error
    ok = parse_log(["Running stage 'drop':", "12:00:01 dropquant.drop: done in 7 s, peak RSS 0.4 GB"], 0)
    assert [(e.stage, e.status, e.seconds) for e in ok.stages] == [("drop", "ran", 7.0)]


def test_queue_status_asks_again_when_dvc_meets_a_half_written_broker_file(tmp_path, monkeypatch):
    import flows.queue as queue
    from flows._dvc import DvcFailed

    fake = tmp_path / "dvc"  # fails once, as dvc 3.67.1 does on a half-written broker file, then answers
    fake.write_text('#!/bin/sh\nif [ ! -e "$0.seen" ]; then touch "$0.seen"\n'
                    '  echo "ERROR: unexpected error - Expecting value: line 1 column 1 (char 0)" >&2; exit 255; fi\n'
                    'printf "Task     Name         Created    Status\\n'
                    'ab6aa69  attn-1-Q8_0  03:28 AM   Success\\n\\nWorker status: 1 active, 0 idle\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setattr(queue, "dvc_executable", lambda: str(fake))
    monkeypatch.setattr(queue.time, "sleep", lambda s: None)
    assert queue.queue_status(tmp_path) == ([("ab6aa69", "attn-1-Q8_0", "Success")], 1)
    fake.write_text('#!/bin/sh\necho "ERROR: unexpected error - Expecting value" >&2; exit 255\n')
    with pytest.raises(DvcFailed, match="dvc queue status failed: ERROR: unexpected error"):
        queue.queue_status(tmp_path)  # a lasting failure still stops the sweep
