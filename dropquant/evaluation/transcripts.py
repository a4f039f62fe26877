"""MT-Bench conversations of the base and a variant side by side, for a person to read what a drop changed:
one HTML page (inline CSS, renders offline) and the same in Markdown."""
from __future__ import annotations

import html
from pathlib import Path

from ..atomic import atomic_path
from .mt_bench import signals

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}
h2{margin-top:2em;border-bottom:1px solid #ccc}.user{background:#eef3fb;padding:.6em;border-radius:6px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1em;margin:.6em 0 1.4em}
.answer{white-space:pre-wrap;border:1px solid #ddd;border-radius:6px;padding:.6em;font-size:.92em}
.who{font-weight:bold;margin-bottom:.3em}.flag{color:#b00;font-weight:bold}.meta{color:#555;font-size:.9em}
table.sum{border-collapse:collapse;margin:.6em 0}table.sum td,table.sum th{border:1px solid #ccc;padding:3px 10px;
text-align:right}table.sum td:first-child{text-align:left}ul.toc{columns:2}"""


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _num(x, fmt="{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def summary_rows(summary: dict | None) -> list[tuple[str, str, str]]:
    """(figure, base, variant) over every answer: what a reader wants before the transcripts themselves."""
    a = (summary or {}).get("all") or {}
    se = "" if a.get("kld_stderr") is None else f" ± {a['kld_stderr']:.3f}"
    rouge_se = "" if a.get("rougeL_stderr") is None else f" ± {a['rougeL_stderr']:.3f}"
    return [("answers", str(a.get("answers", "–")), str(a.get("answers", "–"))),
            ("KLD from the base, teacher-forced (per token)", "0", _num(a.get("kld")) + se),
            ("top-1 agreement with the base", "100%", _pct(a.get("top1_agree"))),
            ("ROUGE-L against the base's answer", "1", _num(a.get("rougeL")) + rouge_se),
            ("answers ending in a loop", _pct(a.get("base_loop_rate")), _pct(a.get("loop_rate"))),
            ("answers cut at the token budget", _pct(a.get("base_truncated_rate")), _pct(a.get("truncated_rate"))),
            ("empty answers", _pct(a.get("base_empty_rate")), _pct(a.get("empty_rate")))]


def _anchor(question_id) -> str:
    return f"q{question_id}"


def _flags(conv: dict, turn: int) -> list[str]:
    s = signals(conv, turn)
    return [name for name in ("loop", "empty", "truncated") if s[name]]


def _pairs(base: list[dict], variant: list[dict], teacher_forced: list[dict], n: int):
    by_id = {c["question_id"]: c for c in variant}
    tf = {(r["question_id"], r["turn"]): r for r in teacher_forced}
    for b in base[:n]:
        v = by_id.get(b["question_id"])
        if v is None:
            continue
        turns = []
        for t in range(2):
            r = tf.get((b["question_id"], t + 1))
            kld = r["kl"] / r["n"] if r and r["n"] else None
            turns.append({"user": b["turns"][t], "base": b["answers"][t], "variant": v["answers"][t],
                          "base_flags": _flags(b, t), "variant_flags": _flags(v, t), "kld": kld})
        yield b, turns


def write_transcripts(out_dir: Path, base: list[dict], variant: list[dict], teacher_forced: list[dict], n: int,
                      label: str, summary: dict | None = None) -> None:
    """transcripts.html and transcripts.md in out_dir: a summary over every MT-Bench answer (`summary`, as
    mt_bench.summarize gives it) and links to each question, then the first n questions (the loader interleaves
    the categories), both turns. The variant's turn 2 follows its own turn-1 answer, the base's its own."""
    pairs = list(_pairs(base, variant, teacher_forced, n))
    title = f"MT-Bench transcripts: base vs {label}"
    note = ("Greedy answers under the model's chat template; each model's turn 2 follows its own turn-1 answer. "
            "KLD: per-token KL(base || variant) teacher-forced on the base's answer. Flags: loop (ends in a "
            "repeated span), empty, truncated (ran to the token budget).")
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p class='meta'>{html.escape(note)}</p>"]
    md = [f"# {title}", "", note, ""]
    rows = summary_rows(summary)
    h.append("<h2 id='summary'>Summary: every answer</h2><table class='sum'><tr><th></th><th>base</th>"
             f"<th>{html.escape(label)}</th></tr>" +
             "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
                     for a, b, c in rows) + "</table>")
    md += ["## Summary: every answer", "", f"| | base | {label} |", "|---|---|---|"]
    md += [f"| {a} | {b} | {c} |" for a, b, c in rows] + [""]
    heads = [(b, f"Question {b['question_id']} ({b['category']})") for b, _ in pairs]
    h.append(f"<p>{len(pairs)} questions shown:</p><ul class='toc'>" +
             "".join(f"<li><a href='#{_anchor(b['question_id'])}'>{html.escape(head)}</a></li>" for b, head in heads)
             + "</ul>")
    md += [f"{len(pairs)} questions shown: " +
           " · ".join(f"[{head}](#{_anchor(b['question_id'])})" for b, head in heads), ""]
    for b, turns in pairs:
        head = f"Question {b['question_id']} ({b['category']})"
        h.append(f"<h2 id='{_anchor(b['question_id'])}'>{html.escape(head)} <a class='meta' href='#summary'>"
                 "(top)</a></h2>")
        md += [f"<a id=\"{_anchor(b['question_id'])}\"></a>", "", f"## {head}", ""]
        for t, turn in enumerate(turns, 1):
            kld = "" if turn["kld"] is None else f" · KLD {turn['kld']:.3f}"
            h.append(f"<div class='user'><b>User, turn {t}</b>{html.escape(kld)}<br>{html.escape(turn['user'])}</div>"
                     "<div class='pair'>")
            md += [f"**User, turn {t}**{kld}: {turn['user']}", "", "| base | " + label + " |", "|---|---|"]
            cells = []
            for who, name in (("base", "base"), ("variant", label)):
                flags = "".join(f" <span class='flag'>[{f}]</span>" for f in turn[f"{who}_flags"])
                h.append(f"<div class='answer'><div class='who'>{html.escape(name)}{flags}</div>"
                         f"{html.escape(turn[who])}</div>")
                md_flags = "".join(f" **[{f}]**" for f in turn[f"{who}_flags"])
                cells.append((_md_cell(turn[who]) or "*(empty)*") + md_flags)
            h.append("</div>")
            md += ["| " + " | ".join(cells) + " |", ""]
    h.append("</body></html>")
    for name, text in (("transcripts.html", "\n".join(h)), ("transcripts.md", "\n".join(md) + "\n")):
        with atomic_path(out_dir / name) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")


def _md_cell(text: str) -> str:
    return html.escape(text.strip(), quote=False).replace("|", "\\|").replace("\n", "<br>")
