"""Chat evaluation: the model's own template applied once, lm-eval's IFEval/GSM8K on local files, MT-Bench drift
(teacher-forced KL, free-running signals), skipping without data, and the metrics it lands in."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest

IFEVAL_ROWS = [
    {"key": 1, "prompt": "Write a haiku about rain. Do not use any commas.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 2, "prompt": "Answer in lowercase letters only: what is the sky?",
     "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"], "kwargs": [{}, {}]},
]
GSM8K_ROWS = [{"question": "Tom has 3 apples and buys 2 more. How many apples does he have?", "answer": "3+2=5\n#### 5"},
              {"question": "A box holds 4 pens. How many pens are in 2 boxes?", "answer": "4*2=8\n#### 8"}]
MT_ROWS = [{"question_id": 81, "category": "writing", "turns": ["Write a short poem.", "Now make it rhyme."]},
           {"question_id": 101, "category": "reasoning", "turns": ["What is 2 + 2?", "And times 3?"]},
           {"question_id": 82, "category": "writing", "turns": ["Write an email.", "Shorten it."]}]


def _chat(**kw):
    base = dict(tasks=["ifeval", "gsm8k", "mt_bench"], limit=2, max_tokens=12, parallel=4, n_ctx=2048, transcripts=2)
    return SimpleNamespace(**{**base, **kw})


def _data(tmp_path):
    for folder, name, rows in (("ifeval", "train.jsonl", IFEVAL_ROWS), ("gsm8k", "test.jsonl", GSM8K_ROWS),
                               ("mt_bench", "question.jsonl", MT_ROWS)):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


@pytest.fixture(scope="module")
def chat_lm(tiny_gguf):
    from dropquant.evaluation.chat_eval import open_chat_lm

    return open_chat_lm(tiny_gguf[1], _chat(), threads=1)


@pytest.fixture(scope="module")
def perturbed_gguf(tiny_gguf, tmp_path_factory, embedded):
    import copy

    import torch

    from dropquant.gguf.export import export_model

    model = copy.deepcopy(tiny_gguf[0])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.model.layers[1].parameters():
            p.add_(0.5 * torch.randn_like(p) * p.std())
    path = tmp_path_factory.mktemp("perturbed") / "perturbed-f32.gguf"
    export_model(model, path, tokenizer_gguf=embedded, out_type="F32", name="perturbed")
    return path


def test_chat_template_comes_from_the_gguf_and_is_applied_once(chat_lm, embedded):
    from dropquant.evaluation.chat import template_of
    from dropquant.evaluation.llamacpp_lm import LlamaCppLM

    assert "<|im_start|>" in template_of(chat_lm.llama)  # SmolLM2's ChatML template, carried into the export
    text = chat_lm.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                        {"role": "user", "content": "Bye"}])
    assert text.count("<|im_start|>") == 5 and text.endswith("<|im_start|>assistant\n")  # system + 3 + prompt
    toks = chat_lm.tok_encode(text)
    start = chat_lm.llama.tokenize(b"<|im_start|>", add_bos=False, special=True)
    assert len(start) == 1 and toks.count(start[0]) == 5 and toks[0] == start[0]
    plain = LlamaCppLM(embedded, n_ctx=256, threads=1)  # task text is never read as special tokens
    assert start[0] not in plain.tok_encode(text)


def test_bos_is_written_once_whether_or_not_the_template_writes_it(chat_lm, monkeypatch):
    from dropquant.evaluation import chat

    monkeypatch.setattr(chat, "_adds_bos", lambda llama: True)
    bos = chat._token_text(chat_lm.llama, chat_lm.llama.token_bos())
    msgs = [{"role": "user", "content": "Hi"}]
    own = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    none = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    for template in (own, none):
        monkeypatch.setitem(chat_lm.llama.metadata, "tokenizer.chat_template", template)
        text = chat.render(chat_lm.llama, msgs)
        assert text.startswith(bos) and text.count(bos) == 1, text


def test_lm_eval_chat_tasks_on_local_files(chat_lm, tmp_path, monkeypatch):
    from dropquant.evaluation.chat_eval import run_lm_eval_chat

    contexts = []
    real = type(chat_lm).generate_until

    def spy(self, requests, disable_tqdm=False):
        contexts.extend(r.args[0] for r in requests)
        return real(self, requests, disable_tqdm)

    monkeypatch.setattr(type(chat_lm), "generate_until", spy)
    out = run_lm_eval_chat(chat_lm, ["ifeval", "gsm8k"], 2, _data(tmp_path))
    assert out["skipped"] == [] and set(out["tasks"]) == {"ifeval", "gsm8k"}
    ifeval, gsm8k = out["tasks"]["ifeval"], out["tasks"]["gsm8k"]
    assert {k: v["n"] for k, v in ifeval.items() if k != "stops"} == dict.fromkeys(
        ["prompt_strict", "inst_strict", "prompt_loose", "inst_loose"], 2)
    assert [len(x) for x in ifeval["inst_strict"]["items"]] == [1, 2]  # per instruction, per prompt
    assert ifeval["inst_strict"]["n_units"] == 3 and gsm8k["strict"]["n"] == 2
    assert sum(ifeval["stops"].values()) == 2
    ifeval_ctx, gsm8k_ctx = contexts[:2], contexts[2:]
    for ctx in contexts:  # the template applied once: one generation prompt, at the end
        assert ctx.count("<|im_start|>assistant") == ctx.count("<|im_start|>user")
        assert ctx.endswith("<|im_start|>assistant\n") and ctx.count("<|im_start|>system") == 1
    assert all(c.count("<|im_start|>user") == 1 for c in ifeval_ctx)
    assert all(c.count("<|im_start|>user") == 9 for c in gsm8k_ctx)  # 8 fixed exemplars as earlier turns
    assert "There are 15 trees" in gsm8k_ctx[0]


def test_tasks_without_data_are_skipped_with_a_warning_not_scored(chat_lm, tmp_path, caplog):
    from dropquant.evaluation.chat_eval import evaluate_chat

    with caplog.at_level(logging.WARNING):
        out = evaluate_chat(None, _chat(), 1, tmp_path, lm=chat_lm)
    assert out["tasks"] == {} and out["mt_bench"] is None
    assert sorted(out["skipped"]) == ["gsm8k", "ifeval", "mt_bench"]
    assert all(f"'{t}'" in caplog.text or t in caplog.text for t in ("ifeval", "gsm8k", "mt_bench"))


def test_a_model_without_a_chat_template_skips_chat(chat_lm, tmp_path, monkeypatch, caplog):
    from dropquant.evaluation.chat_eval import evaluate_chat

    monkeypatch.delitem(chat_lm.llama.metadata, "tokenizer.chat_template")
    with caplog.at_level(logging.WARNING):
        out = evaluate_chat("base.gguf", _chat(), 1, _data(tmp_path), lm=chat_lm)
    assert out["skipped"] == ["ifeval", "gsm8k", "mt_bench"] and out["tasks"] == {}
    assert "no chat template" in caplog.text


def test_mt_bench_teacher_forced_kl_is_zero_against_itself_and_positive_against_a_perturbed_model(
        chat_lm, tiny_gguf, perturbed_gguf, tmp_path):
    from dropquant.evaluation import mt_bench
    from dropquant.evaluation.chat_eval import open_chat_lm

    questions = mt_bench.load_questions(_data(tmp_path))
    assert [q["category"] for q in questions] == ["writing", "reasoning", "writing"]  # interleaved by category
    base = mt_bench.converse(chat_lm, questions, max_tokens=10)
    assert all(len(c["answers"]) == 2 and len(c["tokens"][1]) >= 1 for c in base)
    same = mt_bench.teacher_forced(open_chat_lm(tiny_gguf[1], _chat(), 1), chat_lm, base)
    assert len(same) == 6 and all(r["n"] == len(c["tokens"][r["turn"] - 1]) for r, c in
                                  zip(same, [c for c in base for _ in range(2)]))
    s = mt_bench.summarize(same, base, base)["all"]
    assert abs(s["kld"]) < 1e-9 and s["top1_agree"] == 1.0 and s["answer_nll"] == pytest.approx(s["base_answer_nll"])
    assert s["rougeL"] == 1.0 and s["answers"] == 6
    other = open_chat_lm(perturbed_gguf, _chat(), 1)
    tf = mt_bench.teacher_forced(other, chat_lm, base)
    own = mt_bench.converse(other, questions, max_tokens=10)
    summary = mt_bench.summarize(tf, own, base)
    assert summary["all"]["kld"] > 1e-3 and summary["all"]["answer_nll"] > summary["all"]["base_answer_nll"]
    assert summary["all"]["top1_agree"] < 1.0
    assert set(summary) == {"all", "turn1", "turn2", "reasoning", "writing"}
    assert summary["turn1"]["answers"] == 3 and summary["writing"]["answers"] == 4


def test_standard_errors_of_scores_and_paired_differences():
    from dropquant.evaluation.chat_eval import _score, paired

    s = _score([True, False, True, True])
    assert s["value"] == 0.75 and s["stderr"] == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)
    inst = _score([[True, False], [True], [False, False, True]])
    assert inst["value"] == pytest.approx(3 / 6) and inst["n"] == 3 and inst["n_units"] == 6
    d = paired({"items": [1, 1, 0, 1]}, {"items": [1, 0, 0, 0]})
    assert d["delta"] == 0.5 and d["delta_stderr"] == pytest.approx(np.std([0, 1, 0, 1], ddof=1) / 2)


def test_chat_metrics_keys_always_present():
    from dropquant.evaluation.metrics import build_metrics

    m = build_metrics(method="attn", n=8, quant_type="Q8_0", tasks=[], accuracy={"tasks": {}},
                      base_accuracy={"tasks": {}}, fidelity=None, speed=None, variant_bytes=1)
    c = m["chat"]
    assert c["ifeval"]["prompt_strict"] is None and c["gsm8k"]["strict_delta_stderr"] is None
    assert c["mt_bench"]["kld"] is None and c["mt_bench"]["coding"]["rougeL"] is None


def test_transcripts_page(tmp_path):
    from dropquant.evaluation.transcripts import write_transcripts

    base = [{"question_id": 81, "category": "writing", "turns": ["Q1 <b>", "Q2"], "answers": ["A1 | x", "A2"],
             "tokens": [[1, 2], [3]], "stops": ["eog", "budget"]}]
    variant = [{**base[0], "answers": ["", "loop"], "tokens": [[9], [5] * 40], "stops": ["eog", "budget"]}]
    tf = [{"question_id": 81, "turn": 1, "n": 2, "kl": 1.0}, {"question_id": 81, "turn": 2, "n": 1, "kl": 0.5}]
    summary = {"all": {"answers": 2, "kld": 0.8333, "kld_stderr": 0.1, "top1_agree": 0.5, "rougeL": 0.25,
                       "loop_rate": 0.5, "base_loop_rate": 0.0, "truncated_rate": 0.5, "base_truncated_rate": 0.5,
                       "empty_rate": 0.5, "base_empty_rate": 0.0}}
    write_transcripts(tmp_path, base, variant, tf, 8, "attn-8 Q8_0", summary=summary)
    page = (tmp_path / "transcripts.html").read_text()
    md = (tmp_path / "transcripts.md").read_text()
    # The page opens with the summary of every answer, then a link to each question, before any transcript.
    body = page.split("<body>")[1]
    assert body.index("Summary: every answer") < body.index("href='#q81'") < body.index("id='q81'")
    assert "<td>answers ending in a loop</td><td>0%</td><td>50%</td>" in page
    assert "<td>0.833 ± 0.100</td>" in page and "<td>0.250</td>" in page.split("ROUGE-L")[1][:80]
    assert "| answers ending in a loop | 0% | 50% |" in md and "[Question 81 (writing)](#q81)" in md
    assert "Q1 &lt;b&gt;" in page and "<b>" not in page.split("<body>")[1].replace("<b>User", "")
    assert "[empty]" in page and "[loop]" in page and "[truncated]" in page and "KLD 0.500" in page
    assert "A1 \\| x" in md and "*(empty)*" in md and "| base | attn-8 Q8_0 |" in md
