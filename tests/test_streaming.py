"""Layer streaming: a checkpoint read one decoder layer at a time gives the in-memory path's scores, importance
matrix and pruned checkpoint (byte for byte), in the source's own precision, holding one layer at a time."""
from __future__ import annotations

import filecmp

import pytest
import torch

from dropquant.model import layerwise
from dropquant.errors import DropquantError
from dropquant.model.layerwise import InMemoryStack, StreamedStack, checkpoint_stack, should_stream, source_stack
from dropquant.model.loading import build_skeleton, load_config, load_model, resolve_dtype, resolve_source, source_dtype
from dropquant.prune.pruned_checkpoint import checkpoint_tensor_bytes, load_pruned, save_pruned, save_pruned_from
from dropquant.prune.surgery import dropped_parameters, prune_model
from dropquant.gguf.imatrix import collect_imatrix_stack
from dropquant.prune.scoring import score_stack
from dropquant.prune.selection import DropPlan
from tests.conftest import FAMILIES, make_tiny

torch.set_num_threads(1)
L = 5
PLANS = {
    "attn": DropPlan("attn", 3, "explicit", attn=[0, 2, 4], num_layers=L),
    "mlp": DropPlan("mlp", 2, "explicit", mlp=[1, 3], num_layers=L),
    "block": DropPlan("block", 2, "explicit", blocks=[0, 3], num_layers=L),
    "joint": DropPlan("joint", 3, "explicit", attn=[1, 3], mlp=[3], num_layers=L),
}


def checkpoint(tmp_path, family="llama", dtype=torch.float32, tie=False, shard="40KB"):
    """A tiny random model saved as a sharded safetensors HF directory in `dtype`."""
    model = make_tiny(family, layers=L, tie=tie).to(dtype)
    path = tmp_path / f"{family}-{str(dtype)[6:]}"
    model.save_pretrained(path, max_shard_size=shard)
    return path


def tokens(n=5, seq=12):
    return torch.randint(3, 128, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_scores_equal_in_memory(tmp_path, family, dtype):
    path = checkpoint(tmp_path, family, dtype)
    assert len(list(path.glob("model-*.safetensors"))) > 1  # really sharded
    source = resolve_source(str(path))
    assert resolve_dtype("auto", source) == dtype
    streamed = score_stack(StreamedStack(path, load_config(source), dtype), tokens(), batch_size=2, progress=False)
    in_memory = score_stack(InMemoryStack(load_model(source, dtype)), tokens(), batch_size=2, progress=False)
    for unit in ("attn", "mlp", "block"):
        assert streamed["importance"][unit] == pytest.approx(in_memory["importance"][unit], abs=1e-5)
    assert torch.tensor(streamed["span_angular"]).sub(torch.tensor(in_memory["span_angular"])).abs().max() < 1e-5


def test_only_the_layer_in_use_holds_memory(tmp_path):
    path = checkpoint(tmp_path)
    stack = StreamedStack(path, load_config(resolve_source(str(path))), torch.float32)
    seen = []

    class Watch:
        def layer_start(self, i, layer):
            devices = [{p.device.type for p in other.parameters()} for other in stack.layers]
            seen.append([d == {"meta"} for d in devices])

        def batch(self, i, x, y):
            pass

        def layer_end(self, i):
            pass

    layerwise.run_layers(stack, tokens(), [Watch()], progress=False)
    assert seen == [[j != i for j in range(L)] for i in range(L)]
    assert all({p.device.type for p in layer.parameters()} == {"meta"} for layer in stack.layers)


def test_hidden_states_in_a_file_give_the_same_scores(tmp_path, monkeypatch):
    path = checkpoint(tmp_path)
    stack = StreamedStack(path, load_config(resolve_source(str(path))), torch.float32)
    in_memory = score_stack(stack, tokens(), progress=False)
    monkeypatch.setattr(layerwise, "HIDDEN_MEMORY_SHARE", 0.0)
    on_disk = score_stack(stack, tokens(), progress=False, scratch=tmp_path)
    assert on_disk["importance"] == in_memory["importance"]
    assert not list(tmp_path.glob("dropquant-hidden-*"))  # the scratch file is gone


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(PLANS))
def test_streamed_pruned_checkpoint_is_byte_identical(tmp_path, family, method):
    dtype = torch.bfloat16
    path = checkpoint(tmp_path, family, dtype, tie=family == "qwen2")
    source = resolve_source(str(path))
    config = load_config(source)
    model = prune_model(load_model(source, dtype), PLANS[method])
    save_pruned(model, tmp_path / "in-memory")
    skeleton = prune_model(build_skeleton(config, dtype), PLANS[method])
    save_pruned_from(skeleton, path, tmp_path / "streamed", progress=False)
    names = sorted(p.name for p in (tmp_path / "in-memory").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "streamed").iterdir())
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "in-memory", tmp_path / "streamed", names, shallow=False)
    assert (mismatch, errors) == ([], [])
    # Source precision kept; smaller by exactly the dropped parameters' bytes in that precision.
    reloaded = load_pruned(tmp_path / "streamed", dtype)
    assert {p.dtype for p in reloaded.parameters()} == {dtype}
    base = load_model(source, dtype)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    dropped = dropped_parameters(build_skeleton(config, dtype), PLANS[method])
    assert checkpoint_tensor_bytes(tmp_path / "streamed") == base_bytes - dropped["bytes"]
    assert source_dtype(resolve_source(str(tmp_path / "streamed"))) == "bfloat16"
    ids = tokens(2, 10)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_sharded_pruned_checkpoint_reloads(tmp_path, monkeypatch):
    from dropquant.model import checkpoint as ckpt

    path = checkpoint(tmp_path)
    source = resolve_source(str(path))
    model = prune_model(load_model(source), PLANS["joint"])
    defaults = list(ckpt.write_checkpoint.__defaults__)
    defaults[0] = 30_000
    monkeypatch.setattr(ckpt.write_checkpoint, "__defaults__", tuple(defaults))
    written = save_pruned(model, tmp_path / "pruned")
    assert written["shards"] > 1 and (tmp_path / "pruned" / ckpt.INDEX_NAME).is_file()
    ids = tokens(2, 10)
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "pruned")(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streamed_imatrix_equals_in_memory(tmp_path, family):
    from dropquant.gguf.export import export_checkpoint
    from dropquant.gguf.imatrix import module_gguf_names

    path = checkpoint(tmp_path, family)
    model = prune_model(load_model(resolve_source(str(path))), PLANS["joint"])
    save_pruned(model, tmp_path / "pruned")
    info = export_checkpoint(tmp_path / "pruned", tmp_path / "m.gguf", tokenizer_gguf=resolve_source("embedded").gguf_path)
    modules = module_gguf_names(info.tensor_names)
    a = collect_imatrix_stack(checkpoint_stack(tmp_path / "pruned", torch.float32, "cpu", True), tokens(), modules)
    b = collect_imatrix_stack(checkpoint_stack(tmp_path / "pruned", torch.float32, "cpu", False), tokens(), modules)
    assert set(a) == set(b) == set(modules.values())
    for name in a:
        assert a[name].count == b[name].count
        assert abs(a[name].sums - b[name].sums).max() <= 1e-5 * max(1.0, abs(b[name].sums).max())


def test_stream_is_chosen_when_the_model_would_not_fit(tmp_path, monkeypatch):
    path = checkpoint(tmp_path)
    source = resolve_source(str(path))
    assert not should_stream("auto", path, torch.float32, "cpu", "m")
    monkeypatch.setattr(layerwise, "memory_for", lambda device: 1000)
    assert should_stream("auto", path, torch.float32, "cpu", "m")
    assert isinstance(source_stack(source, torch.float32, "cpu", "auto"), StreamedStack)
    assert isinstance(source_stack(source, torch.float32, "cpu", False), InMemoryStack)
    with pytest.raises(DropquantError, match="model.stream=true needs safetensors weights"):
        should_stream(True, None, torch.float32, "cpu", "model.gguf")


def test_cuda_device_refused_without_a_gpu():
    from dropquant.model.loading import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(DropquantError, match="model.device=cuda:1, but this machine has no CUDA device"):
        resolve_device("cuda:1")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_scores_equal_cpu_scores(tmp_path):
    path = checkpoint(tmp_path)
    source = resolve_source(str(path))
    cpu = score_stack(source_stack(source, torch.float32, "cpu", True), tokens(), progress=False)
    gpu = score_stack(source_stack(source, torch.float32, "cuda:0", True), tokens(), progress=False)
    gpu_whole = score_stack(source_stack(source, torch.float32, "cuda:0", False), tokens(), progress=False)
    for unit in ("attn", "mlp", "block"):
        assert gpu["importance"][unit] == pytest.approx(cpu["importance"][unit], abs=1e-4)
        assert gpu_whole["importance"][unit] == pytest.approx(cpu["importance"][unit], abs=1e-4)
