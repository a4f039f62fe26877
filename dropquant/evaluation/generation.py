"""Greedy generation in llama.cpp for many prompts at once (parallel decoding).

Each prompt is one llama.cpp sequence; every step decodes one token of every running sequence in one
llama_decode call, so the weights are read once per step instead of once per token of each prompt. A
prompt that shares a prefix with a running one (a few-shot preamble, a chat template's system prompt)
gets those cells by `llama_memory_seq_cp`, without evaluating them again: prompts are admitted in
token order so that shared prefixes are neighbours.

Two cache layouts: one unified cache (all sequences in n_ctx cells; sequences are admitted while the
cells they may need, prompt + token budget, fit, and shared prefix cells are owned jointly), or one
stream of n_ctx / n_seq_max cells per sequence (kv_unified=False; a shared prefix is copied). In the
unified cache every token's attention runs over all sequences' cells (masked), which at 64 sequences
cost more than the weights here; the chat evaluation uses streams.

Stopping is lm-eval's: at end-of-generation, at the first occurrence of a stop string (cut off
before it), or at the token budget; `Sequence` is also what the one-at-a-time reference uses.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from tqdm import tqdm

from .prefix import common_prefix

log = logging.getLogger(__name__)


@dataclass
class Generation:
    text: str
    tokens: list[int]
    stop: str  # eog | until | budget | context
    end: Optional[int] = None  # the end-of-generation token that stopped it (not in `tokens`)


@dataclass
class Sequence:
    """One prompt's greedy continuation: its text grows with each token, checked for stop strings."""

    prompt: list[int]
    budget: int
    until: list[str]
    n_ctx: int
    tokens: list[int] = field(default_factory=list)
    result: Optional[Generation] = None
    _bytes: bytearray = field(default_factory=bytearray)

    def push(self, token: int, lm) -> bool:
        """Take the next greedy token; True when the sequence is finished (`result` set)."""
        if lm._is_eog(token):
            return self._finish("eog", end=token)
        self.tokens.append(token)
        self._bytes += lm.llama.detokenize([token])
        if self.until:
            text = self._text()
            hits = [text.find(s) for s in self.until if s in text]
            if hits:
                return self._finish("until", text[:min(hits)])
        if len(self.tokens) >= self.budget:
            return self._finish("budget")
        if len(self.prompt) + len(self.tokens) >= self.n_ctx:
            return self._finish("context")
        return False

    @property
    def position(self) -> int:  # of the last token taken, the next one to decode
        return len(self.prompt) + len(self.tokens) - 1

    def _text(self) -> str:
        return bytes(self._bytes).decode("utf-8", errors="ignore")

    def _finish(self, why: str, text: Optional[str] = None, end: Optional[int] = None) -> bool:
        self.result = Generation(self._text() if text is None else text, list(self.tokens), why, end)
        return True


def prepare(lm, context_tokens: list[int], until, max_gen_toks: int) -> Sequence:
    """The prompt cut from the left to leave room for the budget in one sequence's cells, as lm-eval's models do."""
    until = [until] if isinstance(until, str) else [s for s in (until or []) if s]
    ctx = (context_tokens or [lm.prefix_token_id])[-max(1, lm.seq_ctx - max_gen_toks):]
    return Sequence(ctx, max_gen_toks, until, lm.seq_ctx)


def generate_sequential(lm, seq: Sequence) -> Generation:
    """One prompt at a time, one token per llama_decode: the reference the batched path must match."""
    lm._clear()
    row = lm._last_logits(seq.prompt, 0)
    while seq.result is None:
        if seq.budget <= 0:
            seq._finish("budget")
            break
        if seq.push(int(np.argmax(row)), lm):
            break
        row = lm._last_logits([seq.tokens[-1]], seq.position)
    return seq.result


class _Slot:
    """A running sequence: its llama.cpp sequence id, the cells it reserved, and the slots whose prompt
    cells it shares (released only when nobody needs them)."""

    def __init__(self, seq: Sequence, sid: int, shared_from: Optional["_Slot"], shared: int):
        self.seq, self.sid = seq, sid
        self.own_prompt = len(seq.prompt) - shared
        self.chain = [self] + (shared_from.chain if shared_from is not None else [])
        self.refs = 0


def generate_batched(lm, seqs: list[Sequence], parallel: Optional[int] = None, progress: bool = True,
                     desc: str = "generate", share: bool = True) -> list[Generation]:
    """Greedy continuations of all `seqs`, up to `parallel` (default: as many as the context allows) at once.
    share=False evaluates every prompt whole: a prompt's prefill split into a copied prefix and the rest is
    computed by other kernels than the whole prompt, which on quantized files moves logits enough to flip
    near-ties (`make bench`: bench_generate)."""
    import llama_cpp

    parallel = min(parallel or lm.n_seq_max, lm.n_seq_max, lm.n_batch)
    order = deque(sorted(range(len(seqs)), key=lambda i: seqs[i].prompt))
    free = list(range(parallel))[::-1]
    running: list[_Slot] = []
    reserved = 0  # cells the running sequences may occupy, shared prompt cells counted once
    bar = tqdm(total=len(seqs), desc=desc, disable=not progress, unit="prompt")
    lm._clear()

    def release(slot: _Slot) -> None:
        nonlocal reserved
        llama_cpp.llama_memory_seq_rm(lm._mem, slot.sid, -1, -1)
        free.append(slot.sid)
        reserved -= slot.seq.budget
        for s in slot.chain:
            s.refs -= 1
            if s.refs == 0:
                reserved -= s.own_prompt
        bar.update(1)

    def admit(seq: Sequence) -> Optional[_Slot]:
        nonlocal reserved
        anchor, shared = None, 0
        for s in running if share else ():  # the running sequence sharing the longest prefix with this one
            k = min(common_prefix(s.seq.prompt, seq.prompt), len(seq.prompt) - 1)
            if k > shared:
                anchor, shared = s, k
        need = len(seq.prompt) - shared + seq.budget
        if lm.unified and running and reserved + need > lm.n_ctx:  # (a stream of its own always has room)
            return None
        slot = _Slot(seq, free.pop(), anchor, shared)
        for s in slot.chain:
            s.refs += 1
        reserved += need
        if anchor is not None:
            if lm.unified:  # the cells get one more owner
                llama_cpp.llama_memory_seq_cp(lm._mem, anchor.sid, slot.sid, 0, shared)
            else:  # llama.cpp copies across streams only whole: copy, then cut after the shared prefix
                llama_cpp.llama_memory_seq_cp(lm._mem, anchor.sid, slot.sid, -1, -1)
                llama_cpp.llama_memory_seq_rm(lm._mem, slot.sid, shared, -1)
            lm.tokens_reused += shared
        tokens = seq.prompt[shared:]
        out = np.zeros(len(tokens), dtype=bool)
        out[-1] = True
        row = None
        for _, _, logits in lm._decode(tokens, np.arange(shared, len(seq.prompt)), out, [[slot.sid]] * len(tokens)):
            if logits is not None:
                row = logits[-1]
        if seq.budget <= 0:
            seq._finish("budget")
        elif not seq.push(int(np.argmax(row)), lm):
            running.append(slot)
            return slot
        release(slot)
        return slot

    while order or running:
        while order and free:
            if admit(seqs[order[0]]) is None:
                break
            order.popleft()
        if not running:
            continue
        running.sort(key=lambda s: s.sid)  # llama.cpp splits a batch whose sequence ids are out of order (3x slower)
        tokens = [s.seq.tokens[-1] for s in running]
        pos = [s.seq.position for s in running]
        out = np.ones(len(running), dtype=bool)
        for _, _, logits in lm._decode(tokens, pos, out, [[s.sid] for s in running]):
            nxt = logits.argmax(axis=1)
        still = []
        for slot, token in zip(running, nxt):
            if slot.seq.push(int(token), lm):
                release(slot)
            else:
                still.append(slot)
        running = still
    bar.close()
    lm._clear()
    return [s.result for s in seqs]
