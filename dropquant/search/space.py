"""What a search looks through: drop methods x counts x GGUF types x heal methods, checked before any work, and
the objectives a pick can minimize."""
from __future__ import annotations

from dataclasses import dataclass, field
from dropquant.errors import DropquantError
from dropquant.gguf.mix import axis_label, axis_overrides, check_axis
from dropquant.params import HEAL_METHODS, QUANT_TYPES

METHODS = ("attn", "mlp", "block", "joint")
# objective -> (what it is, lower is better)
OBJECTIVES = {
    "size": "GGUF file size (bytes)",
    "tg": "generation time per token (estimated from the weight bytes read per token)",
    "pp": "prompt processing time per token (estimated from the multiply-adds per token)",
    "kv": "KV cache bytes per token (F16 cache)",
}


@dataclass(frozen=True, order=True)
class Candidate:
    method: str
    n: int
    quant_type: str
    heal: str = "none"

    @property
    def drop(self) -> tuple[str, int]:
        return ("none", 0) if self.n == 0 else (self.method, self.n)

    @property
    def name(self) -> str:
        """The experiment name the sweep gives the same variant (flows/plan.py's variant_name)."""
        method, n = self.drop
        q = axis_label(self.quant_type)
        base = f"none-{q}" if method == "none" else f"{method}-{n}-{q}"
        return base if self.heal == "none" else f"{base}-{self.heal.replace('+', '-')}"

    def overrides(self) -> list[str]:
        method, n = self.drop
        return [f"drop.method={method}", f"drop.n={n}", *axis_overrides(self.quant_type), f"heal.method={self.heal}"]

    def to_json(self) -> dict:
        method, n = self.drop
        return {"name": self.name, "method": method, "n": n, "quant_type": self.quant_type, "heal": self.heal}


@dataclass
class Space:
    methods: list[str]
    ns: list[int]
    quant_types: list[str]
    heals: list[str] = field(default_factory=lambda: ["none"])

    def candidates(self) -> list[Candidate]:
        """Every distinct candidate (n = 0 is the one unpruned model per quant type, unhealed)."""
        out = {Candidate("none", 0, q) for q in self.quant_types} if 0 in self.ns else set()
        for q in self.quant_types:
            for m in self.methods:
                for n in self.ns:
                    if n > 0:
                        out.update(Candidate(m, n, q, h) for h in self.heals)
        return sorted(out)

    def to_json(self) -> dict:
        return {"methods": self.methods, "n": self.ns, "quant_types": self.quant_types, "heal": self.heals}


DEFAULT_SPACE = {"methods": list(METHODS), "n": list(range(0, 17, 2)), "quant_types": ["Q8_0", "Q6_K", "Q4_K_M"],
                 "heal": ["none"]}


def space_from(methods=None, n=None, quant_types=None, heal=None) -> Space:
    """The space with DEFAULT_SPACE filling in the axes not given, checked."""
    given = {"methods": methods, "n": n, "quant_types": quant_types, "heal": heal}
    axes = {k: list(v if v is not None else DEFAULT_SPACE[k]) for k, v in given.items()}
    space = Space(axes["methods"], axes["n"], axes["quant_types"], axes["heal"])
    check_space(space)
    return space


def check_space(space: Space) -> None:
    """Refuse an unknown method, quant type or heal method, naming it, before any work (an n too large for the
    model is refused by the drop selection, when the plans are made)."""
    from dropquant.gguf.quantize import NEEDS_IMATRIX

    def unknown(what: str, values: list, allowed) -> None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise DropquantError(f"search: unknown {what} {bad} (allowed: {', '.join(map(str, allowed))})")
        if not values:
            raise DropquantError(f"search: no {what} to search")

    unknown("drop method(s)", space.methods, METHODS)
    if not space.quant_types:
        raise DropquantError("search: no quant type(s) to search")
    check_axis(space.quant_types, QUANT_TYPES, "search")
    unknown("heal method(s)", space.heals, HEAL_METHODS)
    needs = [q for q in space.quant_types if q in NEEDS_IMATRIX]
    if needs:
        raise DropquantError(f"search: {needs} need an importance matrix, which the search does not build; "
                             "choose other quant types")
    if not space.ns or any(n < 0 for n in space.ns):
        raise DropquantError(f"search: drop counts must be whole numbers >= 0, got {space.ns}")


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise DropquantError(f"search: unknown objective '{objective}' (allowed: {', '.join(OBJECTIVES)})")
