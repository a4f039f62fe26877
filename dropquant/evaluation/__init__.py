"""Evaluation of a variant against the unpruned model: lm-eval accuracy, fidelity, llama.cpp speed and memory."""
