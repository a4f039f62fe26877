"""Calibration tokens: texts from a source, joined by EOS and cut into n_samples x seq_len blocks (the paper's "pt" mode)."""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import DropquantError
from .workspace import workspace_path

log = logging.getLogger(__name__)

GENERATED = "generated"
HF_PREFIX = "hf:"


def check_seq_len(config, seq_len: int) -> None:
    """Blocks longer than the model's position range would score positions it never saw in training (and
    sampling them from the model costs hours): refused before any work."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise DropquantError(f"calibration.seq_len={seq_len} is longer than the model's context: "
                             f"max_position_embeddings is {limit}")


def resolve_files(pattern: str) -> list[Path]:
    """A path or glob of .txt / .jsonl files (relative: from the workspace, dropquant.workspace), sorted so the order
    never depends on the file system."""
    matches = sorted(Path(p) for p in glob.glob(str(workspace_path(pattern)), recursive=True))
    files = [p for p in matches if p.is_file()]
    if not files:
        raise DropquantError(f"calibration.source: no file matches '{pattern}'")
    bad = [str(p) for p in files if p.suffix not in (".txt", ".jsonl")]
    if bad:
        raise DropquantError(f"calibration.source: unsupported file type {bad[:3]} (use .txt or .jsonl)")
    return files


def iter_file_texts(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
            continue
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DropquantError(f"{path}:{lineno}: not valid JSON: {err}") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise DropquantError(f"{path}:{lineno}: no field '{text_field}' (set calibration.text_field)")
                yield str(record[text_field])


def iter_hf_texts(dataset_id: str, config: str | None, split: str, text_field: str, seed: int) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, config, split=split, streaming=True)
    except Exception as err:  # datasets raises many types for a missing/unreachable dataset
        raise DropquantError(f"calibration.source: cannot stream dataset '{dataset_id}' "
                             f"(config {config}, split {split}): {err}") from None
    for record in ds.shuffle(seed=seed, buffer_size=1000):
        if text_field not in record:
            raise DropquantError(f"calibration.source: dataset '{dataset_id}' has no field '{text_field}' "
                                 f"(fields: {', '.join(record)})")
        yield record[text_field]


def pack(texts: Iterable[str], tokenizer, n_samples: int, seq_len: int) -> tuple[torch.Tensor, int]:
    """Join tokenized texts with EOS and cut the stream into blocks, without padding. Returns (blocks, texts used)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DropquantError("the model's tokenizer has no EOS token to join calibration texts with")
    need = n_samples * seq_len
    stream: list[int] = []
    used = 0
    for text in texts:
        if not text.strip():
            continue
        if stream:
            stream.append(eos)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        used += 1
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise DropquantError(f"the calibration source yields {len(stream)} tokens; "
                             f"calibration.n_samples x seq_len = {n_samples} x {seq_len} needs {need}")
    return torch.tensor(stream[:need], dtype=torch.int64).view(n_samples, seq_len), used


@torch.inference_mode()
def generate_tokens(model, tokenizer, n_samples: int, seq_len: int, seed: int, progress: bool = True) -> torch.Tensor:
    """Data-free calibration: sample n_samples sequences from the model itself, starting from BOS.

    Sampling at temperature 1 follows the model's own distribution, so the activations it produces are
    ones the model really sees; EOS tokens it emits join texts just as in packed data."""
    from tqdm import tqdm

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.full((n_samples, 1), start, dtype=torch.int64)
    out = model(input_ids=ids.to(device), use_cache=True)
    cache, tokens = out.cache, [ids]
    for _ in tqdm(range(seq_len - 1), desc="sampling calibration text", disable=not progress, unit="tok"):
        # Sampled on the CPU with a CPU generator, so the tokens do not depend on the device.
        probs = torch.softmax(out.logits[:, -1].float().cpu(), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        tokens.append(nxt)
        out = model(input_ids=nxt.to(device), cache=cache, use_cache=True)
        cache = out.cache
    return torch.cat(tokens, dim=1)


def source_texts(source: str, hf_config, split: str, text_field: str, seed: int) -> Iterator[str]:
    if source.startswith(HF_PREFIX):
        return iter_hf_texts(source[len(HF_PREFIX):], hf_config, split, text_field, seed)
    files = resolve_files(source)
    texts = list(iter_file_texts(files, text_field))
    random.Random(seed).shuffle(texts)  # a seed picks which documents; file order alone would always take the first
    return iter(texts)


def tokens_digest(input_ids: torch.Tensor) -> str:
    return hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()
