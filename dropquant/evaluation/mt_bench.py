"""MT-Bench prompts, judge-free: how far a variant's chat drifts from the unpruned model's, turn by turn.

The base answers both turns of each question greedily under its chat template (turn 2 sees its own turn-1
answer); that conversation is the reference. A variant is then measured two ways:
  - teacher-forced on the base's conversation: per answer token, KL(P_base || P_variant) over the whole
    vocabulary, whether both models' most likely token agree, and the log-likelihood of the base's answer
    under each model (the end-of-turn token included: knowing when to stop is part of the answer);
  - free-running, its own greedy conversation: ROUGE-L F1 against the base's answer, and what a reader
    notices first in a broken model: answers that loop on a repeated span, empty answers, and answers cut
    off by the token budget (the same signals are counted for the base, as the yardstick).
Results are per turn and per category.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from ..errors import DropquantError
from .fidelity import _blocks, _log_softmax, full_kl
from .generation import generate_batched, prepare

log = logging.getLogger(__name__)

QUESTIONS = "mt_bench/question.jsonl"
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
LOOP_MAX_PERIOD = 64  # longest repeated span (tokens) looked for at the end of an answer
LOOP_MIN_TOKENS = 32  # a loop is a span repeated 3+ times covering at least this many final tokens


def load_questions(data_dir: Optional[Path], limit: int = 0) -> Optional[list[dict]]:
    """The questions, interleaved by category (so that any limit covers the categories evenly); None when the
    file is missing."""
    path = Path(data_dir or "") / QUESTIONS
    if data_dir is None or not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for r in rows:
        if len(r.get("turns", [])) != 2:
            raise DropquantError(f"{path}: question {r.get('question_id')} does not have two turns")
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    order = []
    for i in range(max(len(v) for v in by_cat.values())):
        order += [v[i] for v in by_cat.values() if i < len(v)]
    return order[:limit] if limit else order


def _messages(question: dict, answers: list[str], turn: int) -> list[dict]:
    msgs = []
    for t in range(turn + 1):
        msgs.append({"role": "user", "content": question["turns"][t]})
        if t < turn:
            msgs.append({"role": "assistant", "content": answers[t]})
    return msgs


def converse(lm, questions: list[dict], max_tokens: int, desc: str = "mt_bench") -> list[dict]:
    """Both turns of every question, greedy, each turn's prompts decoded together; turn 2 sees the model's
    own turn-1 answer."""
    answers: list[list[str]] = [[] for _ in questions]
    out = [{"question_id": q["question_id"], "category": q["category"], "turns": list(q["turns"]),
            "answers": [], "tokens": [], "stops": []} for q in questions]
    for turn in range(2):
        seqs = [prepare(lm, lm.tok_encode(lm.apply_chat_template(_messages(q, answers[i], turn))), [], max_tokens)
                for i, q in enumerate(questions)]
        for i, g in enumerate(generate_batched(lm, seqs, lm.parallel, desc=f"{desc}: turn {turn + 1}")):
            answers[i].append(g.text)
            out[i]["answers"].append(g.text)
            out[i]["tokens"].append(g.tokens + ([g.end] if g.end is not None else []))
            out[i]["stops"].append(g.stop)
    return out


def _answer_rows(lm, conv: dict, turn: int) -> tuple[list[int], int]:
    """The tokens of the conversation up to the end of `turn`'s answer, and where that answer starts."""
    prompt = lm.tok_encode(lm.apply_chat_template(_messages(conv, conv["answers"], turn)))
    return prompt + conv["tokens"][turn], len(prompt)


def teacher_forced(variant_lm, base_lm, reference: list[dict]) -> list[dict]:
    """Per question and turn: sums over the base's answer tokens of KL, top-1 agreement, and each model's
    log-likelihood of them (the means are taken per token when aggregated)."""
    rows = []
    for conv in tqdm(reference, desc="mt_bench: teacher-forced"):
        for turn in range(2):
            tokens, start = _answer_rows(base_lm, conv, turn)
            n = len(tokens) - start
            if n == 0:
                rows.append({"question_id": conv["question_id"], "category": conv["category"], "turn": turn + 1,
                             "n": 0, "kl": 0.0, "agree": 0, "nll": 0.0, "base_nll": 0.0})
                continue
            if len(tokens) - 1 > min(variant_lm.seq_ctx, base_lm.seq_ctx):
                raise DropquantError(f"mt_bench question {conv['question_id']}: {len(tokens)} tokens do not fit "
                                     f"one sequence's {variant_lm.seq_ctx} cells (eval.chat.n_ctx / parallel)")
            target = np.asarray(tokens[start:])
            out = np.zeros(len(tokens) - 1, dtype=bool)
            out[start - 1:] = True  # the positions whose logits predict the answer's tokens
            pos = np.arange(len(tokens) - 1)
            kl = agree = nll = base_nll = 0.0
            done = 0
            variant_lm._clear()
            base_lm._clear()
            for (_, _, lv), (_, _, lb) in zip(variant_lm._decode(tokens[:-1], pos, out),
                                              base_lm._decode(tokens[:-1], pos, out)):
                if lv is None:
                    continue
                for sl in _blocks(len(lv)):
                    t = target[done + sl.start:done + sl.stop]
                    r = np.arange(len(t))
                    pv, pb = _log_softmax(lv[sl]), _log_softmax(lb[sl])
                    kl += float(full_kl(pb, pv).sum())
                    agree += float((pv.argmax(axis=-1) == pb.argmax(axis=-1)).sum())
                    nll -= float(pv[r, t].sum())
                    base_nll -= float(pb[r, t].sum())
                done += len(lv)
            rows.append({"question_id": conv["question_id"], "category": conv["category"], "turn": turn + 1,
                         "n": n, "kl": kl, "agree": agree, "nll": nll, "base_nll": base_nll})
    return rows


def loops(tokens: list[int]) -> bool:
    """Does the answer end in a span repeated 3+ times (period up to LOOP_MAX_PERIOD tokens) that covers at
    least LOOP_MIN_TOKENS tokens? ("the the the ...", or one sentence over and over)."""
    t = np.asarray(tokens)
    for p in range(1, min(LOOP_MAX_PERIOD, len(t) // 3) + 1):
        same = t[p:] == t[:-p]  # same[i]: t[i + p] == t[i]
        run = len(same) - (np.flatnonzero(~same)[-1] + 1) if not same.all() else len(same)
        if run + p >= max(3 * p, LOOP_MIN_TOKENS):
            return True
    return False


def signals(conv: dict, turn: int) -> dict:
    toks = conv["tokens"][turn]
    if conv["stops"][turn] == "eog":  # the end-of-turn token closes the answer; it is no part of a loop
        toks = toks[:-1]
    return {"loop": loops(toks), "empty": not conv["answers"][turn].strip(),
            "truncated": conv["stops"][turn] in ("budget", "context")}


def rouge_l(reference: str, candidate: str) -> float:
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"]).score(reference, candidate)["rougeL"].fmeasure)


def _mean_se(x) -> tuple[Optional[float], Optional[float]]:
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return None, None
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else None


def summarize(tf_rows: Optional[list[dict]], variant: Optional[list[dict]], base: list[dict]) -> dict:
    """Per turn, per category and overall. Token-level figures are pooled over tokens (KL, top-1, NLL per
    token); answer-level ones (ROUGE-L, loop/empty/truncated rates) are means over answers, with their
    standard error over answers (over questions for the token-level ones' per-answer means)."""
    groups = {"all": lambda c, t: True}
    groups.update({f"turn{k}": (lambda k: lambda c, t: t == k)(k) for k in (1, 2)})
    for cat in sorted({c["category"] for c in base}):
        groups[cat] = (lambda cat: lambda c, t: c == cat)(cat)
    by_id = {c["question_id"]: c for c in variant or []}
    out = {}
    for name, keep in groups.items():
        g: dict = {}
        if tf_rows is not None:
            rs = [r for r in tf_rows if keep(r["category"], r["turn"]) and r["n"]]
            n_tok = sum(r["n"] for r in rs)
            if n_tok:
                g["kld"] = sum(r["kl"] for r in rs) / n_tok
                g["kld_stderr"] = _mean_se([r["kl"] / r["n"] for r in rs])[1]
                g["top1_agree"] = sum(r["agree"] for r in rs) / n_tok
                g["answer_nll"] = sum(r["nll"] for r in rs) / n_tok
                g["base_answer_nll"] = sum(r["base_nll"] for r in rs) / n_tok
                g["answer_tokens"] = n_tok
        sig = {"variant": [], "base": []}
        rouge = []
        for b in base:
            for t in range(2):
                if not keep(b["category"], t + 1):
                    continue
                sig["base"].append(signals(b, t))
                v = by_id.get(b["question_id"])
                if v is not None:
                    sig["variant"].append(signals(v, t))
                    rouge.append(rouge_l(b["answers"][t], v["answers"][t]))
        g["answers"] = len(sig["base"])
        if rouge:
            g["rougeL"], g["rougeL_stderr"] = _mean_se(rouge)
        for who, prefix in (("variant", ""), ("base", "base_")):
            if sig[who]:
                for key in ("loop", "empty", "truncated"):
                    g[f"{prefix}{key}_rate"] = _mean_se([s[key] for s in sig[who]])[0]
        out[name] = g
    return out
