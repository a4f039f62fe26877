"""The sweep report: `dvc exp show --json` rows -> Markdown table, Pareto plot, offline HTML, written all or nothing."""
from __future__ import annotations

import json

import pytest

from dropquant.artifacts import params_digest
from dropquant.report import (STALE, markdown_table, not_measured, pareto_figure, pareto_front,
                              rows_from_exp_show, write_report)


def _exp(name, method, n, qt, avg, speedup, size, stamp="2026-01-01T00:00:00", stale=False, speed=True):
    """One experiment as `dvc exp show --json` lists it; stale: evaluate did not run after quantize (its recorded
    input data/gguf differs from the one quantize made)."""
    params = {"drop": {"method": method, "n": n}, "quantize": {"type": qt},
              "eval": {"speed": speed, "chat": {"tasks": ["ifeval", "gsm8k", "mt_bench"]}}}
    metrics = {"avg": avg, "avg_delta": round(avg - 0.5, 3), "avg_delta_se": 0.041, "base_avg": 0.5, "avg_n": 300,
               "ppl": 12.5, "base_ppl": 10.0, "kld": 0.01, "top1": 0.9, "size_mb": size, "base_size_mb": 144.8,
               "pp_x": 9.9 if speed else None, "tg_x": speedup if speed else None, "speed_noisy": False if speed else None,
               "kv_mib": 66.0 if speed else None, "base_kv_mib": 90.0 if speed else None,
               "ifeval": 0.25, "base_ifeval": 0.125, "gsm8k": 0.0, "base_gsm8k": 0.0, "loops": 0.5, "base_loops": 0.125}
    made = name + "-gguf"
    return {"rev": name * 3, "name": name, "error": None, "experiments": None, "data": {
        "timestamp": stamp, "params": {"params.yaml": {"data": params}},
        "metrics": {"data/eval/metrics.json": {"data": metrics}},
        "deps": {"data/gguf": {"hash": "old" if stale else made}}, "outs": {"data/gguf": {"hash": made}}}}


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


def test_markdown_table_has_a_base_row_standard_errors_and_item_counts():
    rows = rows_from_exp_show(EXP_SHOW, ["attn-4-Q8_0"])
    rows.append({"name": "x", "method": "mlp", "n": 8, "quant_type": "Q4_K_M"})
    lines = markdown_table(rows).splitlines()
    assert lines[0] == ("| experiment | method | n | quant | heal | avg acc ± se (items) | Δ acc ± se | tg speed-up | "
                        "pp speed-up | size MB | KV MiB | ppl | KLD | top-1 agree | IFEval prompt strict | GSM8K strict "
                        "| MT-Bench loops | note |")
    # The unpruned model first: its accuracy with its own standard error (Δ's over √2), size, KV cache, chat.
    assert lines[2] == ("| unpruned (base) | none | 0 | Q8_0 | none | 0.500 ± 0.029 (300) | — | 1× | 1× | 144.8 | 90 | "
                        "10.00 | 0.0000 | 1.000 | 0.125 | 0.000 | 12% | – |")
    assert lines[3] == ("| attn-4-Q8_0 | attn | 4 | Q8_0 | none | 0.470 ± 0.029 (300) | -0.030 ± 0.041 | 1.25× | 9.90× | 121.0 | "
                        "66 | 12.50 | 0.0100 | 0.900 | 0.250 | 0.000 | 50% | – |")
    assert lines[4] == "| x | mlp | 8 | Q4_K_M | – | – | – | – | – | – | – | – | – | – | – | – | – | – |"


def test_what_was_not_measured_is_said_once_and_leaves_no_empty_column_or_panel(tmp_path):
    show = [{"rev": "abc", "name": "main", "data": {}, "experiments": [
        {"revs": [_exp("attn-2-Q8_0", "attn", 2, "Q8_0", 0.53, None, 140.0, speed=False)]},
        {"revs": [_exp("mlp-2-Q8_0", "mlp", 2, "Q8_0", 0.45, None, 135.0, speed=False)]}]}]
    rows = rows_from_exp_show(show)
    assert not_measured(rows) == ["Speed and KV cache not measured (eval.speed: false): no speed-up columns, no "
                                  "speed panel."]
    head = markdown_table(rows).splitlines()[0]
    assert "speed-up" not in head and "KV MiB" not in head and "avg acc ± se (items)" in head
    fig = pareto_figure(rows)
    (size,) = [ax for ax in fig.axes if ax.get_xlabel()]  # one panel: file size; no empty speed panel
    assert size.get_xlabel() == "GGUF file size (MB)" and size.get_title() == ""  # no text drawn over markers
    points = [tuple(p) for c in size.collections for p in c.get_offsets()]
    assert (144.8, 0.5) in points  # the unpruned model, in the size panel too
    labels = {t.get_text() for t in size.texts}
    assert {"attn-2 Q8_0", "mlp-2 Q8_0", "unpruned Q8_0"} <= labels  # whole labels, not "2-Q8_0"
    md = write_report(tmp_path / "r", rows)["report.md"].read_text()
    assert md.count("not measured") == 1 and "± se" in md


def test_rows_refuse_metrics_measured_for_another_variant():
    """`dvc exp run -S drop.n=8 quantize` keeps the previous variant's metrics.json: the report must not show it."""
    stale = _exp("attn-8-Q8_0", "attn", 8, "Q8_0", 0.48, 1.2, 120.0, stale=True)
    # Older metrics files: a digest of the parameters they were measured with, or nothing to check.
    params = {"drop": {"method": "attn", "n": 8}, "quantize": {"type": "Q8_0"}}
    legacy = {"rev": "d", "name": "legacy", "data": {"params": {"params.yaml": {"data": params}}, "metrics": {
        "data/eval/metrics.json": {"data": {"avg": 0.48, "variant": {"params": params_digest({**params, "drop": {"method": "attn", "n": 4}})}}}}}}
    old = {"rev": "o", "name": "old", "data": {"params": {"params.yaml": {"data": params}},
                                               "metrics": {"data/eval/metrics.json": {"data": {"avg": 0.48}}}}}
    show = [{"rev": "abc", "name": "main", "data": {}, "experiments": [{"revs": [stale]}, {"revs": [legacy]},
                                                                       {"revs": [old]}]}]
    rows = rows_from_exp_show(show)
    assert [r["name"] for r in rows] == ["attn-8-Q8_0", "legacy", "old"]
    for row in rows:
        assert row["note"] == STALE and row["avg"] is None and row["speedup"] is None and not row["has_metrics"]
        assert (row["method"], row["n"], row["quant_type"]) == ("attn", 8, "Q8_0")  # from the experiment's params
    fresh = rows_from_exp_show([{"experiments": [{"revs": [_exp("attn-8-Q8_0", "attn", 8, "Q8_0", 0.48, 1.2, 1.0)]}]}])
    assert fresh[0]["note"] is None and fresh[0]["avg"] == 0.48


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


# --- `dropquant report`: one variant on one screen -------------------------------------------------------------

def _full_metrics(speed=None, chat=None):
    from dropquant.evaluation.metrics import build_metrics

    acc = lambda ps: {"tasks": {t: {"acc": p, "acc_norm": p, "n": 100} for t, p in ps.items()}}  # noqa: E731
    m = build_metrics(method="attn", n=8, quant_type="Q8_0", tasks=["arc_easy", "hellaswag", "piqa"],
                      accuracy=acc({"arc_easy": 0.37, "hellaswag": 0.33, "piqa": 0.66}),
                      base_accuracy=acc({"arc_easy": 0.45, "hellaswag": 0.34, "piqa": 0.71}),
                      fidelity={"ppl": 40.06, "base_ppl": 24.48, "kld": 0.511, "kld_median": 0.42, "kld_p99": 2.0,
                                "top1_agree": 0.604, "fidelity_tokens": 2040},
                      speed=speed, chat=chat, variant_bytes=137_270_000, base_bytes=144_800_000)
    m["heal_kl"] = None
    return m


def test_summary_fits_one_screen_hides_what_was_not_measured_and_ends_with_a_verdict():
    from dropquant.summary import WIDTH, render

    plan = {"attn": [6, 7, 9], "mlp": [], "blocks": [], "num_layers": 30}
    text = render(_full_metrics(), None, plan, {"eval": {"speed": False, "chat": {"tasks": []}}}, "SmolLM2")
    lines = text.splitlines()
    assert len(lines) <= 40 and all(len(line) <= WIDTH for line in lines[:-1])
    assert "None" not in text and "null" not in text
    assert lines[0] == "attn-8 Q8_0 against the unpruned model at Q8_0 · SmolLM2"
    assert "dropped: attention [6, 7, 9] of 30 layers" in text
    # Base beside variant, Δ with its standard error; accuracy per task with its se and item count.
    assert any(line.startswith("  arc_easy (100)") and "0.450 ± 0.050" in line and "0.370 ± 0.049" in line
               and "-0.080 ± 0.070" in line for line in lines)
    assert any(line.startswith("  average (300)") for line in lines)
    assert any(line.startswith("  GGUF file (MB)") and "144.8" in line and "137.3" in line for line in lines)
    assert lines[-2] == "not measured: speed and memory (eval.speed=false); chat (eval.chat.tasks=[])"
    assert "speed (llama.cpp" not in text and "\nchat (" not in text
    assert lines[-1] == "attn-8 Q8_0: −4.7 ± 3.9 points accuracy (n=300), KLD 0.51, 95% of the size"


def test_summary_reports_the_kl_a_heal_recovered():
    from dropquant.summary import render

    m = {**_full_metrics(), "heal": "linear", "heal_kl": {"tokens": 2048, "unhealed": 0.4, "healed": 0.1,
                                                          "recovered": 0.75}}
    text = render(m)
    assert any(line.startswith("  held-out KL, unhealed → healed") and "0.400 → 0.100" in line
               and line.endswith("75% recovered (2048 tokens)") for line in text.splitlines())
    assert text.splitlines()[-1].startswith("attn-8 Q8_0 healed (linear): −4.7 ± 3.9 points accuracy (n=300), "
                                            "KLD 0.51, 75% of the KL recovered by the heal")


def test_report_stage_prints_the_summary(tmp_path, capsys):
    from stages.report import main

    m = _full_metrics()
    (tmp_path / "metrics.json").write_text(json.dumps({"avg": m["avg"]}))
    (tmp_path / "details.json").write_text(json.dumps({"metrics": m, "plan": {"attn": [1], "model": {
        "source": "embedded"}}}))
    assert main(["--metrics", str(tmp_path / "metrics.json"), "--details", str(tmp_path / "details.json")]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct" in out.splitlines()[0] and out.splitlines()[-1].startswith("attn-8 Q8_0: −4.7")
    assert len(out.splitlines()) <= 40
