"""Speed and memory in llama.cpp, variant against base, in both flash-attention settings, made so that other
work on the machine cannot pass for a result.

How, and why each piece is there:

- Four long-lived worker processes, one per model and flash-attention setting (`python -m
  dropquant.evaluation.speed --worker MODEL --flash-attn on|off`). Each holds one llama.cpp context, so its
  peak RSS (VmHWM, which starts anew at exec) and its KV cache are that model's in that setting alone. The
  parent drives them one short step at a time over a pipe; the three that are not measuring sit blocked on
  their pipe and use no CPU. That alternates A and B at the grain of one step (one 512-token prompt chunk or
  one run of `tg_tokens` generated tokens: a fraction of a second to a few seconds) without putting two models
  into one process, which would make their memory inseparable. A fresh subprocess per model and round
  alternated at the grain of minutes, long enough for a change of load to hit one side only.
- A round: the 2048-token prompt chunk by chunk (each chunk on all four workers before the next; pp512 is the
  first chunk, pp2048 the four together), then TG_REPS repetitions of generation after it (tg2048) and from
  an empty cache (tg0), each repetition on all four workers, keeping each worker's fastest. The order of the
  workers is reversed at every step, so each model goes first half of the time. A round's variant/base ratios
  are one paired measurement.
- Time is the worker's CPU time (of all its threads, divided by their number), not the wall clock: time a
  worker spends waiting for a core while another process runs is not counted, so preemption, the
  interference that made tg2048 of one file read 0.5 to 30 tok/s, cannot slow a figure down. With one thread
  this is exact, and on a machine with cores to spare the two clocks agree (llama.cpp's threads spin rather
  than sleep at their barriers); with several threads on a busy machine a preempted thread's peers spin
  while they wait for it and are counted, which is one more reason for headroom (below). What is left is
  sharing caches and memory bandwidth with the other processes. Every round keeps the wall-clock tok/s too,
  and each worker's CPU share (CPU time / (threads x wall time): 1 when it had its cores to itself).
- Reported tok/s are the fastest round (as benchmark tools report the minimum time: interference only ever
  slows a run down, so the fastest run is the least contaminated); speed-ups are ratios of those figures.
- Rounds are added, from `rounds` up to `max_rounds`, until each ratio is confirmed: a strict majority of
  the rounds, and at least `rounds` of them, give per-round ratios within `tolerance` of each other (relative
  width (max - min) / median of the tightest such group, a "shortest half" statistic that a minority of
  rounds hit by load cannot move), and the fastest-against-fastest ratio lies within `tolerance` of
  that group's median. The width is reported as the ratio's spread; a ratio still unconfirmed at the cap
  marks the whole measurement `noisy`.
- Threads: by default one fewer than the CPUs this process may run on (at least 1). llama.cpp's threads
  meet at a barrier after every operation, so when another process preempts one of them all of them wait:
  with n_threads = cores one busy core slowed runs 2-50x at random (tg2048 of one file: 0.5 to 30 tok/s). A
  free core absorbs the other process instead.
- On a GPU (`gpu_layers` != 0, llama.cpp's n_gpu_layers): the same workers, rounds and ratios, but the clock is
  the wall clock, each step ending with llama_synchronize: the work is the GPU's, which a process's CPU time does
  not see (the CPU mostly waits), and the threads matter only for layers left on the CPU. The KV cache then lives
  in GPU memory (`kv_cache_device`: llama.cpp's buffer names, e.g. CUDA0), and peak RSS is host memory only; the
  model, KV and compute buffers per device are kept from llama.cpp's log (`buffers`). The four workers each hold
  their model on the GPU at once.
- Both flash-attention settings, because on a CPU the faster one differs by test (on the development machine,
  one thread, flash attention on was faster for prompts and for generation from an empty cache, and 5-25%
  slower for generation after 2048 tokens). The headline
  ratio compares each model in its own faster setting (what a user would deploy); each setting's own ratio is
  kept. The KV cache is reported for each setting: with flash attention on, attention-free layers hold no
  cache at all; with it off llama.cpp pads V to the widest layer.

What a worker measures (random tokens, no sampling, one warm-up, n_ctx 4096):
  pp512, pp2048  prompt tok/s of a 512- and a 2048-token prompt from an empty cache
  tg0, tg2048    generation tok/s, one token per decode, `tg_tokens` tokens after 0 and after 2048 tokens
  kv_cache_bytes the KV cache llama.cpp allocates at 4096 tokens of context (from its own log line)
  peak_rss_bytes the worker's peak resident memory (model mapped in, cache and compute buffers)
  buffers        MiB of llama.cpp's model, KV and compute buffers per device (CPU, CUDA0, ...), from its log
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Optional

from ..errors import DropquantError

log = logging.getLogger(__name__)

SPEED_CTX = 4096
TG_TOKENS = 16
TESTS = ("pp512", "pp2048", "tg0", "tg2048")
CHUNK = 512  # a prompt is decoded in chunks of n_batch tokens: pp512 is the first chunk of pp2048
PROMPT = 2048
TG_REPS = 3  # generation repetitions per worker and round, the fastest kept: each is a fraction of a second
MODELS = ("variant", "base")
SETTINGS = ("fa_on", "fa_off")
RATIOS = ("best",) + SETTINGS  # each model's faster setting against the other's, and each setting's own ratio
REPLY_TIMEOUT_S = 900

Round = dict  # {model: {setting: {test: tok/s, "wall_tok_s": {test: tok/s}, "cpu_share": share}}}


# --- the statistics (pure) ------------------------------------------------------------------------------

def default_threads() -> int:
    """One fewer than the CPUs this process may use, at least one: a core left for everything else."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus - 1)


def agreeing(n_rounds: int, rounds: int) -> int:
    """How many rounds must agree: a strict majority, at least `rounds` (never more than were run)."""
    return min(n_rounds, max(rounds, n_rounds // 2 + 1))


def tightest(ratios: list[float], k: int) -> tuple[float, float]:
    """(relative width, median) of the k closest values: the group the other rounds' outliers cannot reach."""
    xs = sorted(ratios)
    groups = (xs[i:i + k] for i in range(len(xs) - k + 1))
    return min(((g[-1] - g[0]) / statistics.median(g), statistics.median(g)) for g in groups)


def fastest(rounds: list[Round]) -> dict:
    """Each model's, setting's and test's fastest round (tok/s)."""
    return {who: {fa: {t: max(r[who][fa][t] for r in rounds) for t in TESTS} for fa in SETTINGS} for who in MODELS}


def best_settings(fast: dict) -> dict:
    """Each model's faster flash-attention setting per test."""
    return {who: {t: max(SETTINGS, key=lambda fa: fast[who][fa][t]) for t in TESTS} for who in MODELS}


def ratio(rounds: list[Round], fast: dict, test: str, settings: tuple[str, str], min_rounds: int,
          tolerance: float) -> dict:
    """One speed-up (variant in settings[0] against base in settings[1]): value, spread, per-round ratios."""
    v_fa, b_fa = settings
    per_round = [r["variant"][v_fa][test] / r["base"][b_fa][test] for r in rounds]
    value = fast["variant"][v_fa][test] / fast["base"][b_fa][test]
    spread, center = tightest(per_round, agreeing(len(rounds), min_rounds))
    confirmed = spread <= tolerance and abs(value / center - 1) <= tolerance
    return {"value": value, "spread": spread, "per_round": per_round, "confirmed": confirmed,
            "variant_setting": v_fa, "base_setting": b_fa}


def summarize(rounds: list[Round], min_rounds: int, tolerance: float) -> dict:
    """Everything the rounds say: fastest tok/s, each model's faster setting, and every ratio with its spread."""
    fast = fastest(rounds)
    best = best_settings(fast)
    speedup = {}
    for t in TESTS:
        pairs = {"fa_on": ("fa_on", "fa_on"), "fa_off": ("fa_off", "fa_off"),
                 "best": (best["variant"][t], best["base"][t])}
        speedup[t] = {name: ratio(rounds, fast, t, pairs[name], min_rounds, tolerance) for name in RATIOS}
    noisy = not all(r["confirmed"] for by_name in speedup.values() for r in by_name.values())
    return {"rounds": len(rounds), "fastest": fast, "best_setting": best, "speedup": speedup, "noisy": noisy}


def adaptive_rounds(measure_round: Callable[[int], Round], rounds: int, max_rounds: int,
                    tolerance: float) -> tuple[list[Round], dict]:
    """Run `rounds` rounds, then more until every ratio is confirmed or `max_rounds` were run."""
    if not 1 <= rounds <= max_rounds:
        raise DropquantError(f"speed rounds: need 1 <= eval.speed_rounds ({rounds}) <= eval.speed_max_rounds "
                             f"({max_rounds})")
    done: list[Round] = []
    while True:
        done.append(measure_round(len(done)))
        if len(done) < rounds:
            continue
        summary = summarize(done, rounds, tolerance)
        if not summary["noisy"] or len(done) == max_rounds:
            return done, summary
        log.info("speed round %d: ratios not confirmed within %.0f%% yet; another round", len(done), 100 * tolerance)


# --- the workers ----------------------------------------------------------------------------------------

class Worker:
    """One model in one flash-attention setting, in its own process, measuring one test per request."""

    def __init__(self, model_path: str | Path, flash_attn: bool, threads: int, tg_tokens: int, stack: ExitStack,
                 gpu_layers: int = 0):
        self.name = f"{model_path} (flash attention {'on' if flash_attn else 'off'})"
        self.stderr = stack.enter_context(tempfile.TemporaryFile(mode="w+"))
        cmd = [sys.executable, "-m", "dropquant.evaluation.speed", "--worker", str(model_path),
               "--flash-attn", "on" if flash_attn else "off", "--threads", str(threads), "--tg-tokens", str(tg_tokens),
               "--gpu-layers", str(gpu_layers)]
        root = str(Path(__file__).resolve().parents[2])  # so the child imports this same dropquant
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1, env=env)
        stack.callback(self.close)

    def request(self, line: str) -> dict:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the worker is gone: reply() says why
        return self.reply()

    def reply(self) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT_S)
        text = self.proc.stdout.readline() if ready else ""
        if not text:
            self.close()
            self.stderr.seek(0)
            tail = "\n".join(self.stderr.read().strip().splitlines()[-5:])
            raise DropquantError(f"speed measurement of {self.name} failed (exit {self.proc.returncode}): {tail}")
        return json.loads(text)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _order(step: int) -> list[tuple[str, str]]:
    seq = [("variant", "fa_on"), ("base", "fa_on"), ("variant", "fa_off"), ("base", "fa_off")]
    return seq if step % 2 == 0 else seq[::-1]


def _tok_s(steps: dict, tokens: int, clock: str, threads: int) -> dict:
    """tok/s per test from its steps' times: the prompt chunks add up, a generation's fastest repetition counts."""
    per = {"seconds": 1, "cpu_seconds": threads}[clock]  # CPU seconds of all threads -> seconds of one
    chunks = [s[clock] / per for s in steps["pp"]]
    return {"pp512": CHUNK / chunks[0], "pp2048": PROMPT / sum(chunks),
            **{t: tokens / min(s[clock] / per for s in steps[t]) for t in ("tg0", "tg2048")}}


def _cpu_share(steps: dict, threads: int) -> float:
    """The share of its wall-clock time a worker's threads were running: 1 when it had its cores to itself."""
    flat = [s for group in steps.values() for s in group]
    return sum(s["cpu_seconds"] for s in flat) / (threads * sum(s["seconds"] for s in flat))


def measure_round_with(workers: dict, tg_tokens: int, threads: int, clock: str = "cpu_seconds") -> Callable[[int], Round]:
    """A round over the workers {(model, setting): Worker}, alternating them at every step: the 2048-token prompt
    chunk by chunk, then generation after it (tg2048) and from an empty cache (tg0), TG_REPS times each. `clock`:
    the figures' clock, CPU time (`cpu_seconds`) or, for a model on a GPU, the wall clock (`seconds`)."""
    def measure_round(index: int) -> Round:
        step = index  # so the first worker of a round changes from round to round too
        steps = {key: {"pp": [], "tg2048": [], "tg0": []} for key in workers}
        requests = [("pp", f"pp {chunk}") for chunk in range(PROMPT // CHUNK)]
        # tg2048 first: it starts from the prompt just decoded
        requests += [(test, f"tg {depth}") for test, depth in (("tg2048", PROMPT), ("tg0", 0)) for _ in range(TG_REPS)]
        for group, request in requests:
            for key in _order(step):
                steps[key][group].append(workers[key].request(request))
            step += 1
        out: Round = {who: {} for who in MODELS}
        for (who, fa), st in steps.items():
            out[who][fa] = {**_tok_s(st, tg_tokens, clock, threads),
                            "wall_tok_s": _tok_s(st, tg_tokens, "seconds", threads),
                            "cpu_share": _cpu_share(st, threads)}
        log.info("speed round %d: tg2048 %s", index + 1, ", ".join(
            f"{who} {fa} {out[who][fa]['tg2048']:.1f} (cpu share {out[who][fa]['cpu_share']:.2f})"
            for who in MODELS for fa in SETTINGS))
        return out
    return measure_round


def ab_compare(variant: str | Path, base: str | Path, rounds: int = 3, max_rounds: int = 6,
               tolerance: float = 0.1, threads: Optional[int] = None, tg_tokens: int = TG_TOKENS,
               gpu_layers: int = 0) -> dict:
    """Variant against base in both flash-attention settings: fastest tok/s, speed-ups with spreads, memory.
    `gpu_layers`: llama.cpp's n_gpu_layers for both (-1: every layer); on a GPU the figures are wall-clock."""
    from .device import gpu_offload_supported

    threads = threads or default_threads()
    on_gpu = gpu_layers != 0 and gpu_offload_supported()  # a CPU build ignores n_gpu_layers: still a CPU measurement
    clock = "seconds" if on_gpu else "cpu_seconds"
    paths = {"variant": variant, "base": base}
    with ExitStack() as stack:
        workers = {(who, fa): Worker(paths[who], fa == "fa_on", threads, tg_tokens, stack, gpu_layers)
                   for who in MODELS for fa in SETTINGS}
        ready = {key: w.reply() for key, w in workers.items()}  # all four load side by side
        runs, summary = adaptive_rounds(measure_round_with(workers, tg_tokens, threads, clock), rounds, max_rounds,
                                        tolerance)
        stats = {key: w.request("stats") for key, w in workers.items()}
    memory = {who: {fa: {"kv_cache_bytes": ready[who, fa]["kv_cache_bytes"],
                         "kv_cache_device": ready[who, fa].get("kv_cache_device"),
                         "buffers": ready[who, fa].get("buffers"),
                         "peak_rss_bytes": stats[who, fa]["peak_rss_bytes"]} for fa in SETTINGS} for who in MODELS}
    files = {who: os.path.getsize(paths[who]) for who in MODELS}
    return speed_result(runs, summary, memory, files, threads=threads, tg_tokens=tg_tokens,
                        min_rounds=rounds, max_rounds=max_rounds, tolerance=tolerance, gpu_layers=gpu_layers,
                        clock="wall" if on_gpu else "cpu")


def speed_result(runs: list[Round], summary: dict, memory: dict, file_bytes: dict, **settings) -> dict:
    """The speed section of details.json, which metrics and plots read."""
    shares = [r[who][fa]["cpu_share"] for r in runs for who in MODELS for fa in SETTINGS]
    return {**settings, "n_ctx": SPEED_CTX, "rounds": summary["rounds"], "noisy": summary["noisy"],
            "cpu_share": statistics.median(shares),
            "fastest": summary["fastest"], "best_setting": summary["best_setting"], "speedup": summary["speedup"],
            "memory": memory, "file_bytes": file_bytes, "runs": runs}


# --- inside a worker ------------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries that over exec from the forking
    parent, so a child of a large process would report the parent's size. VmHWM starts anew at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(fn, *args, sync=None) -> dict:
    """Wall-clock and CPU seconds (all of this process's threads) of one call; `sync` waits for work the call
    left running on a device (a GPU's queue), so that it is counted."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    if sync is not None:
        sync()
    return {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}


BUFFER_LINE = re.compile(r"(model|KV|compute) buffer size = +([0-9.]+) MiB")


def buffers_from_log(text: str) -> dict:
    """MiB of llama.cpp's model, KV and compute buffers per device from its log of loading a model and creating a
    context, e.g. {"model": {"CUDA0": 8145.3, "CPU_Mapped": 532.0}, "KV": {"CUDA0": 512.0}, "compute": {...}}."""
    out: dict = {}
    for line in text.splitlines():
        m = BUFFER_LINE.search(line)
        if m:
            device = line[:m.start()].split(":")[-1].strip() or "?"
            kind = out.setdefault(m.group(1), {})
            kind[device] = round(kind.get(device, 0.0) + float(m.group(2)), 2)
    return out


class Bench:
    """One llama.cpp context and the tests run in it; `valid` = how many prompt tokens the KV cache holds."""

    def __init__(self, model_path: str, flash_attn: bool, threads: int, tg_tokens: int, gpu_layers: int = 0):
        import random

        import llama_cpp
        from llama_cpp import Llama

        from dropquant.gguf.quantize import kv_cache_mib_from_log, llama_log_capture

        from .device import gpu_offload_supported

        with llama_log_capture() as lines:
            self.llama = Llama(model_path=model_path, n_ctx=SPEED_CTX, n_batch=CHUNK, n_ubatch=CHUNK,
                               logits_all=False, flash_attn=flash_attn, n_threads=threads, n_threads_batch=threads,
                               verbose=False, seed=0, n_gpu_layers=gpu_layers)
        log_text = "".join(lines)
        kv = kv_cache_mib_from_log(log_text)
        self.kv_cache_bytes = int(round(kv * 2**20)) if kv is not None else None
        self.buffers = buffers_from_log(log_text)
        self.kv_cache_device = sorted(self.buffers.get("KV", {})) or None
        # llama_decode may return while a GPU still computes: the times wait for it. (On the CPU it has finished.)
        ctx = self.llama._ctx.ctx
        self.sync = (lambda: llama_cpp.llama_synchronize(ctx)) if gpu_layers and gpu_offload_supported() else None
        rng = random.Random(0)
        vocab = self.llama.n_vocab()
        self.prompt = [rng.randrange(vocab) for _ in range(PROMPT)]
        self.gen = [rng.randrange(vocab) for _ in range(tg_tokens)]
        self.valid = 0
        self.pp(0)  # warm-up: first-call allocations and page faults of the mapped weights
        self.tg(0)

    def pp(self, chunk: int) -> dict:
        """Times of decoding prompt chunk `chunk` on top of the chunks before it (decoded untimed if missing)."""
        start = chunk * CHUNK
        if self.valid < start:
            self.pp(chunk - 1)
        self.llama.n_tokens = start  # eval drops the cache beyond this position
        times = _timed(self.llama.eval, self.prompt[start:start + CHUNK], sync=self.sync)
        self.valid = start + CHUNK
        return times

    def tg(self, depth: int) -> dict:
        """Times of generating the tokens, one decode each, after `depth` prompt tokens."""
        while self.valid < depth:  # untimed: fill the cache up to the depth the generation starts from
            self.pp(self.valid // CHUNK)
        self.llama.n_tokens = depth  # eval drops the cache beyond this position: the last repetition's tokens
        times = _timed(lambda: [self.llama.eval([tok]) for tok in self.gen], sync=self.sync)
        self.valid = depth
        return times


def serve(bench: Bench, requests, reply) -> None:
    """Answer `pp CHUNK`, `tg DEPTH` and `stats` lines, one JSON line each, until the requests end."""
    reply({"kv_cache_bytes": bench.kv_cache_bytes, "kv_cache_device": bench.kv_cache_device, "buffers": bench.buffers,
           "n_gpu_layers": int(bench.llama.model_params.n_gpu_layers)})
    for line in requests:
        kind, *arg = line.split()
        if kind == "stats":
            reply({"peak_rss_bytes": peak_rss_bytes()})
        else:
            reply((bench.pp if kind == "pp" else bench.tg)(int(arg[0])))


def worker_main(args) -> int:
    # The replies get this process's stdout to themselves; anything llama.cpp prints goes to stderr.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    bench = Bench(args.worker, args.flash_attn == "on", args.threads, args.tg_tokens, args.gpu_layers)
    serve(bench, sys.stdin, lambda obj: replies.write(json.dumps(obj) + "\n"))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="a speed worker: one GGUF in one flash-attention setting, "
                                                 "answering test requests on stdin with JSON lines")
    parser.add_argument("--worker", required=True, metavar="MODEL")
    parser.add_argument("--flash-attn", choices=("on", "off"), default="on")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--tg-tokens", type=int, default=TG_TOKENS)
    parser.add_argument("--gpu-layers", type=int, default=0, help="llama.cpp's n_gpu_layers (-1: every layer)")
    return worker_main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
