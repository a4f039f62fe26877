"""A mixed-precision GGUF: every tensor at its own llama.cpp type, chosen to meet a size target at the lowest
estimated KL divergence (quantize.type: mix).

Mechanism: the source GGUF is quantized by llama.cpp's own quantizer once per candidate type with `pure` set
(every tensor at that type, llama.cpp's fallback applied where a row is not a multiple of the type's block),
and the mixed file is spliced together from those files with gguf-py. Each tensor's bytes are exactly what
llama.cpp wrote for it at its type, so the file is what `llama-quantize --tensor-type` would write for the same
assignment, and stock llama.cpp loads it. The costs the allocation trades against bytes come from
`dropquant.gguf.mix_cost`.
"""
from __future__ import annotations

import heapq
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from dropquant.errors import DropquantError

log = logging.getLogger(__name__)

MIX = "mix"
MIX_BY = ("sensitivity", "importance")
DEFAULT_MIX_TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "IQ4_NL", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0")
# Tensor types a mix may use -> the llama.cpp file type whose `pure` quantization writes every tensor at it.
PURE_FTYPES = {
    "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K": "Q5_K_M", "Q5_1": "Q5_1",
    "Q5_0": "Q5_0", "Q4_K": "Q4_K_M", "Q4_1": "Q4_1", "Q4_0": "Q4_0", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
    "Q3_K": "Q3_K_M", "IQ3_S": "IQ3_S", "IQ3_XXS": "IQ3_XXS", "Q2_K": "Q2_K", "IQ2_S": "IQ2_S",
    "IQ2_XS": "IQ2_XS", "IQ2_XXS": "IQ2_XXS",
}
MIX_NEEDS_IMATRIX = ("IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS")
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}


@dataclass(frozen=True)
class Target:
    """A file size in bytes, or bits per weight (tensor bytes x 8 / elements, as llama.cpp prints BPW)."""

    kind: str     # "bytes" | "bpw"
    value: float
    text: str

    def __str__(self) -> str:
        return self.text


def parse_target(text) -> Target:
    """'93.5MB' (MB = 10^6 bytes; also B, KB, GB, KiB, MiB, GiB) or '4.6bpw'."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or (unit != "bpw" and unit not in _UNITS) or float(m.group(1)) <= 0:
        raise DropquantError(f"quantize.target={text!r}: expected a file size such as '93.5MB' (MB = 10^6 bytes; "
                             "also KB, GB, KiB, MiB, GiB) or bits per weight such as '4.6bpw'")
    if unit == "bpw":
        return Target("bpw", float(m.group(1)), str(text).strip())
    return Target("bytes", float(m.group(1)) * _UNITS[unit], str(text).strip())


# A quant axis value of a sweep or search: a llama.cpp type, or a mix at a target ("mix:4.8bpw").
AXIS_PREFIX = "mix:"


def axis_target(q: str) -> Optional[str]:
    """The target of a mix axis value, None for a llama.cpp type."""
    return q[len(AXIS_PREFIX):] if q.startswith(AXIS_PREFIX) else None


def axis_overrides(q: str) -> list[str]:
    """A quant axis value as params overrides (quantize.target cleared for a plain type)."""
    t = axis_target(q)
    return ["quantize.type=mix", f"quantize.target={t}"] if t is not None else [f"quantize.type={q}",
                                                                                 "quantize.target=null"]


def axis_label(q: str) -> str:
    """A quant axis value as it appears in an experiment name (git-ref safe): mix:4.8bpw -> mix-4.8bpw."""
    return q.replace(":", "-")


def check_axis(values: Sequence[str], types: Sequence[str], what: str) -> None:
    """Quant axis values: llama.cpp types or mix:<target>, refused by name."""
    for q in values:
        t = axis_target(q)
        if t is not None:
            parse_target(t)
        elif q not in types:
            raise DropquantError(f"{what}: unknown quant type {q!r} (allowed: {', '.join(types)}, or mix:<target> "
                                 "such as mix:4.8bpw or mix:90MB)")


def check_mix_types(types: Sequence[str], imatrix: bool) -> None:
    """Unknown types by name, and types llama.cpp cannot write without an importance matrix, refused."""
    unknown = [t for t in types if t not in PURE_FTYPES]
    if unknown:
        raise DropquantError(f"quantize.mix_types: unknown type(s) {', '.join(unknown)} (allowed: "
                             f"{', '.join(PURE_FTYPES)})")
    if not types:
        raise DropquantError("quantize.mix_types is empty: list the tensor types the mix may use")
    needs = [t for t in types if t in MIX_NEEDS_IMATRIX]
    if needs and not imatrix:
        raise DropquantError(f"quantize.mix_types {', '.join(needs)} need an importance matrix: set "
                             "quantize.imatrix: true or remove them")


# --- the candidates: one pure llama.cpp quantization per type ------------------------------------------

@dataclass
class Option:
    """One way to store a tensor: the GGML type llama.cpp wrote (after its fallback) and its bytes."""

    type: str
    nbytes: int
    source: Path            # a candidate file holding the tensor at this type
    requested: list[str] = field(default_factory=list)  # the candidate types that gave it


@dataclass
class Slot:
    """A tensor of the file and the ways the candidates store it (one way only: norms, biases)."""

    name: str
    shape: tuple[int, ...]   # GGUF order (ne0 first)
    n_elements: int
    options: dict[str, Option]

    @property
    def fixed(self) -> bool:
        return len(self.options) == 1


@dataclass
class Candidates:
    """The per-type pure files of one source GGUF, read into a table of every tensor's options."""

    files: dict[str, Path]         # requested type -> pure file
    slots: list[Slot]              # in file order
    alignment: int
    header_bytes: int              # metadata and tensor index: the same in every candidate

    def __post_init__(self):
        self._by_name = {s.name: s for s in self.slots}

    def slot(self, name: str) -> Slot:
        return self._by_name[name]

    def padded(self, nbytes: int) -> int:
        return -(-nbytes // self.alignment) * self.alignment

    def file_bytes(self, assignment: Mapping[str, str]) -> int:
        return self.header_bytes + sum(self.padded(s.options[assignment[s.name]].nbytes) for s in self.slots)

    def tensor_bytes(self, assignment: Mapping[str, str]) -> int:
        return sum(s.options[assignment[s.name]].nbytes for s in self.slots)

    @property
    def n_elements(self) -> int:
        return sum(s.n_elements for s in self.slots)

    def bpw(self, assignment: Mapping[str, str]) -> float:
        return self.tensor_bytes(assignment) * 8 / self.n_elements

    def extreme(self, pick) -> dict[str, str]:
        """The assignment taking, for every tensor, the option `pick` (min or max) chooses by bytes."""
        return {s.name: pick(s.options.values(), key=lambda o: (o.nbytes, o.type)).type for s in self.slots}

    def budget(self, target: Target) -> int:
        """The target as a bound on padded tensor bytes (what the allocation spends)."""
        if target.kind == "bytes":
            return int(target.value) - self.header_bytes
        # bpw counts unpadded bytes; padding adds at most alignment-1 per tensor, charged up front.
        return int(target.value * self.n_elements / 8)

    def meets(self, assignment: Mapping[str, str], target: Target) -> bool:
        if target.kind == "bytes":
            return self.file_bytes(assignment) <= target.value
        return self.bpw(assignment) <= target.value + 1e-9

    def reachable(self) -> tuple[float, float]:
        lo, hi = self.extreme(min), self.extreme(max)
        return self.file_bytes(lo), self.file_bytes(hi)

    def check_target(self, target: Target) -> None:
        """A target outside what the listed types can reach, refused with the reachable range."""
        lo, hi = self.extreme(min), self.extreme(max)
        if target.kind == "bytes":
            a, b, have = self.file_bytes(lo), self.file_bytes(hi), target.value
            show = lambda v: f"{v / 1e6:.2f} MB"  # noqa: E731
        else:
            a, b, have = self.bpw(lo), self.bpw(hi), target.value
            show = lambda v: f"{v:.3f} bpw"  # noqa: E731
        if not a <= have <= b:
            raise DropquantError(f"quantize.target={target}: out of reach with quantize.mix_types on this model; "
                                 f"the reachable range is {show(a)} (every tensor at its smallest type) to "
                                 f"{show(b)} (every tensor at its largest)")


def quantize_candidates(src: str | Path, types: Sequence[str], out_dir: Path,
                        imatrix: Optional[Mapping[str, np.ndarray]] = None, nthread: int = 0) -> Candidates:
    """Quantize `src` once per type with llama.cpp (`pure`: no per-tensor recipe) and read the options."""
    from tqdm import tqdm

    from dropquant.gguf.quantize import quantize_gguf

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for t in tqdm(list(dict.fromkeys(types)), desc="mix: pure quantizations", unit="type"):
        files[t] = out_dir / f"pure-{t}.gguf"
        quantize_gguf(src, files[t], PURE_FTYPES[t], imatrix=imatrix, nthread=nthread, pure=True)
    return read_candidates(files)


def read_candidates(files: Mapping[str, Path]) -> Candidates:
    slots: dict[str, Slot] = {}
    order: list[str] = []
    header = alignment = None
    for requested, path in files.items():
        entries, _, align = _table(Path(path))
        names = list(entries)
        if order and names != order:
            raise DropquantError(f"{path}: its tensors differ from the other candidates' (not the same source?)")
        order = names
        padded = sum(-(-t.n_bytes // align) * align for t in entries.values())
        h = Path(path).stat().st_size - padded
        if header is not None and (h != header or align != alignment):
            raise DropquantError(f"{path}: header of {h} bytes differs from the other candidates' {header}")
        header, alignment = h, align
        for t in entries.values():
            slot = slots.setdefault(t.name, Slot(t.name, t.dims, int(np.prod(t.dims)), {}))
            wtype = _type_name(t.type)
            opt = slot.options.get(wtype)
            if opt is None:
                opt = slot.options[wtype] = Option(wtype, int(t.n_bytes), Path(path))
            opt.requested.append(requested)
    return Candidates(dict(files), [slots[n] for n in order], int(alignment), int(header))


def _type_name(ttype: int) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(ttype).name


_TABLES: dict[Path, tuple] = {}


def _table(path: Path) -> tuple[dict, int, int]:
    """A file's tensor entries by name, data start and alignment, read once (header.py: no GGUFReader, which
    parses every tokenizer string of every candidate)."""
    from dropquant.gguf.header import tensor_index

    key = Path(path)
    if key not in _TABLES:
        entries, start, align = tensor_index(key)
        _TABLES[key] = ({t.name: t for t in entries}, start, align,
                        np.memmap(key, dtype=np.uint8, mode="r"))
    entries, start, align, _ = _TABLES[key]
    return entries, start, align


def tensor_data(path: Path, name: str) -> tuple[np.ndarray, int]:
    """A tensor's raw bytes as stored (memory-mapped), shaped as gguf-py's writer takes them: the GGUF dims
    reversed with the last one in bytes; and its GGML type number."""
    entries, start, _ = _table(path)
    t = entries[name]
    raw = _TABLES[Path(path)][3][start + t.offset:start + t.offset + t.n_bytes]
    if len(t.dims) == 1:
        return raw, t.type
    rows = int(np.prod(t.dims[1:]))
    return raw.reshape(*t.dims[:0:-1], t.n_bytes // rows), t.type


def dequantized(cands: Candidates, name: str, wtype: str) -> np.ndarray:
    """The float32 values llama.cpp computes with for tensor `name` stored as `wtype`, [rows, columns]."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    opt = cands.slot(name).options[wtype]
    raw, ttype = tensor_data(opt.source, name)
    values = np.asarray(dequantize(raw, GGMLQuantizationType(ttype)), dtype=np.float32)
    return values.reshape(-1, values.shape[-1])


def close_readers() -> None:
    _TABLES.clear()


# --- the allocation --------------------------------------------------------------------------------

def allocate(cands: Candidates, costs: Mapping[str, Mapping[str, float]], target: Target) -> dict[str, str]:
    """The type of every tensor: the lowest total cost within the target (multiple-choice knapsack).

    Greedy on cost saved per byte along each tensor's convex hull of (bytes, cost) options, starting from every
    tensor at its smallest option, then one pass that spends what is left on any single better option.
    Deterministic: ties are broken by tensor name and type. Costs are clipped at zero.
    """
    cands.check_target(target)
    budget = cands.budget(target)
    pad = cands.padded

    def cost(slot: Slot, t: str) -> float:
        return max(float(costs.get(slot.name, {}).get(t, 0.0)), 0.0)

    assign, spent = {}, 0
    hulls: dict[str, list[tuple[int, float, str]]] = {}
    for s in cands.slots:
        opts = sorted(((pad(o.nbytes), cost(s, o.type), o.type) for o in s.options.values()),
                      key=lambda x: (x[0], x[1], x[2]))
        # Options that cost more bytes and save nothing are never worth taking.
        frontier = []
        for o in opts:
            if not frontier or o[1] < frontier[-1][1]:
                frontier.append(o)
        hull = [frontier[0]]
        for o in frontier[1:]:
            while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], o):
                hull.pop()
            hull.append(o)
        hulls[s.name] = hull
        assign[s.name] = hull[0][2]
        spent += hull[0][0]
    if spent > budget:  # the smallest options' padding can exceed a bpw budget set right at their size
        return assign
    heap = [(-_slope(h[0], h[1]), name, 1) for name, h in hulls.items() if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, name, k = heapq.heappop(heap)
        hull = hulls[name]
        extra = hull[k][0] - hull[k - 1][0]
        if spent + extra > budget:
            continue  # this tensor's later steps are larger still
        spent += extra
        assign[name] = hull[k][2]
        if k + 1 < len(hull):
            heapq.heappush(heap, (-_slope(hull[k], hull[k + 1]), name, k + 1))
    # Whatever is left: the single best improvement that fits, repeatedly.
    while True:
        best = None
        for s in cands.slots:
            cur = s.options[assign[s.name]]
            c0 = cost(s, cur.type)
            for o in s.options.values():
                extra = pad(o.nbytes) - pad(cur.nbytes)
                gain = c0 - cost(s, o.type)
                if gain > 0 and spent + extra <= budget:
                    key = (gain, -extra, s.name, o.type)
                    if best is None or key > best[0]:
                        best = (key, s.name, o.type, extra)
        if best is None:
            break
        _, name, t, extra = best
        assign[name], spent = t, spent + extra
    return assign


def _slope(a: tuple[int, float, str], b: tuple[int, float, str]) -> float:
    """Cost saved per byte going from option a to the larger option b."""
    return (a[1] - b[1]) / max(b[0] - a[0], 1)


# --- the file ----------------------------------------------------------------------------------------

def write_mix(cands: Candidates, assignment: Mapping[str, str], out: str | Path) -> None:
    """Splice the assigned tensors out of the candidate files into `out` (metadata from the first candidate,
    general.file_type set to the type holding the most bytes)."""
    import gguf

    from dropquant.atomic import atomic_path
    from dropquant.gguf.header import read_metadata
    from dropquant.gguf.quantize import llama_ftype

    first = next(iter(cands.files.values()))
    fields = read_metadata(first)
    arch = fields["general.architecture"][0]
    by_bytes = Counter()
    for s in cands.slots:
        o = s.options[assignment[s.name]]
        if not s.fixed:
            by_bytes[o.type] += o.nbytes
    main = by_bytes.most_common(1)[0][0] if by_bytes else None
    ftype = llama_ftype(PURE_FTYPES[main]) if main in PURE_FTYPES else None
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        try:
            for key, (value, vtype, subtype) in fields.items():
                if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
                    continue
                if key == "general.file_type" and ftype is not None:
                    value = ftype
                if subtype is None:
                    w.add_key_value(key, value, gguf.GGUFValueType(vtype))
                else:
                    w.add_key_value(key, value, gguf.GGUFValueType(vtype), sub_type=gguf.GGUFValueType(subtype))
            if cands.alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
                w.add_custom_alignment(cands.alignment)
            for s in cands.slots:
                raw, ttype = tensor_data(s.options[assignment[s.name]].source, s.name)
                w.add_tensor(s.name, raw, raw_dtype=gguf.GGMLQuantizationType(ttype))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file(progress=False)
        finally:
            w.close()
    got, want = Path(out).stat().st_size, cands.file_bytes(assignment)
    if got != want:
        raise DropquantError(f"{out}: the mixed file has {got} bytes, {want} were planned (gguf-py layout changed?)")


# --- what the manifest, metrics and heatmap show -----------------------------------------------------

_GROUP = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")


def summarize(cands: Candidates, assignment: Mapping[str, str], costs: Mapping[str, Mapping[str, float]],
              target: Target, by: str) -> dict:
    """The assignment with each tensor's bytes and estimated cost, and the totals."""
    tensors = {}
    for s in cands.slots:
        if s.fixed:
            continue
        t = assignment[s.name]
        c = costs.get(s.name, {})
        tensors[s.name] = {"type": t, "bytes": s.options[t].nbytes, "bpw": s.options[t].nbytes * 8 / s.n_elements,
                           "cost": c.get(t), "costs": {k: v for k, v in sorted(c.items())}}
    types = Counter(v["type"] for v in tensors.values())
    return {
        "target": str(target), "by": by, "types": sorted(cands.files),
        "file_bytes": cands.file_bytes(assignment), "tensor_bytes": cands.tensor_bytes(assignment),
        "bpw": round(cands.bpw(assignment), 4),
        "estimated_kl": float(sum(v["cost"] or 0.0 for v in tensors.values())),
        "tensor_counts": dict(sorted(types.items())),
        "reachable_bytes": list(cands.reachable()),
        "tensors": tensors,
    }


def layer_grid(summary: dict) -> tuple[list[str], int, dict[tuple[str, int], str], dict[str, str]]:
    """(tensor groups, block count, (group, block) -> type, other tensors -> type) for the heatmap."""
    grid, other, groups, blocks = {}, {}, [], 0
    for name, v in summary["tensors"].items():
        m = _GROUP.match(name)
        if m is None:
            other[name.removesuffix(".weight")] = v["type"]
            continue
        b, g = int(m.group(1)), m.group(2)
        grid[(g, b)] = v["type"]
        blocks = max(blocks, b + 1)
        if g not in groups:
            groups.append(g)
    order = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    groups.sort(key=lambda g: (order.index(g) if g in order else len(order), g))
    return groups, blocks, grid, other
