"""The model's own chat template, read from its GGUF (`tokenizer.chat_template`, which the export carries
over from the source's tokenizer config) and rendered as transformers renders it (llama-cpp-python's
Jinja2ChatFormatter: sandboxed Jinja, trim_blocks, lstrip_blocks, transformers' tojson)."""
from __future__ import annotations

from typing import Optional

from ..errors import DropquantError


def template_of(llama) -> Optional[str]:
    return llama.metadata.get("tokenizer.chat_template") or None


def _token_text(llama, token: int) -> str:
    return llama._model.token_get_text(token) if token >= 0 else ""


def render(llama, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages`. Tokenized with special tokens parsed (LlamaCppLM(chat=True)), it starts
    with exactly one BOS when the vocabulary wants one: a template that writes none gets it prepended here,
    one that writes its own (Llama 3, Mistral) is left alone."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = template_of(llama)
    if template is None:
        raise DropquantError(f"{llama.model_path}: the model has no chat template (tokenizer.chat_template)")
    bos, eos = _token_text(llama, llama.token_bos()), _token_text(llama, llama.token_eos())
    text = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos,
                               add_generation_prompt=add_generation_prompt)(messages=messages).prompt
    if bos and _adds_bos(llama) and not text.startswith(bos):
        text = bos + text
    return text


def _adds_bos(llama) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_get_add_bos(llama._model.vocab))
