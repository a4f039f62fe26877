"""dropquant: one-shot attention/MLP/block dropping and GGUF quantization for Llama-style LLMs."""
from .pruning import load_pruned  # noqa: F401  (dropquant.load_pruned)
