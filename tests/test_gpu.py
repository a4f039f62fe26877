"""GPUs: the set-up's backend choice, `eval.gpu_layers` from the parameters to every llama.cpp model the evaluation
opens, where the evaluation ran in its records, and the torch paths on CUDA.

The tests marked `gpu` need a CUDA device and skip cleanly without one (`pytest -m gpu` runs only them; so does
`python -m benchmarks.gpu_check`). The others run anywhere: a CUDA machine is simulated for the set-up by fake
`nvidia-smi` and `nvcc` scripts on PATH, and a GPU build of llama.cpp for the evaluation by its device queries.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from dropquant.errors import DropquantError
from dropquant.evaluation import device
from tests.conftest import ROOT, make_tiny

WHEEL = ROOT / "scripts" / "llama-cpp-wheel.sh"
ALL = 0x7FFFFFFF  # what llama-cpp-python stores for n_gpu_layers=-1 (llama.cpp: "every layer")
FAKE_GPU = {"name": "CUDA0", "description": "NVIDIA H100 80GB HBM3", "type": "gpu", "backend": "CUDA"}
CPU_DEV = {"name": "CPU", "description": "a CPU", "type": "cpu", "backend": "CPU"}

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
gpu = [pytest.mark.gpu, cuda]


# --- set-up: which llama.cpp it builds --------------------------------------------------------------------------

def _fake_tools(tmp_path: Path, gpus: str | None = "NVIDIA H100 80GB HBM3, 9.0", release: str = "12.4") -> Path:
    """A bin/ with nvidia-smi (listing `gpus`, or failing as it does on a machine without a GPU) and nvcc."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    smi = f"#!/bin/sh\necho '{gpus}'\n" if gpus else "#!/bin/sh\necho 'No devices were found' >&2\nexit 6\n"
    (bin_dir / "nvidia-smi").write_text(smi)
    (bin_dir / "nvcc").write_text(f"#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                                  f"echo 'Cuda compilation tools, release {release}, V{release}.99'\n")
    for tool in ("nvidia-smi", "nvcc"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def _wheel(mode: str, bin_dir: Path, cache: Path, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CUDACXX": str(bin_dir / "nvcc"),
               "DROPQUANT_WHEEL_CACHE": str(cache), **env}
    environ.pop("DROPQUANT_LLAMA_CMAKE_ARGS", None)
    return subprocess.run(["bash", str(WHEEL), sys.executable, mode], capture_output=True, text=True, env=environ)


def _dry_run(bin_dir: Path, cache: Path, **env) -> dict:
    out = _wheel("--dry-run", bin_dir, cache, **env)
    assert out.returncode == 0, out.stderr
    return dict(line.split("=", 1) for line in out.stdout.splitlines())


def test_setup_builds_cuda_where_a_gpu_and_nvcc_are_found(tmp_path):
    bin_dir = _fake_tools(tmp_path)
    run = _dry_run(bin_dir, tmp_path / "cache")
    assert run["backend"] == "cuda" and "-DGGML_CUDA=on" in run["cmake_args"]
    assert "-U__AMX_INT8__" in run["cmake_args"] and "H100" in run["why"]
    assert _wheel("--print-backend", bin_dir, tmp_path / "cache").stdout.strip() == "cuda"
    off = _dry_run(bin_dir, tmp_path / "cache", DROPQUANT_GPU="off")  # make setup GPU=off
    assert off["backend"] == "cpu" and "GGML_CUDA" not in off["cmake_args"]


def test_the_cache_key_changes_with_the_backend_and_a_cpu_build_keeps_its_key(tmp_path):
    cache = tmp_path / "cache"
    cuda_dir = _dry_run(_fake_tools(tmp_path / "a"), cache)["dir"]
    no_gpu = _dry_run(_fake_tools(tmp_path / "b", gpus=None), cache)
    assert no_gpu["backend"] == "cpu" and "no NVIDIA GPU" in no_gpu["why"]
    off = _dry_run(_fake_tools(tmp_path / "a"), cache, DROPQUANT_GPU="off")["dir"]
    assert cuda_dir != no_gpu["dir"] and off == no_gpu["dir"]
    # The toolkit and the GPUs are part of a CUDA build's key (GGML_NATIVE compiles for the GPUs present).
    assert _dry_run(_fake_tools(tmp_path / "c", release="12.8"), cache)["dir"] != cuda_dir
    assert _dry_run(_fake_tools(tmp_path / "d", gpus="NVIDIA A100-SXM4-80GB, 8.0"), cache)["dir"] != cuda_dir
    # A CPU build's key is computed from exactly what it was computed from before GPU builds: its wheel stays valid.
    flags = "-DCMAKE_C_FLAGS=-U__AMX_INT8__ -DCMAKE_CXX_FLAGS=-U__AMX_INT8__ "
    key = subprocess.run(["bash", "-c", f'source "{ROOT}/scripts/llama-cpp-common.sh"; build_key "{flags}" '
                                        f'"$("{sys.executable}" -c "import sys; print(sys.version)")"'],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert no_gpu["dir"].endswith(f"-{key}")


def test_setup_refuses_a_gpu_it_cannot_build_for(tmp_path):
    bin_dir = _fake_tools(tmp_path, gpus=None)
    out = _wheel("--dry-run", bin_dir, tmp_path / "cache", DROPQUANT_GPU="on")
    assert out.returncode == 2 and "CMAKE_CUDA_ARCHITECTURES" in out.stderr
    out = _wheel("--dry-run", bin_dir, tmp_path / "cache", DROPQUANT_GPU="yes")
    assert out.returncode == 2 and "expected on, off or auto" in out.stderr


def test_setup_check_names_the_backend(tokenizer_gguf):
    from dropquant import setup_check

    result = setup_check.probe(str(tokenizer_gguf), gpu_layers=-1)
    assert result["finite"] and result["gpu_layers"] == -1 and "gpu_offload" in result
    assert setup_check.backend_line({"gpu_offload": False, "devices": [CPU_DEV]}).startswith("CPU only")
    assert setup_check.backend_line({"gpu_offload": True, "devices": [CPU_DEV, FAKE_GPU]}) == \
        "CUDA (NVIDIA H100 80GB HBM3)"


# --- eval.gpu_layers: checked with the parameters, resolved once, recorded ----------------------------------------

@pytest.fixture
def no_gpu_build(monkeypatch):
    monkeypatch.setattr(device, "gpu_offload_supported", lambda: False)


@pytest.fixture
def gpu_build(monkeypatch):
    """llama.cpp as a CUDA build reports itself (the CPU build underneath ignores n_gpu_layers)."""
    monkeypatch.setattr(device, "gpu_offload_supported", lambda: True)
    monkeypatch.setattr(device, "llama_devices", lambda: (CPU_DEV, FAKE_GPU))


@pytest.mark.parametrize("value", [-1, 8])
def test_gpu_layers_refused_without_a_gpu_backend(no_gpu_build, value, tmp_path, capsys):
    from dropquant.params import parse_params
    from stages.evaluate import main

    with pytest.raises(DropquantError, match=r"eval\.gpu_layers.*no GPU backend"):
        parse_params({"eval": {"gpu_layers": value}})
    assert parse_params({"eval": {"gpu_layers": 0}}).eval.gpu_layers == 0
    assert device.resolve_gpu_layers("auto", "cuda") == 0
    # The stage refuses before reading any artifact (the GGUF named here does not exist).
    assert main(["-S", f"eval.gpu_layers={value}", "--gguf", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err
    assert "GPU backend" in err and "missing.gguf" not in err


def test_gpu_layers_out_of_range_refused():
    from dropquant.params import parse_params

    with pytest.raises(DropquantError, match=r"eval\.gpu_layers: .*-1 \(every layer\)"):
        parse_params({"eval": {"gpu_layers": -2}})


def test_auto_offloads_every_layer_unless_the_model_is_kept_on_the_cpu(gpu_build, tiny_gguf):
    _, path = tiny_gguf
    assert device.resolve_gpu_layers("auto", "auto") == -1 and device.resolve_gpu_layers("auto", "cuda:0") == -1
    assert device.resolve_gpu_layers("auto", "cpu") == 0 and device.resolve_gpu_layers(5, "cpu") == 5
    # Offloaded layers as llama.cpp counts them: 2 blocks and the output layer.
    assert device.describe(-1, path) == {"device": "NVIDIA H100 80GB HBM3", "backend": "cuda", "gpu_layers": 3,
                                         "layers": 3}
    assert device.describe(2, path)["gpu_layers"] == 2 and device.describe(9, path)["gpu_layers"] == 3
    assert device.describe(0, path) == {"device": "cpu", "backend": "cpu", "gpu_layers": 0, "layers": 3}


def test_llama_cpp_devices_are_read_from_the_build():
    devices = device.llama_devices()
    assert any(d["type"] == "cpu" and d["backend"] == "CPU" for d in devices)
    assert device.gpu_offload_supported() == bool(device.gpu_devices())


@pytest.fixture
def recorded_llamas(monkeypatch):
    """Every llama_cpp.Llama opened in this process, as the objects themselves."""
    import llama_cpp

    opened = []

    class Recording(llama_cpp.Llama):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(llama_cpp, "Llama", Recording)
    return opened


def _stage_inputs(tmp_path: Path, gguf: Path) -> dict:
    """What the evaluate stage reads, around the tiny GGUF as both the variant and the base."""
    from dropquant.artifacts import plan_id

    model = {"fingerprint": "tiny", "source": "tiny"}
    plan = {"method": "attn", "n": 1, "attn": [1], "mlp": [], "blocks": [], "num_layers": 2, "model": model}
    plan["plan_id"] = plan_id(plan)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    paths = {}
    for who in ("variant", "base"):
        (tmp_path / who).mkdir()
        shutil.copyfile(gguf, tmp_path / who / "model.gguf")
        manifest = {"size_bytes": gguf.stat().st_size, "type": "Q8_0", "model": model, "sha256": who * 8,
                    "plan_id": plan["plan_id"] if who == "variant" else None}
        (tmp_path / who / "manifest.json").write_text(json.dumps(manifest))
        paths[who] = tmp_path / who / "model.gguf"
    (tmp_path / "data").mkdir()  # no task data: the chat task is skipped after its model is opened
    (tmp_path / "params.yaml").write_text(
        "eval:\n  tasks: []\n  fidelity_tokens: 512\n  speed: false\n  gpu_layers: -1\n"
        f"  data_dir: {tmp_path / 'data'}\n  chat:\n    tasks: [mt_bench]\n    limit: 2\n    parallel: 2\n")
    return paths


def test_every_llama_the_evaluate_stage_opens_gets_the_gpu_layers(gpu_build, recorded_llamas, tmp_path, tiny_gguf):
    """Baseline and variant, run by the stage's own CLI: accuracy, the fidelity reference and comparison (both
    models), chat; each llama.cpp model checked on the object; the device recorded where the figures are."""
    from stages.evaluate import main

    paths = _stage_inputs(tmp_path, tiny_gguf[1])
    common = ["--params", str(tmp_path / "params.yaml"), "--base-gguf", str(paths["base"]),
              "--base-eval", str(tmp_path / "base_eval")]
    assert main([*common, "--baseline"]) == 0
    assert len(recorded_llamas) == 3  # accuracy, fidelity reference, chat
    assert main([*common, "--gguf", str(paths["variant"]), "--plan", str(tmp_path / "plan.json"),
                 "--out", str(tmp_path / "eval")]) == 0
    assert len(recorded_llamas) == 7  # + accuracy, fidelity (variant and base), chat
    assert [llm.model_params.n_gpu_layers for llm in recorded_llamas] == [ALL] * 7
    where = {"device": "NVIDIA H100 80GB HBM3", "backend": "cuda", "gpu_layers": 3, "layers": 3}
    details = json.loads((tmp_path / "eval" / "details.json").read_text())
    assert details["metrics"]["device"] == where and details["base_device"] == where
    assert json.loads((tmp_path / "base_eval" / "manifest.json").read_text())["device"] == where
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["gpu_layers"] == 3


def test_speed_workers_get_the_gpu_layers(tiny_gguf):
    from dropquant.evaluation.speed import Worker

    with ExitStack() as stack:
        ready = Worker(tiny_gguf[1], True, 1, 2, stack, gpu_layers=-1).reply()
    assert ready["n_gpu_layers"] == ALL
    assert ready["kv_cache_device"] and set(ready["buffers"]) >= {"model", "KV", "compute"}


def test_llama_cpp_buffers_per_device_from_its_log():
    from dropquant.evaluation.speed import buffers_from_log

    log = ("load_tensors:        CUDA0 model buffer size =  8145.30 MiB\n"
           "load_tensors:   CPU_Mapped model buffer size =   532.00 MiB\n"
           "llama_kv_cache:      CUDA0 KV buffer size =   512.00 MiB\n"
           "llama_context:      CUDA0 compute buffer size =   296.00 MiB\n"
           "llama_context:  CUDA_Host compute buffer size =    16.01 MiB\n")
    assert buffers_from_log(log) == {"model": {"CUDA0": 8145.3, "CPU_Mapped": 532.0}, "KV": {"CUDA0": 512.0},
                                     "compute": {"CUDA0": 296.0, "CUDA_Host": 16.01}}


def test_metrics_json_names_the_gpu_layers_only_when_offloaded():
    from dropquant.evaluation.metrics import build_metrics, headline

    acc = {"tasks": {"arc_easy": {"acc": 0.5, "acc_norm": 0.4, "n": 100}}}

    def metrics(where):
        return build_metrics(method="attn", n=8, quant_type="Q8_0", tasks=["arc_easy"], accuracy=acc,
                             base_accuracy=acc, fidelity=None, speed=None, variant_bytes=1, device=where)

    cpu = metrics({"device": "cpu", "backend": "cpu", "gpu_layers": 0, "layers": 31})
    assert cpu["device"]["device"] == "cpu" and "gpu_layers" not in headline(cpu)
    on_gpu = metrics({"device": "NVIDIA H100 80GB HBM3", "backend": "cuda", "gpu_layers": 31, "layers": 31})
    assert headline(on_gpu)["gpu_layers"] == 31


# --- the device check on a machine without CUDA ------------------------------------------------------------------

def test_gpu_check_without_cuda_says_so(tmp_path, capsys):
    from benchmarks.gpu_check import NO_CUDA, main

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the device check would run")
    assert main(["--out", str(tmp_path / "gpu_check")]) == NO_CUDA
    assert "no CUDA" in capsys.readouterr().err
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["cuda"] is False and "no CUDA" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_parts_run_on_the_cpu(tmp_path, monkeypatch):
    """The device check's plumbing, `--device cpu --quick` on a tiny random model: a part in its own process under
    its limit, the report written."""
    from benchmarks.gpu_check import main

    monkeypatch.chdir(ROOT)
    assert main(["--device", "cpu", "--quick", "--parts", "stream", "--out", str(tmp_path / "check")]) == 0
    report = json.loads((tmp_path / "check.json").read_text())
    stream = report["parts"]["stream"]
    assert stream["status"] == "ok" and stream["seconds"] > 0 and stream["layers"] >= 2 and stream["finite"]
    assert "## stream: ok" in (tmp_path / "check.md").read_text()


# --- torch on CUDA ---------------------------------------------------------------------------------------------

def _tokens(n=4, seq=32, vocab=128):
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.gpu
@cuda
def test_scores_on_cuda_equal_the_cpus():
    from dropquant.prune.scoring import score_model

    model = make_tiny(layers=4)
    on_cpu = score_model(model, _tokens(), batch_size=2, progress=False)
    on_gpu = score_model(model.to("cuda"), _tokens(), batch_size=2, progress=False)
    for unit in ("attn", "mlp", "block"):
        assert on_gpu["importance"][unit] == pytest.approx(on_cpu["importance"][unit], abs=1e-3)
    assert torch.tensor(on_gpu["span_angular"]).sub(torch.tensor(on_cpu["span_angular"])).abs().max() < 1e-3


@pytest.mark.gpu
@cuda
def test_streamed_layers_hand_their_gpu_memory_back(tmp_path):
    from dropquant.model.layerwise import StreamedStack, run_layers
    from dropquant.model.loading import load_config, resolve_source
    from dropquant.prune.scoring import UnitScores

    model = make_tiny(layers=5, hidden=256)
    model.save_pretrained(tmp_path / "ckpt")
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    torch.cuda.empty_cache()
    before, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    stack = StreamedStack(tmp_path / "ckpt", load_config(resolve_source(str(tmp_path / "ckpt"))), torch.float32,
                          "cuda")
    held = []

    class Watch(UnitScores):
        def layer_end(self, i):
            super().layer_end(i)
            held.append(torch.cuda.memory_allocated() - before)

    run_layers(stack, _tokens(), [Watch(5)], batch_size=2, progress=False)
    assert max(held) - min(held) < layer_bytes  # one layer at a time, never an accumulation
    assert torch.cuda.memory_allocated() - before < layer_bytes  # the last one released too
    # the cache handed back (empty_cache); what is left is a few of the allocator's blocks for small tensors
    assert torch.cuda.memory_reserved() - reserved < 2 * layer_bytes + 64 * 2**20


@pytest.mark.gpu
@cuda
def test_linear_heal_on_cuda_equals_the_cpus():
    from dropquant.heal.linear import fit_linear
    from dropquant.model.layerwise import InMemoryStack
    from dropquant.prune.selection import DropPlan

    model = make_tiny(layers=4)
    plan = DropPlan("attn", 2, "explicit", attn=[1, 2], num_layers=4)
    on_cpu = fit_linear(InMemoryStack(model), plan, _tokens(8), ridge=1e-3, progress=False)
    on_gpu = fit_linear(InMemoryStack(copy.deepcopy(model).to("cuda")), plan, _tokens(8), ridge=1e-3, progress=False)
    for i in (1, 2):
        w_cpu, w_gpu = on_cpu.weights[i], on_gpu.weights[i]
        assert w_gpu.device.type == "cpu"  # written to the checkpoint from the CPU
        assert (w_gpu - w_cpu).abs().max() < 1e-3 * max(1.0, w_cpu.abs().max().item())
        assert on_gpu.explained[i] == pytest.approx(on_cpu.explained[i], abs=1e-4)


@pytest.mark.gpu
@cuda
def test_imatrix_on_cuda_equals_the_cpus():
    from dropquant.gguf.imatrix import collect_imatrix

    model = make_tiny(layers=2)
    modules = {f"model.layers.{i}.self_attn.q_proj": f"blk.{i}.attn_q.weight" for i in range(2)}
    on_cpu = collect_imatrix(model, _tokens(), modules)
    on_gpu = collect_imatrix(copy.deepcopy(model).to("cuda"), _tokens(), modules)
    for name, st in on_cpu.items():
        assert on_gpu[name].count == st.count
        assert abs(on_gpu[name].mean - st.mean).max() < 1e-4 * max(1.0, float(st.mean.max()))


def _distill(student, targets, precision, steps=4):
    from dropquant.heal.distill import distill

    return distill(copy.deepcopy(student), targets.select(slice(1, None)), targets.select(slice(0, 1)), what="lora",
                   lora_rank=4, steps=steps, lr=1e-3, batch_size=1, hidden_weight=0.0, eval_every=2, patience=3, seed=0,
                   device="cuda", precision=precision, progress=False)


@pytest.mark.gpu
@cuda
def test_distill_in_bfloat16_on_cuda_runs_and_float32_repeats_itself():
    from dropquant.heal.distill import teacher_targets
    from dropquant.model.layerwise import InMemoryStack
    from dropquant.prune.selection import DropPlan
    from dropquant.prune.surgery import prune_model

    base = make_tiny(layers=4).to("cuda")
    targets = teacher_targets(InMemoryStack(base), _tokens(5), 8, progress=False)
    assert targets.top_ids.device.type == "cpu"
    student = prune_model(copy.deepcopy(base), DropPlan("attn", 1, "explicit", attn=[2], num_layers=4))
    model, result = _distill(student, targets, "bfloat16")
    assert result.precision == "bfloat16" and result.steps == 4
    assert all(torch.isfinite(torch.tensor(kl)) for _, kl in result.heldout)
    assert next(model.parameters()).device.type == "cuda"
    first, second = _distill(student, targets, "float32")[1], _distill(student, targets, "float32")[1]
    assert first.heldout == pytest.approx(second.heldout, abs=1e-6)  # deterministic, as on the CPU


@pytest.mark.gpu
@cuda
def test_llama_cpp_on_the_gpu_gives_the_cpus_next_tokens(embedded):
    if not device.gpu_offload_supported():
        pytest.skip("this llama.cpp build has no GPU backend (make setup on a machine with nvcc builds one)")
    from dropquant.evaluation.fidelity import _log_softmax
    from dropquant.evaluation.llamacpp_lm import open_llama

    rows = []
    for layers in (0, -1):
        llm = open_llama(embedded, 128, 1, gpu_layers=layers)
        tokens = llm.tokenize(b"The capital of France is Paris. The largest planet of the solar system is Jupiter, "
                              b"and the closest star to the Earth is the Sun.")
        llm.eval(tokens)
        rows.append(_log_softmax(llm.scores[:len(tokens)]))
    # CUDA's kernels round otherwise than the CPU's (F16 attention, another matmul order): close, not equal.
    kl = (torch.tensor(rows[0]).exp() * torch.tensor(rows[0] - rows[1])).sum(-1)
    assert kl.mean() < 0.01 and (rows[0].argmax(-1) == rows[1].argmax(-1)).mean() >= 0.9
    assert device.describe(-1, embedded)["gpu_layers"] == 31 and device.backend() == "cuda"
