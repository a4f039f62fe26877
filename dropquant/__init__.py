"""dropquant: one-shot attention/MLP/block dropping and GGUF quantization for Llama-style LLMs."""
from dropquant.prune.pruned_checkpoint import load_pruned

__all__ = ["load_pruned"]
