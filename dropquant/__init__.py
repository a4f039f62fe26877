"""dropquant: one-shot attention/MLP/block dropping and GGUF quantization for Llama-style LLMs."""
from .pruning import load_pruned

__all__ = ["load_pruned"]
