"""Heal quality in torch, no pipeline: KL, perplexity and top-1 of each heal against the unpruned embedded model.

The protocol of docs/heal.md's tables and issue 27's floors: calibration from the C4 sample (n × 512 tokens,
the last `holdout` never fitted), torch float32, 4096 WikiText-2 test tokens in 8 × 512, KL from the unpruned
model over the full vocabulary. Needs ../shared/data. Not a `bench_` module: it measures quality, not speed.

    python -m benchmarks.heal_quality [--plans attn8 block8] [--variants merged linear ...] [--samples 32]
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

PLANS = {"attn8": {"attn": [5, 6, 7, 9, 25, 26, 28, 29]}, "block8": {"blocks": [12, 13, 14, 15, 16, 17, 25, 26]}}
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# name -> (method, fit keyword arguments)
VARIANTS = {
    "none": ("none", {}),
    "linear": ("linear", {"ridge": 1e-3, "fit_on": "base"}),
    "linear-healed": ("linear", {"ridge": 1e-3, "fit_on": "healed"}),
    "merged": ("merged", {"ridge": 1e-3, "fit_on": "base"}),
    "merged-healed": ("merged", {"ridge": 1e-3, "fit_on": "healed"}),
    "proj": ("merged", {"ridge": 1e-3, "fit_on": "base", "form": "projection"}),
    "proj-healed": ("merged", {"ridge": 1e-3, "fit_on": "healed", "form": "projection"}),
    "proj-r1e-2": ("merged", {"ridge": 1e-2, "fit_on": "base", "form": "projection"}),
    "proj-r1e-1": ("merged", {"ridge": 1e-1, "fit_on": "base", "form": "projection"}),
    "merged-cosine": ("merged", {"ridge": 1e-3, "fit_on": "base", "objective": "cosine"}),
    "merged-healed-cosine": ("merged", {"ridge": 1e-3, "fit_on": "healed", "objective": "cosine"}),
}


def _parse(spec: str) -> tuple[str, dict]:
    """`merged:form=projection,ridge=0.1`: a method and its fit keyword arguments."""
    method, _, rest = spec.partition(":")
    kw = {"ridge": 1e-3}
    for item in filter(None, rest.split(",")):
        k, v = item.split("=")
        try:
            kw[k] = float(v) if "." in v or "e" in v else int(v)
        except ValueError:
            kw[k] = v
    return method, kw


def _tokens(tokenizer, n: int, seq: int) -> torch.Tensor:
    from dropquant.calibration import iter_file_texts, pack

    ids, _ = pack(iter_file_texts([DATA / "c4" / "train-sample.jsonl"], "text"), tokenizer, n, seq)
    return ids


def _wikitext(tokenizer, n: int = 8, seq: int = 512) -> torch.Tensor:
    text = (DATA / "wikitext2" / "wiki.test.raw-lines.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[:200_000], add_special_tokens=False)["input_ids"][: n * seq]
    return torch.tensor(ids).view(n, seq)


@torch.no_grad()
def _quality(model, ref_logp: torch.Tensor, ids: torch.Tensor) -> dict:
    kl = nll = top1 = 0.0
    for b in range(ids.shape[0]):
        logp = model(ids[b:b + 1]).logits[0].float().log_softmax(-1)
        ref = ref_logp[b]
        kl += float((ref.exp() * (ref - logp)).sum(-1).mean())
        nll += float(-logp[:-1].gather(-1, ids[b, 1:, None]).mean())
        top1 += float((logp.argmax(-1) == ref.argmax(-1)).float().mean())
    n = ids.shape[0]
    return {"kl": kl / n, "ppl": float(torch.exp(torch.tensor(nll / n))), "top1": top1 / n}


def main(argv=None) -> dict:
    from dropquant.heal.linear import fit_linear, standin_parameters, write_healed
    from dropquant.heal.merged import fit_merged
    from dropquant.model.layerwise import InMemoryStack
    from dropquant.model.loading import load_model, load_tokenizer, resolve_source
    from dropquant.prune.pruned_checkpoint import load_pruned, save_pruned
    from dropquant.prune.selection import DropPlan
    from dropquant.prune.surgery import prune_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", nargs="+", default=list(PLANS))
    ap.add_argument("--variants", nargs="+", default=["none", "linear", "merged", "merged-healed"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--holdout", type=int, default=4)
    ap.add_argument("--ridge", type=float)
    ap.add_argument("--cosine-steps", type=int)
    ap.add_argument("--cosine-lr", type=float)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    source = resolve_source("embedded")
    tok = load_tokenizer(source)
    base = load_model(source, torch.float32)
    train = _tokens(tok, args.samples, 512)[: args.samples - args.holdout]
    test = _wikitext(tok)
    with torch.no_grad():
        ref = torch.stack([base(test[b:b + 1]).logits[0].float().log_softmax(-1) for b in range(test.shape[0])])
    results = {"base": _quality(base, ref, test)}
    print(f"base: ppl {results['base']['ppl']:.2f}; fit on {train.numel()} C4 tokens; test 4096 WikiText-2 tokens")
    n = base.config.num_hidden_layers
    for pname in args.plans:
        plan = DropPlan(method="x", n=8, selection="importance", num_layers=n, **PLANS[pname])
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            save_pruned(prune_model(copy.deepcopy(base), plan), tmp / "pruned")
            plain = None
            for vname in args.variants:
                method, kw = VARIANTS[vname] if vname in VARIANTS else _parse(vname)
                kw = dict(kw)
                if args.ridge is not None:
                    kw["ridge"] = args.ridge
                if method == "merged" and args.cosine_steps:
                    kw["cosine_steps"] = args.cosine_steps
                if method == "merged" and args.cosine_lr:
                    kw["cosine_lr"] = args.cosine_lr
                t0 = time.perf_counter()
                added = 0
                if method == "none":
                    directory = tmp / "pruned"
                elif method == "linear":
                    fit = fit_linear(InMemoryStack(base), plan, train, progress=False, **kw)
                    directory = tmp / vname
                    write_healed(tmp / "pruned", directory, plan, "study", fit)
                    added = standin_parameters(fit)
                else:
                    fit = fit_merged(InMemoryStack(base), plan, train, progress=False, **kw)
                    directory = tmp / vname
                    write_healed(tmp / "pruned", directory, plan, "study", fit.standins, fit.folded())
                    added = standin_parameters(fit.standins)
                seconds = time.perf_counter() - t0
                q = _quality(load_pruned(directory, torch.float32), ref, test)
                if method == "none":
                    plain = q["kl"]
                base_kl = 0.0
                q["recovered"] = None if plain is None else (plain - q["kl"]) / (plain - base_kl)
                q.update(seconds=round(seconds, 1), params_added=added)
                results[f"{pname}/{vname}"] = q
                rec = "" if q["recovered"] is None else f"  recovered {100 * q['recovered']:5.1f}%"
                print(f"{pname:7} {vname:22} KL {q['kl']:.4f}  ppl {q['ppl']:7.2f}  top-1 {q['top1']:.3f}{rec}  "
                      f"fit {seconds:5.1f} s  +{added:,} params", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
