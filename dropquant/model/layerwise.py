"""One layer-wise runner for every pass over calibration tokens (scoring, the importance matrix).

The calibration tokens go through the decoder one layer at a time: all of them through layer 0, then all
of them through layer 1, ... with the residual stream of every token kept between layers (in memory, or
in a file-backed buffer when it would not fit). Observers see each layer's modules and each batch's input
and output. Where the layers come from is the stack's business:

- `InMemoryStack`: a loaded transformers model (on the CPU, a GPU, or spread over GPUs by accelerate);
- `StreamedStack`: a safetensors checkpoint read one decoder layer at a time, for models larger than
  memory; the layer is built from the same transformers class and loaded with exactly the checkpoint's
  tensors, so both stacks compute the same numbers.

Each batch is computed exactly as the model's own forward does it (same rotary embeddings, same causal
mask from transformers' create_causal_mask, no KV cache).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Protocol

import torch

from dropquant.model.checkpoint import Checkpoint
from dropquant.errors import DropquantError

log = logging.getLogger(__name__)

# The residual stream of all calibration tokens goes to a file-backed buffer when it would take more than
# this share of the memory available now.
HIDDEN_MEMORY_SHARE = 0.25


def available_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable, within a cgroup limit if lower)."""
    avail = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        usage = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail, int(limit) - usage)
    return avail


class Observer(Protocol):
    def layer_start(self, i: int, layer) -> None: ...
    def batch(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None: ...
    def layer_end(self, i: int) -> None: ...


class InMemoryStack:
    """The layers of a loaded model (each may live on its own device)."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.layers = model.model.layers
        self.dtype = next(model.parameters()).dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.model.model.embed_tokens
        return emb(input_ids.to(emb.weight.device))

    def rotary(self):
        return self.model.model.rotary_emb

    def embed_weight(self) -> torch.Tensor:
        return self.model.model.embed_tokens.weight

    def head(self, weight: Optional[torch.Tensor] = None):
        """The final norm and LM head as one function of the last layer's output (`weight`: another LM head
        matrix in place of the model's, e.g. a quantized one)."""
        norm, lm_head = self.model.model.norm, self.model.lm_head
        if weight is not None:
            return lambda y: torch.nn.functional.linear(norm(y.to(norm.weight.device)).to(weight.device), weight)
        return lambda y: lm_head(norm(y.to(norm.weight.device)).to(lm_head.weight.device))

    @contextlib.contextmanager
    def layer(self, i: int) -> Iterator[tuple[torch.nn.Module, torch.device]]:
        layer = self.layers[i]
        yield layer, next(layer.parameters()).device


class StreamedStack:
    """A safetensors checkpoint's layers, one at a time: only the layer in use holds memory."""

    def __init__(self, path, config, dtype: torch.dtype, device: str = "cpu", record: Optional[dict] = None):
        from dropquant.model.loading import build_skeleton
        from dropquant.prune.surgery import apply_layout

        self.checkpoint = Checkpoint(path)
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        skeleton = build_skeleton(config, dtype)
        if record:  # a pruned checkpoint: the same layer classes with the dropped halves removed
            apply_layout(skeleton, record)
        self.skeleton = skeleton
        self.layers = skeleton.model.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.checkpoint.get("model.embed_tokens.weight").to(self.device, self.dtype)
        return torch.nn.functional.embedding(input_ids.to(self.device), weight)

    def rotary(self):
        # Built for real (its inverse frequencies are computed in __init__, which meta tensors cannot hold).
        return type(self.skeleton.model.rotary_emb)(config=self.config).to(self.device)

    def embed_weight(self) -> torch.Tensor:
        return self.checkpoint.get("model.embed_tokens.weight").to(self.device, self.dtype)

    def head(self, weight: Optional[torch.Tensor] = None):
        norm = type(self.skeleton.model.norm)(int(self.config.hidden_size), eps=self.config.rms_norm_eps)
        norm = norm.to(self.device, self.dtype)
        norm.weight.data = self.checkpoint.get("model.norm.weight").to(self.device, self.dtype)
        if weight is None:
            name = "lm_head.weight" if "lm_head.weight" in self.checkpoint else "model.embed_tokens.weight"
            weight = self.checkpoint.get(name)
        weight = weight.to(self.device, self.dtype)
        return lambda y: torch.nn.functional.linear(norm(y), weight)

    @contextlib.contextmanager
    def layer(self, i: int) -> Iterator[tuple[torch.nn.Module, torch.device]]:
        layer = self.layers[i]
        prefix = f"model.layers.{i}."
        tensors = self.checkpoint.get_many(self.checkpoint.with_prefix(prefix))
        state = {k[len(prefix):]: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
                 for k, v in tensors.items()}
        del tensors
        expected = set(layer.state_dict().keys())
        if set(state) != expected:
            raise DropquantError(f"{self.checkpoint.path}: layer {i} tensors do not match the config: missing "
                                 f"{sorted(expected - set(state))[:4]}, unexpected {sorted(set(state) - expected)[:4]}")
        layer.load_state_dict(state, strict=True, assign=True)
        del state
        try:
            yield layer, self.device
        finally:
            layer.to("meta")  # releases this layer's weights before the next one is read
            _return_freed_memory(self.device)


def _return_freed_memory(device: torch.device) -> None:
    """Hand freed heap back to the OS (glibc): without it, each layer's freed tensors leave fragments behind
    and the peak creeps up with depth. On a GPU, torch's caching allocator keeps a freed layer's blocks for
    itself: they go back to the device, so the next layer (or another process) finds the memory free."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()


class HiddenStates:
    """The residual stream of every calibration token, [n_samples, seq_len, hidden], in memory or in a file."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, scratch: Optional[Path] = None):
        n_bytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        self._file = None
        if n_bytes > HIDDEN_MEMORY_SHARE * available_memory():
            fd, name = tempfile.mkstemp(prefix="dropquant-hidden-", suffix=".bin", dir=scratch)
            os.close(fd)
            self._file = name
            log.info("calibration hidden states (%.1f GB) kept in %s", n_bytes / 1e9, name)
            self.data = torch.from_file(name, shared=True, size=int(torch.Size(shape).numel()),
                                        dtype=dtype).view(shape)
        else:
            self.data = torch.empty(shape, dtype=dtype)

    def close(self) -> None:
        self.data = None
        if self._file:
            os.unlink(self._file)


def _batch_kwargs(stack, rotary, x: torch.Tensor) -> dict:
    from transformers.masking_utils import create_causal_mask

    position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    mask = create_causal_mask(config=stack.config, inputs_embeds=x, attention_mask=None, cache=None,
                              position_ids=position_ids)
    return {"attention_mask": mask, "position_embeddings": rotary(x, position_ids=position_ids),
            "position_ids": position_ids, "use_cache": False}


class LayerPass:
    """One layer's view of the residual streams: its batches (with the kwargs the layer's forward takes) and
    reads and writes of each named stream."""

    def __init__(self, stack, rotary, states: dict[str, HiddenStates], n_samples: int, batch_size: int,
                 device: torch.device):
        self.stack, self.rotary, self.states = stack, rotary, states
        self.n_samples, self.batch_size, self.device = n_samples, batch_size, device

    def batches(self) -> Iterator[tuple[slice, dict]]:
        shape = next(iter(self.states.values())).data.shape
        for start in range(0, self.n_samples, self.batch_size):
            sl = slice(start, start + self.batch_size)
            # Only the shape, dtype and device of the batch shape the mask and rotary embeddings.
            like = torch.empty((min(self.batch_size, self.n_samples - start), *shape[1:]), dtype=self.stack.dtype,
                               device=self.device)
            yield sl, _batch_kwargs(self.stack, self.rotary, like)

    def read(self, stream: str, sl: slice) -> torch.Tensor:
        return self.states[stream].data[sl].to(self.device)

    def write(self, stream: str, sl: slice, y: torch.Tensor) -> None:
        data = self.states[stream].data
        data[sl] = y.to(data.device)


def walk_layers(stack, input_ids: torch.Tensor, visit, streams: tuple[str, ...] = ("main",), batch_size: int = 2,
                progress: bool = True, desc: str = "layers", scratch: Optional[Path] = None) -> int:
    """Push `input_ids` [n, seq] through every decoder layer of `stack`, one layer at a time for all tokens.

    Every named stream starts as the token embeddings; `visit(i, layer, lp)` does layer i's work with
    `lp` (a LayerPass): reading each stream batch by batch and writing what the stream holds after layer i.
    Returns the number of tokens.
    """
    from tqdm import tqdm

    if input_ids.dim() != 2:
        raise DropquantError(f"calibration tokens must be [n_samples, seq_len], got shape {list(input_ids.shape)}")
    hidden = int(stack.config.hidden_size)
    states: dict[str, HiddenStates] = {}
    try:
        for name in streams:
            states[name] = HiddenStates((*input_ids.shape, hidden), stack.dtype, scratch)
        for start in range(0, input_ids.shape[0], batch_size):
            emb = stack.embed(input_ids[start:start + batch_size]).cpu()
            for st in states.values():
                st.data[start:start + batch_size] = emb
        rotary = stack.rotary()
        for i in tqdm(range(len(stack.layers)), desc=desc, unit="layer", disable=not progress):
            with stack.layer(i) as (layer, device):
                visit(i, layer, LayerPass(stack, rotary.to(device), states, input_ids.shape[0], batch_size, device))
        return int(input_ids.numel())
    finally:
        for st in states.values():
            st.close()


def layer_output(layer, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    y = layer(x, **kwargs)
    return y[0] if isinstance(y, tuple) else y


@torch.inference_mode()
def run_layers(stack, input_ids: torch.Tensor, observers: list, batch_size: int = 2, progress: bool = True,
               desc: str = "layers", scratch: Optional[Path] = None) -> int:
    """Push `input_ids` [n, seq] through every decoder layer of `stack`, showing each batch's input and output
    to the observers; returns the number of tokens."""

    def visit(i, layer, lp: LayerPass) -> None:
        for ob in observers:
            ob.layer_start(i, layer)
        for sl, kwargs in lp.batches():
            x = lp.read("main", sl)
            y = layer_output(layer, x, kwargs)
            for ob in observers:
                ob.batch(i, x, y)
            lp.write("main", sl, y)
        for ob in observers:
            ob.layer_end(i)

    return walk_layers(stack, input_ids, visit, ("main",), batch_size, progress, desc, scratch)


# --- choosing a stack ------------------------------------------------------------------------------

# A model is loaded whole only when it takes at most this share of the memory it would live in.
LOAD_MEMORY_SHARE = 0.7


def weights_bytes(checkpoint: Checkpoint, dtype: torch.dtype) -> int:
    """Bytes the checkpoint's tensors take once loaded in `dtype` (integer tensors keep their own)."""
    from math import prod

    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name in checkpoint.keys():
        floating = checkpoint.dtype(name) in ("F32", "F16", "BF16", "F64")
        total += prod(checkpoint.shape(name)) * size if floating else checkpoint.nbytes(name)
    return total


def memory_for(device: str) -> int:
    if device == "cpu":
        return available_memory()
    if device == "auto":
        return sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    return torch.cuda.mem_get_info(torch.device(device))[0]


def should_stream(stream, directory: Optional[Path], dtype: torch.dtype, device: str, name: str) -> bool:
    """model.stream resolved: True/False as asked (streaming needs safetensors), auto = when the model would
    not fit in the memory of `device`."""
    if stream is True and directory is None:
        raise DropquantError(f"model.stream=true needs safetensors weights; {name} is a GGUF file, which "
                             "transformers loads whole (dequantized)")
    if stream is not True and (stream is False or directory is None):
        return False
    if stream is True:
        return True
    need, have = weights_bytes(Checkpoint(directory), dtype), memory_for(device)
    streamed = need > LOAD_MEMORY_SHARE * have
    log.info("%s: %.1f GB of weights in %s, %.1f GB available on %s: %s", name, need / 1e9,
             str(dtype).removeprefix("torch."), have / 1e9, device,
             "streaming one layer at a time" if streamed else "loading it whole")
    return streamed


def source_stack(source, dtype: torch.dtype, device: str, stream):
    """The layers of model.source, loaded whole or streamed as `stream` (model.stream) decides."""
    from dropquant.model.loading import checkpoint_dir, load_config, load_model

    directory = checkpoint_dir(source)
    if should_stream(stream, directory, dtype, device, source.spec):
        return StreamedStack(directory, load_config(source), dtype, "cuda:0" if device == "auto" else device)
    return InMemoryStack(load_model(source, dtype, device))


def checkpoint_stack(path, dtype: torch.dtype, device: str, stream):
    """The layers of a (pruned) checkpoint written by the drop stage, loaded whole or streamed."""
    from dropquant.prune.pruned_checkpoint import config_from_checkpoint, load_pruned, read_record

    if should_stream(stream, Path(path), dtype, device, str(path)):
        config = config_from_checkpoint(path)
        return StreamedStack(path, config, dtype, "cuda:0" if device == "auto" else device, read_record(config))
    return InMemoryStack(load_pruned(path, dtype, device))
