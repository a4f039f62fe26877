"""Heal a pruned model with no parameter added: the kept projection before each cut refitted to stand in for it.

The decoder is a chain of sublayers (attention 0, MLP 0, attention 1, ...), each adding its output to the
residual stream. A *cut* is a maximal run of dropped sublayers; its *host* is the kept sublayer just before it.
With P the residual stream before the host and Y the unpruned model's stream after the cut, the host's last
projection (`down_proj` of an MLP, `o_proj` of an attention) is refitted so that P + host(P) ≈ Y: the host
now also does the cut's work. Two forms (`heal.form`):

- `map` (ReplaceMe, arXiv 2505.02819, generalized from whole blocks to any run of sublayers): the host's
  output H times T (hidden x hidden), folded into the projection as `weight ← Tᵀ·weight` (and its bias);
- `projection` (default): the whole projection refitted from its own input (the MLP's intermediate
  activations, the attention's heads), which carry more of what the cut computed than H does; the map's
  solutions are among its solutions.

Either way the healed checkpoint has the pruned checkpoint's layout and parameter count: a healed block drop is
still a plain `llama`/`qwen2`/`qwen3` model, a healed attention drop the same `deci` file as the plain drop.
The fit is ridge least squares pulled towards the plain drop's weights (`heal.merged_ridge`), each token's error
relative to the norm of its residual stream (`heal.weigh: relative`) so that an attention sink's massive
activations do not make the whole fit; `heal.objective: cosine` then refines it by Adam on ReplaceMe's per-token
cosine distance over the cut's cached activations (no backpropagation through the model). Fits run in model
order through the one layer-wise runner; with `fit_on: healed` P and the host's input come from the healed
model (each fit also absorbs the drift of the cuts before it), with `fit_on: base` from the unpruned model.

A cut that starts at the first attention has no host: `heal.fallback: linear` gives its dropped attentions
(and blocks) `linear`'s stand-ins (a `deci` linear-attention layer), `none` leaves it as the plain drop.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from dropquant.errors import DropquantError
from dropquant.heal.linear import LinearFit, _Normal

log = logging.getLogger(__name__)

ATTN, MLP = "attn", "mlp"


# --- cuts and hosts -------------------------------------------------------------------------------------------

def sublayer(s: int) -> tuple[int, str]:
    """(layer, "attn" | "mlp") of sublayer index s (2·layer for the attention, 2·layer + 1 for the MLP)."""
    return s // 2, (ATTN if s % 2 == 0 else MLP)


def sublayer_name(s: int) -> str:
    i, part = sublayer(s)
    return f"{part} {i}"


@dataclass(frozen=True)
class Cut:
    start: int  # first dropped sublayer
    end: int  # last dropped sublayer (inclusive)

    @property
    def host(self) -> Optional[int]:
        return self.start - 1 if self.start > 0 else None

    def describe(self) -> str:
        span = sublayer_name(self.start) if self.start == self.end else \
            f"{sublayer_name(self.start)} .. {sublayer_name(self.end)}"
        return span if self.host is None else f"{span} into {sublayer_name(self.host)}"


def dropped_sublayers(plan) -> set[int]:
    attn = set(plan.attn) | set(plan.blocks)
    mlp = set(plan.mlp) | set(plan.blocks)
    return {2 * i for i in attn} | {2 * i + 1 for i in mlp}


def plan_cuts(plan) -> list[Cut]:
    """The maximal runs of consecutive dropped sublayers, in model order."""
    cuts, run = [], []
    for s in sorted(dropped_sublayers(plan)):
        if run and s != run[-1] + 1:
            cuts.append(Cut(run[0], run[-1]))
            run = []
        run.append(s)
    if run:
        cuts.append(Cut(run[0], run[-1]))
    return cuts


def fallback_layers(plan) -> list[int]:
    """Layers whose attention is dropped in a cut with no host (it starts at layer 0's attention)."""
    cuts = plan_cuts(plan)
    if not cuts or cuts[0].host is not None:
        return []
    return sorted({sublayer(s)[0] for s in range(cuts[0].start, cuts[0].end + 1) if s % 2 == 0})


# --- the fit -------------------------------------------------------------------------------------------------

@dataclass
class MergedFit:
    """The fitted X by host sublayer (`map`: T [hidden, hidden], applied as H·T; `projection`: the host
    projection's new weightᵀ [its input width, hidden]), and any fallback stand-ins."""

    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    explained: dict[int, float] = field(default_factory=dict)  # share of the cut's target energy the fit reproduces
    plain: dict[int, float] = field(default_factory=dict)  # the same share for the plain drop's weights
    cuts: list[Cut] = field(default_factory=list)
    form: str = "map"  # map: T applied to the host's output; projection: the host's last projection refitted
    standins: LinearFit = field(default_factory=LinearFit)
    tokens: int = 0
    seconds: float = 0.0

    def folded(self) -> dict[tuple[int, str], tuple[str, torch.Tensor]]:
        """(form, fitted X) by (original layer, "attn" | "mlp") of their host."""
        return {sublayer(s): (self.form, t) for s, t in self.maps.items()}


def _attn_out(layer, x, kw):
    return layer.self_attn(hidden_states=layer.input_layernorm(x), **kw)[0]


def _mlp_out(layer, x, kw):
    return layer.mlp(layer.post_attention_layernorm(x))


_OUT = {ATTN: _attn_out, MLP: _mlp_out}


def host_projection(layer, half: str) -> torch.nn.Linear:
    """The last projection of a host sublayer: its output is the sublayer's output."""
    return layer.self_attn.o_proj if half == ATTN else layer.mlp.down_proj


class _Ridge(_Normal):
    """Ridge least squares of R ≈ Z·X pulled towards a prior X0 (the plain drop's), from normal equations
    accumulated batch by batch: (ZᵀZ + λI)·X = ZᵀR + λ·X0, λ relative to the mean eigenvalue of ZᵀZ."""

    def __init__(self, prior: torch.Tensor):
        super().__init__(prior.shape[0], prior.device, prior.shape[1])
        self.prior = prior.double()

    def explained(self, x: torch.Tensor) -> float:
        """Share of the target's energy Z·X reproduces."""
        residual = self.yty - 2 * float((x * self.zty).sum()) + float((x * (self.ztz @ x)).sum())
        return 1.0 - residual / self.yty if self.yty > 0 else 1.0

    def solve_towards_prior(self, ridge: float, what: str) -> torch.Tensor:
        n = self.ztz.shape[0]
        eye = torch.eye(n, dtype=self.ztz.dtype, device=self.ztz.device)
        lam = ridge * float(torch.trace(self.ztz)) / n
        try:
            return torch.linalg.solve(self.ztz + lam * eye, self.zty + lam * self.prior)
        except RuntimeError:  # a LinAlgError: singular
            raise DropquantError(f"{what}: the merged fit's least-squares system is singular (too few calibration "
                                 "tokens for its width?); set heal.ridge > 0") from None


def _cosine_refine(x: torch.Tensor, pre, z, target, bias, steps: int, lr: float, seed: int) -> torch.Tensor:
    """Adam on mean(1 - cos(P + Z·X + b, Y)) over the cut's tokens, from `x`; float32, minibatches of 2048
    tokens."""
    pre, z, target = (a.reshape(-1, a.shape[-1]) for a in (pre, z, target))
    gen = torch.Generator().manual_seed(seed)
    n = pre.shape[0]
    # The fit runs under inference mode; the map's own small optimisation needs autograd.
    with torch.inference_mode(False), torch.enable_grad():
        x = x.float().clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        for _ in range(steps):
            idx = torch.randint(0, n, (min(2048, n),), generator=gen)
            p, h, y = (a[idx].to(x.device, torch.float32).clone() for a in (pre, z, target))
            loss = (1 - torch.nn.functional.cosine_similarity(p + h @ x + bias, y, dim=-1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return x.detach().double()


@torch.inference_mode()
def fit_merged(stack, plan, input_ids: torch.Tensor, *, ridge: float, fit_on: str = "base", form: str = "projection",
               weigh: str = "relative", objective: str = "ls", fallback: str = "linear", standin_ridge: float = 1e-3,
               cosine_steps: int = 200, cosine_lr: float = 1e-4, seed: int = 0, batch_size: int = 2,
               progress: bool = True, scratch=None) -> MergedFit:
    """Fit a map for every cut of `plan` with a host (and stand-ins for a hostless one, per `fallback`) on
    `input_ids`, `stack` being the unpruned model. `form`: `map`, T (hidden x hidden) applied to the host's
    output; `projection`, the host's whole last projection refitted (its input width x hidden, ridge towards
    the original weight)."""
    from dropquant.model.layerwise import HiddenStates, walk_layers

    if plan.num_layers != len(stack.layers):
        raise DropquantError(f"the drop plan is for a {plan.num_layers}-layer model, the model has "
                             f"{len(stack.layers)} layers")
    fit = MergedFit(cuts=plan_cuts(plan), form=form)
    dropped = dropped_sublayers(plan)
    closing = {c.end: c for c in fit.cuts if c.host is not None}
    hosts = {c.host for c in fit.cuts if c.host is not None}
    standin_at = set(fallback_layers(plan)) if fallback == "linear" else set()
    healed = fit_on == "healed"
    fit_stream = "healed" if healed else "pre"  # the healed stream stays before the host until its cut closes
    hidden = int(stack.config.hidden_size)
    start = time.perf_counter()
    open_cut: dict = {}  # the host's projection (weight, bias) and its inputs, while its cut is open

    def visit(i: int, layer, lp) -> None:
        for s in (2 * i, 2 * i + 1):
            half = sublayer(s)[1]
            out = _OUT[half]
            cut = closing.get(s)
            standin = _Normal(hidden, lp.device) if s == 2 * i and i in standin_at else None
            if s in hosts:
                proj = host_projection(layer, half)
                width = proj.in_features if form == "projection" else hidden
                open_cut["weight"] = proj.weight.detach().double().clone()
                open_cut["bias"] = None if proj.bias is None else proj.bias.detach().double().clone()
                open_cut["z"] = HiddenStates((*input_ids.shape, width), stack.dtype, scratch)
                seen = {}
                hook = proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("z", args[0]))
            for sl, kw in lp.batches():
                xb = lp.read("base", sl)
                yb = xb + out(layer, xb, kw)
                if s in hosts:
                    x = lp.read("healed", sl) if healed else xb
                    h = out(layer, x, kw)
                    open_cut["z"].data[sl] = (seen["z"] if form == "projection" else h).to("cpu", stack.dtype)
                    if not healed:
                        lp.write("pre", sl, xb)
                elif s not in dropped and healed:
                    xh = lp.read("healed", sl)
                    lp.write("healed", sl, xh + out(layer, xh, kw))
                if standin is not None:
                    # A stand-in replaces the attention, and the MLP too when the cut drops it (a block).
                    target = yb if s + 1 not in dropped else yb + _mlp_out(layer, yb, kw)
                    x = lp.read("healed", sl) if healed else xb
                    standin.add(layer.input_layernorm(x), target - x)
                lp.write("base", sl, yb)
            if s in hosts:
                hook.remove()
            if standin is not None:
                _close_standin(i, layer, lp, standin, fit, standin_ridge, healed)
            if cut is not None:
                _close_cut(cut, lp, open_cut, fit, fit_stream, ridge, objective, weigh == "relative", cosine_steps,
                           cosine_lr, seed)

    streams = ("base", "healed" if healed else "pre")
    try:
        fit.tokens = walk_layers(stack, input_ids, visit, streams, batch_size, progress, "fitting merged maps",
                                 scratch)
    finally:
        if "z" in open_cut:
            open_cut["z"].close()
    fit.seconds = time.perf_counter() - start
    return fit


def _close_standin(i: int, layer, lp, normal: _Normal, fit: MergedFit, ridge: float, healed: bool) -> None:
    """Solve a hostless cut's stand-in at layer i and move the healed stream past it."""
    w, explained = normal.solve(ridge, i)
    norm = layer.input_layernorm
    fit.standins.weights[i] = w.to("cpu", torch.float32)
    fit.standins.norms[i] = norm.weight.detach().to("cpu", torch.float32).clone()
    fit.standins.explained[i] = explained
    log.info("layer %d: its cut has no kept sublayer before it; a linear stand-in (heal.fallback=linear) explains "
             "%.1f%% of what it replaces", i, 100 * explained)
    if healed:
        w = w.to(norm.weight.dtype)
        for sl, _ in lp.batches():
            x = lp.read("healed", sl)
            lp.write("healed", sl, x + norm(x) @ w.T)


def _close_cut(cut: Cut, lp, open_cut: dict, fit: MergedFit, fit_stream: str, ridge: float, objective: str,
               relative: bool, steps: int, lr: float, seed: int) -> None:
    """Solve the map of `cut` at its last dropped sublayer, when the base stream holds its target; then move the
    healed stream past the cut."""
    weight, bias, zs = open_cut.pop("weight"), open_cut.pop("bias"), open_cut.pop("z")
    device = lp.device
    try:
        if fit.form == "projection":  # Z·X + b with X = Wᵀ (in x out): the plain drop keeps X = Wᵀ
            prior, b = weight.T.contiguous(), bias
        else:  # H·X with H = the host's output: the plain drop is X = I
            prior, b = torch.eye(weight.shape[0], dtype=torch.float64), None
        normal = _Ridge(prior.to(device))
        for sl, _ in lp.batches():
            y = lp.read("base", sl).float()
            r = y - lp.read(fit_stream, sl).float()
            if b is not None:
                r = r - b.to(device).float()
            z = zs.data[sl].to(device).float()
            if relative:
                # Each token's error relative to its residual stream's norm, as the next norm layer sees it: the
                # attention sink's massive activations (norms 100x the others) would otherwise be the whole fit.
                w = 1.0 / y.norm(dim=-1, keepdim=True).clamp_min(1e-6)
                z, r = z * w, r * w
            normal.add(z, r)
        x = normal.solve_towards_prior(ridge, cut.describe())
        explained, plain = normal.explained(x), normal.explained(normal.prior)
        if objective == "cosine":
            x = _cosine_refine(x, lp.states[fit_stream].data, zs.data, lp.states["base"].data,
                               0.0 if b is None else b.float().to(x.device), steps, lr, seed).to(device)
        fit.maps[cut.host] = x.to("cpu", torch.float32)
        fit.explained[cut.host], fit.plain[cut.host] = explained, plain
        log.info("%s: the merged fit explains %.1f%% of the cut's target (%.1f%% left as the plain drop)",
                 cut.describe(), 100 * explained, 100 * plain)
        if fit_stream == "healed":
            xt = x.to(device, lp.stack.dtype)
            for sl, _ in lp.batches():
                h = zs.data[sl].to(device) @ xt
                if b is not None:
                    h = h + b.to(device, lp.stack.dtype)
                lp.write("healed", sl, lp.read("healed", sl) + h)
    finally:
        zs.close()


def merged_parameters_changed(fit: MergedFit) -> int:
    """Weights the heal rewrote (none added, apart from fallback stand-ins)."""
    return sum(t.numel() for t in fit.maps.values())
