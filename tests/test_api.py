"""The Python API (dropquant/api): end to end on a tiny random model, against the stages' own artifacts, bad
arguments named, and docs/python.md's example run as it is on the embedded model."""
from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

import dropquant as dq
from conftest import ROOT, SHARED_DATA, make_tiny
from dropquant.errors import DropquantError

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, and the dog does not mind at all.\n"
               for i in range(200))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama checkpoint with the embedded tokenizer (so that it becomes a runnable GGUF)."""
    from dropquant.model.random_model import write_random_checkpoint

    root = tmp_path_factory.mktemp("api")
    path = write_random_checkpoint(root / "tiny", family="llama", layers=4, hidden=64, intermediate=128, heads=4,
                                   kv_heads=2, dtype="float32", progress=False)
    (root / "cal.txt").write_text(TEXT)
    return root, str(path), str(root / "cal.txt")


@pytest.fixture(scope="module")
def tiny_scores(tiny):
    _, model, cal = tiny
    return dq.score(model, calibration=cal, n_samples=8, seq_len=32, progress=False)


def _stages(root, model, cal, method, n):
    """The calibrate, score and drop stages run by hand on the same settings."""
    from stages import calibrate, drop, score

    params = root / f"params-{method}-{n}.yaml"
    params.write_text(yaml.safe_dump({"model": {"source": model},
                                      "calibration": {"source": cal, "n_samples": 8, "seq_len": 32},
                                      "drop": {"method": method, "n": n}}))
    out = root / f"stages-{method}-{n}"
    p = ["--params", str(params)]
    assert calibrate.main(p + ["--out", str(out / "calibration")]) == 0
    assert score.main(p + ["--calibration", str(out / "calibration/tokens.safetensors"),
                           "--out", str(out / "scores")]) == 0
    assert drop.main(p + ["--scores", str(out / "scores/scores.json"), "--calibration", str(out / "calibration"),
                          "--plan", str(out / "drop"), "--pruned", str(out / "pruned"),
                          "--export", str(out / "export")]) == 0
    return out


def test_score_plan_drop_write_what_the_stages_write(tiny, tiny_scores):
    """No second implementation: from the same settings, the API's scores.json, heatmap, plan.json and checkpoint
    are the stages' bytes."""
    root, model, cal = tiny
    stage = _stages(root, model, cal, "attn", 2)
    saved = tiny_scores.save(root / "api-scores")
    for name in ("scores.json", "importance.csv", "heatmap.png"):
        assert (root / "api-scores" / name).read_bytes() == (stage / "scores" / name).read_bytes(), name
    assert tiny_scores.sha256 == __import__("hashlib").sha256(saved.read_bytes()).hexdigest()

    plan = dq.plan(tiny_scores, method="attn", n=2)
    assert plan.attn == sorted(tiny_scores.lowest("attn", 2)) and not plan.mlp and not plan.blocks
    assert "drop attention" in str(plan) and "layer" in str(tiny_scores)
    pruned = dq.drop(model, plan, out=root / "api-pruned")
    assert (root / "api-pruned" / "plan.json").read_bytes() == (stage / "drop" / "plan.json").read_bytes()
    assert ((root / "api-pruned" / "model.safetensors").read_bytes()
            == (stage / "pruned" / "model.safetensors").read_bytes())
    reloaded = dq.load_pruned(root / "api-pruned")
    ids = plan.tokens[:1]
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, reloaded(ids).logits)


def test_heal_to_gguf_evaluate_on_a_tiny_model(tiny, tiny_scores):
    root, model, _ = tiny
    plan = dq.plan(tiny_scores, method="attn", n=2)
    healed = dq.drop(model, plan, heal="linear", out=root / "healed", heal_options={"ridge": 1e-2})
    record = json.loads((root / "healed" / "heal.json").read_text())
    assert record["method"] == "linear" and record["linear"]["layers"]
    with torch.no_grad():
        ids = plan.tokens[:1]
        assert torch.equal(healed(ids).logits, dq.load_pruned(root / "healed")(ids).logits)

    gguf = dq.to_gguf(root / "healed", root / "v.gguf", quant="Q8_0")
    manifest = dq.read_manifest(gguf)
    assert gguf.is_file() and manifest["size_bytes"] == gguf.stat().st_size
    assert manifest["plan_id"] == plan.plan_id and manifest["heal"]["method"] == "linear"
    assert manifest["type"] == "Q8_0" and not manifest["baseline"]

    result = dq.evaluate(gguf, base=model, fidelity_tokens=512, threads=2)
    assert result["method"] == "attn" and result["n"] == 2 and result["heal"] == "linear"
    assert result.kld > 0 and 0 <= result.top1_agree <= 1 and result.ppl > 0 and result.base_ppl > 0
    assert result.avg is None and "KLD" in str(result)
    assert result.base is None  # the base exported here (at Q8_0, as the variant) is not kept


def test_a_loaded_model_is_scored_and_pruned_in_place():
    model = make_tiny("llama", layers=4)
    ids = torch.randint(3, 128, (4, 16))
    scores = dq.score(model, calibration=ids, progress=False)
    assert scores.tokens is not None and torch.equal(scores.tokens, ids)
    plan = dq.plan(scores, method="block", n=1)
    assert dq.drop(model, plan) is model and len(model.model.layers) == 3
    with pytest.raises(DropquantError, match="tokenizer"):
        dq.score(make_tiny("llama", layers=4), calibration="some.txt")


def _fake_scores(layers=4, source="x"):
    return dq.Scores({"model": {"source": source, "fingerprint": "f"}, "metric": "cosine", "n_tokens": 8,
                      "importance": {u: [0.1 * (i + 1) for i in range(layers)] for u in ("attn", "mlp", "block")}})


@pytest.mark.parametrize("call, named", [
    (lambda s, m: dq.plan(s, method="heads"), "method (drop.method)"),
    (lambda s, m: dq.plan(s, n=-1), "n (drop.n)"),
    (lambda s, m: dq.plan(s, "attn", 9), "drop.n=9"),
    (lambda s, m: dq.plan(s, selection="best"), "selection (drop.selection)"),
    (lambda s, m: dq.plan(s, layers={"attn": [7]}), "drop.layers.attn"),
    (lambda s, m: dq.plan(42), "scores"),
    (lambda s, m: dq.score(m, n_samples=0), "n_samples (calibration.n_samples)"),
    (lambda s, m: dq.score(m, metric="l2"), "metric (score.metric)"),
    (lambda s, m: dq.score(m, dtype="int8"), "dtype (model.dtype)"),
    (lambda s, m: dq.score(m, device="tpu"), "device (model.device)"),
    (lambda s, m: dq.score(42), "model"),
    (lambda s, m: dq.score("no/such/dir/here"), "model.source"),
    (lambda s, m: dq.drop(m, dq.plan(s, "attn", 1), heal="magic"), "heal (heal.method)"),
    (lambda s, m: dq.drop(m, dq.plan(s, "attn", 1), heal_options={"stepz": 3}), "heal_options['stepz']"),
    (lambda s, m: dq.drop(m, "attn-2"), "plan"),
    (lambda s, m: dq.drop(m, dq.plan(s, "attn", 1)), "plan was made for model 'x'"),
    (lambda s, m: dq.to_gguf(m, "x.gguf", quant="Q9"), "quant (quantize.type)"),
    (lambda s, m: dq.to_gguf(m, "x.bin"), "out"),
    (lambda s, m: dq.to_gguf(m, "x.gguf", quant="IQ2_XS"), "importance matrix"),
    (lambda s, m: dq.evaluate("missing.gguf", base=m), "gguf: missing.gguf not found"),
    (lambda s, m: dq.evaluate(m, base=m, tasks=["nope"]), "tasks (eval.tasks.0)"),
    (lambda s, m: dq.evaluate(m, base=m, fidelity_tokens=100), "fidelity_tokens (eval.fidelity_tokens)"),
])
def test_bad_arguments_raise_naming_the_argument(tiny, call, named):
    _, model, _ = tiny
    with pytest.raises(DropquantError) as err:
        call(_fake_scores(), model)
    assert named in str(err.value)


def _docs_example() -> str:
    text = (ROOT / "docs" / "python.md").read_text()
    section = text.split("## A runnable example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


@pytest.fixture
def gguf_read_once(monkeypatch):
    """The embedded model's config, tokenizer and weights read from its GGUF once each, then handed out as copies.

    transformers parses the whole GGUF (metadata, the tokenizer's 49152 tokens and merges) on every read: the
    example reads the config 7 times, the tokenizer twice and the weights 3 times (score, drop, the base's export),
    about 3 s, 3 s and 14 s of CPU each. The copies are what a fresh read returns (a read changes nothing)."""
    import copy
    import inspect

    from dropquant.model import loading

    cache: dict = {}

    def once(read):
        signature = inspect.signature(read)

        def wrapper(source, *args, **kwargs):
            if not source.gguf_file:
                return read(source, *args, **kwargs)
            bound = signature.bind(source, *args, **kwargs)
            bound.apply_defaults()  # load_model(s, dtype) and load_model(s, dtype, "cpu") are one read
            key = (read.__name__, source.location, source.gguf_file, source.revision,
                   *(repr(v) for k, v in bound.arguments.items() if k != "source"))
            if key not in cache:
                cache[key] = read(source, *args, **kwargs)
            return copy.deepcopy(cache[key])
        return wrapper

    for name in ("load_config", "load_tokenizer", "load_model"):
        monkeypatch.setattr(loading, name, once(getattr(loading, name)))
    return cache


@pytest.mark.integration
def test_docs_example_runs_on_the_embedded_model(tmp_path, monkeypatch, capsys, gguf_read_once):
    """docs/python.md's example, as written: score -> plan -> drop -> to_gguf -> evaluate. The slow test here (about
    55 s of CPU with each GGUF read once, gguf_read_once; 100 s without): score and drop run the 135M model, the
    base is exported at Q8_0, and lm-eval runs ARC-Easy on both files."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DROPQUANT_WORKSPACE", str(ROOT))  # ../shared/data as from the project folder
    scope: dict = {}
    exec(compile(_docs_example(), "docs/python.md", "exec"), scope)
    assert len(scope["plan"].attn) == 8
    assert dq.load_pruned(tmp_path / "pruned").config.dropquant["plan_id"] == scope["plan"].plan_id
    result = scope["result"]
    assert result.kld > 0 and 0 < result.top1_agree < 1
    if (SHARED_DATA / "arc_easy").is_dir():
        assert result["tasks"]["arc_easy"]["acc"] is not None
    out = capsys.readouterr().out
    assert "drop attention" in out and "KLD" in out
