"""Where llama.cpp runs an evaluation: `eval.gpu_layers` against the installed build and `model.device`, the
devices llama.cpp sees, and what a run put on them (recorded beside the figures).

llama-cpp-python is built for one backend (`make setup`: CUDA where an NVIDIA GPU and nvcc are present, else the
CPU; docs/gpu.md). A build without a GPU backend ignores n_gpu_layers without a word, so an explicit request for
offloaded layers is refused there (`check_gpu_layers`, at parameter validation) instead of quietly measuring the
CPU.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Optional, Union

ALL_LAYERS = -1  # llama.cpp's "every layer": the repeating layers and the output layer
# ggml's enum ggml_backend_dev_type (ggml-backend.h of the pinned llama.cpp)
DEVICE_TYPES = ("cpu", "gpu", "igpu", "accel", "meta")
NO_GPU_BACKEND = ("this llama-cpp-python build has no GPU backend (llama_supports_gpu_offload() is false), so no "
                  "layer can go to a GPU: rebuild it with CUDA (`make clean-setup setup` where nvidia-smi and nvcc "
                  "work, docs/gpu.md), or leave eval.gpu_layers at auto (or 0)")


@functools.lru_cache(maxsize=1)
def gpu_offload_supported() -> bool:
    """Whether the installed llama.cpp can put layers on a GPU (a GPU backend is compiled in and sees a device)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def _ggml():
    """The ggml library llama-cpp-python loaded (its backend registry is not wrapped by the Python package)."""
    from llama_cpp import llama_cpp as lib

    ggml = lib._lib  # dlsym through libllama's handle finds libggml's symbols, which it links
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(ggml, name).argtypes = [ctypes.c_void_p]
        getattr(ggml, name).restype = ctypes.c_char_p
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_name.restype = ctypes.c_char_p
    return ggml


@functools.lru_cache(maxsize=1)
def llama_devices() -> tuple[dict, ...]:
    """llama.cpp's devices: name (`CUDA0`), description (the GPU's own name), type (cpu, gpu, ...), backend (`CUDA`).
    Empty when the library does not export ggml's device registry."""
    try:
        ggml = _ggml()
    except (AttributeError, OSError):
        return ()
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        kind = ggml.ggml_backend_dev_type(dev)
        out.append({"name": (ggml.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                    "description": (ggml.ggml_backend_dev_description(dev) or b"").decode(errors="replace").strip(),
                    "type": DEVICE_TYPES[kind] if 0 <= kind < len(DEVICE_TYPES) else str(kind),
                    "backend": (ggml.ggml_backend_reg_name(ggml.ggml_backend_dev_backend_reg(dev)) or b"").decode()})
    return tuple(out)


def gpu_devices() -> list[dict]:
    return [d for d in llama_devices() if d["type"] in ("gpu", "igpu")]


def backend() -> str:
    """The llama.cpp backend layers are offloaded to: `cuda`, `metal`, `vulkan`, ... (lower case), or `cpu`."""
    gpus = gpu_devices() if gpu_offload_supported() else []
    return gpus[0]["backend"].lower() if gpus else "cpu"


def check_gpu_layers(spec: Union[str, int]) -> None:
    """eval.gpu_layers as the schema allows it: auto, -1 (all) or a count >= 0; a request for offloaded layers on a
    build without a GPU backend is refused (ValueError, which the parameter check reports with the key)."""
    if spec == "auto":
        return
    if isinstance(spec, bool) or not isinstance(spec, int) or spec < ALL_LAYERS:
        raise ValueError("must be auto, -1 (every layer) or a number of layers >= 0")
    if spec != 0 and not gpu_offload_supported():
        what = "every layer" if spec == ALL_LAYERS else f"{spec} layer{'s' if spec > 1 else ''}"
        raise ValueError(f"asks for {what} on a GPU, but {NO_GPU_BACKEND}")


def resolve_gpu_layers(spec: Union[str, int], model_device: str = "auto") -> int:
    """n_gpu_layers for every llama.cpp model of an evaluation: auto = every layer where the build can offload and
    model.device is not the CPU (the user chose the GPU for the torch stages), else none."""
    if spec == "auto":
        return ALL_LAYERS if model_device != "cpu" and gpu_offload_supported() else 0
    check_gpu_layers(spec)
    return int(spec)


def model_layers(gguf: Union[str, Path]) -> Optional[int]:
    """Layers llama.cpp counts for offloading: the repeating blocks and the output layer."""
    from dropquant.gguf.header import read_metadata

    try:
        arch = read_metadata(gguf, "general.architecture")["general.architecture"][0]
        return int(read_metadata(gguf, f"{arch}.block_count")[f"{arch}.block_count"][0]) + 1
    except (OSError, KeyError, ValueError):
        return None


def _device_name(gpus: list[dict]) -> str:
    names = [d["description"] or d["name"] for d in gpus]
    if not names:
        return "gpu"
    if len(set(names)) == 1:
        return names[0] if len(names) == 1 else f"{len(names)} × {names[0]}"
    return " + ".join(names)


def describe(gpu_layers: int, gguf: Union[str, Path, None] = None) -> dict:
    """What a run with n_gpu_layers = `gpu_layers` puts where (details.json's `device`): the device (`cpu`, or the
    GPU's name), the backend (`cpu`, `cuda`, ...), and the layers offloaded out of the model's (as llama.cpp counts
    them: the blocks and the output layer)."""
    layers = model_layers(gguf) if gguf is not None else None
    if gpu_layers == 0 or not gpu_offload_supported():
        return {"device": "cpu", "backend": "cpu", "gpu_layers": 0, "layers": layers}
    wanted = layers if gpu_layers < 0 else gpu_layers
    offloaded = min(wanted, layers) if wanted is not None and layers is not None else wanted
    return {"device": _device_name(gpu_devices()), "backend": backend(), "gpu_layers": offloaded, "layers": layers}

