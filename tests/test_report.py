"""The sweep report: `dvc exp show --json` rows -> Markdown table, Pareto plot, offline HTML, written all or nothing."""
from __future__ import annotations

import json

import pytest

from dropquant.artifacts import params_digest
from dropquant.report import STALE, markdown_table, pareto_front, rows_from_exp_show, write_report


def _exp(name, method, n, qt, avg, speedup, size, stamp="2026-01-01T00:00:00", measured_n=None):
    """One experiment; measured_n: the drop.n its metrics.json was measured with (default: its own)."""
    params = {"drop": {"method": method, "n": n}, "quantize": {"type": qt}}
    measured = {"drop": {"method": method, "n": n if measured_n is None else measured_n}, "quantize": {"type": qt}}
    metrics = {"method": method, "n": n, "quant_type": qt, "avg": avg, "base_avg": 0.5, "avg_delta": avg - 0.5,
               "speedup_tg": speedup, "speedup_pp": 9.9, "size_mb": size, "ppl": 12.5, "kld": 0.01, "top1_agree": 0.9,
               "chat": {"ifeval": {"prompt_strict": 0.25}, "gsm8k": {"strict": 0.0},
                        "mt_bench": {"kld": 0.348, "rougeL": 0.144, "loop_rate": 0.5}},
               "variant": {"params": params_digest(measured)}}
    return {"rev": name * 3, "name": name, "error": None, "experiments": None, "data": {
        "timestamp": stamp, "params": {"params.yaml": {"data": params}},
        "metrics": {"data/eval/metrics.json": {"data": metrics}}}}


EXP_SHOW = [
    {"rev": "workspace", "name": None, "data": {}, "error": None, "experiments": None},
    {"rev": "abc", "name": "main", "data": {}, "error": None, "experiments": [
        {"revs": [_exp("attn-4-Q8_0", "attn", 4, "Q8_0", 0.48, 1.2, 120.0)]},
        {"revs": [_exp("mlp-4-Q8_0", "mlp", 4, "Q8_0", 0.30, 1.1, 100.0)]},
        {"revs": [_exp("attn-4-Q8_0", "attn", 4, "Q8_0", 0.47, 1.25, 121.0, stamp="2026-02-01T00:00:00")]},
        {"revs": [_exp("other", "block", 2, "Q8_0", 0.40, 1.0, 130.0)]},
    ]},
]


def test_rows_pick_named_experiments_newest_first_and_prefer_generation_speedup():
    rows = rows_from_exp_show(EXP_SHOW, ["mlp-4-Q8_0", "attn-4-Q8_0", "missing"])
    assert [r["name"] for r in rows] == ["mlp-4-Q8_0", "attn-4-Q8_0"]
    attn = rows[1]
    assert (attn["avg"], attn["speedup"], attn["size_mb"]) == (0.47, 1.25, 121.0)  # the newer of the two
    assert len(rows_from_exp_show(EXP_SHOW)) == 3


def test_markdown_table_formats_and_marks_missing_values():
    rows = rows_from_exp_show(EXP_SHOW, ["attn-4-Q8_0"])
    rows.append({"name": "x", "method": "mlp", "n": 8, "quant_type": "Q4_K_M"})
    lines = markdown_table(rows).splitlines()
    assert lines[0].startswith("| experiment | method | n | quant | heal | avg acc |")
    assert lines[2] == "| attn-4-Q8_0 | attn | 4 | Q8_0 | none | 0.4700 | -0.0300 | 1.250× | 9.900× | – | 121.0 | 12.500 | 0.0100 | 0.900 | 0.250 | 0.000 | 0.348 | 0.144 | 0.500 | – |"
    assert lines[3] == "| x | mlp | 8 | Q4_K_M | – | – | – | – | – | – | – | – | – | – | – | – | – | – | – | – |"


def test_rows_refuse_metrics_measured_for_another_variant():
    """`dvc exp run -S drop.n=8 quantize` keeps the previous variant's metrics.json: the report must not show it."""
    stale = _exp("attn-8-Q8_0", "attn", 8, "Q8_0", 0.48, 1.2, 120.0, measured_n=4)
    old = _exp("old", "attn", 8, "Q8_0", 0.48, 1.2, 120.0)
    del old["data"]["metrics"]["data/eval/metrics.json"]["data"]["variant"]  # written before metrics named their variant
    show = [{"rev": "abc", "name": "main", "data": {}, "experiments": [{"revs": [stale]}, {"revs": [old]}]}]
    rows = rows_from_exp_show(show)
    assert [r["name"] for r in rows] == ["attn-8-Q8_0", "old"]
    for row in rows:
        assert row["note"] == STALE and row["avg"] is None and row["speedup"] is None and not row["has_metrics"]
        assert (row["method"], row["n"], row["quant_type"]) == ("attn", 8, "Q8_0")  # from the experiment's params


@pytest.mark.parametrize("maximize, expected", [(True, [(1.0, 0.9), (2.0, 0.5)]), (False, [(1.0, 0.9)])])
def test_pareto_front(maximize, expected):
    pts = [(1.0, 0.9), (2.0, 0.5), (1.5, 0.4), (2.0, 0.3)]
    assert pareto_front(pts, maximize_x=maximize) == expected


def test_write_report_is_self_contained_and_complete(tmp_path):
    rows = rows_from_exp_show(EXP_SHOW)
    failures = [{"name": "block-40-Q8_0", "params": ["drop.n=40"], "stage": "drop",
                 "error": "dropquant drop: error: drop.n=40 is larger than <it> can drop"}]
    paths = write_report(tmp_path / "r", rows, failures, title="t", notes=["a note"])
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["pareto.png", "report.html", "report.md", "sweep.json"]
    assert paths["pareto.png"].read_bytes()[:4] == b"\x89PNG"
    page = paths["report.html"].read_text()
    assert "data:image/png;base64," in page and "<script" not in page and "src=\"http" not in page
    assert "drop.n=40 is larger than &lt;it&gt;" in page  # escaped
    md = paths["report.md"].read_text()
    assert "a note" in md and "block-40-Q8_0" in md and "![accuracy vs. speed-up and size](pareto.png)" in md
    assert json.loads(paths["sweep.json"].read_text())["failures"] == failures


def test_write_report_leaves_nothing_on_error(tmp_path, monkeypatch):
    import dropquant.report as report

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "html_page", broken)
    with pytest.raises(RuntimeError):
        write_report(tmp_path / "r", rows_from_exp_show(EXP_SHOW))
    assert list(tmp_path.iterdir()) == []


def test_plot_without_accuracy_still_renders(tmp_path):
    rows = [{"name": "a", "method": "attn", "n": 1, "quant_type": "Q8_0", "avg": None, "speedup": None,
             "size_mb": 8.6}]
    assert write_report(tmp_path / "r", rows)["pareto.png"].stat().st_size > 1000
