"""Per-expert sensitivity scores. A registry keyed by method name; each returns a SensitivityResult.

- ``hutchinson``: trace of the Hessian of the calibration loss w.r.t. each expert's weights. One Rademacher probe v
  over *all* expert parameters and one Hessian-vector product give every expert's vᵀHv at once (summed over the
  expert's slice of the fused parameters). Probes stop adaptively when the median relative standard error across
  experts falls under ``tol``.
- ``fisher``: trace of the empirical Fisher, (1/N) Σ_i ‖∇_{W_e} ℓ_i‖² over calibration sequences i.
- ``frequency``: the expert's share of the layer's routed tokens (the baseline MoPEQ argues against).
- ``input-hessian``: trace of each projection's layer-wise Hessian 2XᵀX (per output row), summed over projections,
  from calibration statistics alone.
- ``weight-norm``: the published MoPEQ code's score, the Hessian trace of L = ‖W‖_F, computed in closed form:
  Σ_proj (n_proj − 1)/‖W_proj‖_F (what Hutchinson on that L estimates). Data-free; for comparison only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .calibrate import CalibrationStats
from .moe import ExpertGroup


@dataclass
class SensitivityResult:
    method: str
    scores: dict[int, list[float]]  # layer -> per-expert score
    probes: int | None = None
    rel_std_err_median: float | None = None
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"method": self.method, "scores": {str(k): v for k, v in self.scores.items()},
                "probes": self.probes, "rel_std_err_median": self.rel_std_err_median, "details": self.details}

    @classmethod
    def from_json(cls, d: dict) -> SensitivityResult:
        return cls(d["method"], {int(k): v for k, v in d["scores"].items()}, d.get("probes"),
                   d.get("rel_std_err_median"), d.get("details", {}))


@dataclass
class SensitivityContext:
    model: torch.nn.Module
    groups: list[ExpertGroup]
    stats: CalibrationStats
    samples: torch.Tensor  # calibration token windows (or an image+text data.SampleSet) for loss-based scores
    probes: int = 64
    tol: float = 0.02
    min_probes: int = 8
    seed: int = 0
    batch_size: int = 8
    should_stop: Callable[[], None] | None = None
    on_progress: Callable[[float], None] | None = None


SENSITIVITY: dict[str, Callable[[SensitivityContext], SensitivityResult]] = {}


def register(name: str):
    def deco(fn):
        SENSITIVITY[name] = fn
        return fn
    return deco


def lm_loss(model, input_ids) -> torch.Tensor:
    """Mean next-token cross-entropy (computed here so no router auxiliary loss is mixed in).

    ``input_ids``: a token tensor [b, L], or a model-input dict (``input_ids``, ``attention_mask``, ``pixel_values``,
    ``image_grid_thw``, ...) whose optional ``labels`` mark positions without loss with -100 (image+text data)."""
    if isinstance(input_ids, torch.Tensor):
        logits = model(input_ids=input_ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 input_ids[:, 1:].reshape(-1))
    from .data import IGNORE_INDEX
    from .evaluate import split_batch

    inputs, labels = split_batch(input_ids)
    logits = model(**inputs).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def _batch_targets(batch) -> int:
    from .data import num_targets

    return num_targets(batch)


class _GradThroughExperts:
    """Within the block, MoE blocks whose dispatch is decorated with ``@torch.no_grad()`` run it with autograd.

    DeepSeek-VL2's remote code (DeepseekV2MoE.moe_infer) computes the routed experts under ``torch.no_grad()`` in
    eval mode, so no gradient (and no Hessian) would reach its experts and every loss-based score would silently be
    zero. The wrapped function is the same computation; ``__wrapped__`` (set by torch's decorator) is bound in
    its place on the instance and removed afterwards."""

    def __init__(self, model, groups):
        self.blocks = []
        for g in groups:
            if g.kind != "modulelist" or "." not in g.path:
                continue
            block = model.get_submodule(g.path.rsplit(".", 1)[0])
            for name in ("moe_infer", "moe_forward", "route_tokens"):
                fn = getattr(type(block), name, None)
                if fn is not None and getattr(fn, "__wrapped__", None) is not None \
                        and _is_no_grad_wrapper(fn):
                    self.blocks.append((block, name, fn.__wrapped__))

    def __enter__(self):
        import types

        for block, name, raw in self.blocks:
            setattr(block, name, types.MethodType(raw, block))
        return self

    def __exit__(self, *exc):
        for block, name, _ in self.blocks:
            block.__dict__.pop(name, None)


def _is_no_grad_wrapper(fn) -> bool:
    """Whether ``fn`` is a function decorated with torch.no_grad()/inference_mode() (grad disabled when called)."""
    import inspect

    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        src = ""
    if re.search(r"@torch\.(no_grad|inference_mode)\(", src):
        return True
    grad_off = (torch.no_grad, torch.inference_mode)
    for cell in getattr(fn, "__closure__", None) or ():
        v = getattr(cell, "cell_contents", None)
        # torch's decorator keeps the context's factory (a bound ``clone`` of the no_grad instance) in its closure
        if isinstance(v, grad_off) or isinstance(getattr(v, "__self__", None), grad_off):
            return True
    return False


class _ExpertParams:
    """The unique parameters holding expert weights, and how to sum a same-shaped tensor per expert."""

    def __init__(self, groups: list[ExpertGroup]):
        self.groups = groups
        self.entries = []  # (group, param, expert or None)
        seen = set()
        for g in groups:
            for _, p, e in g.expert_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    self.entries.append((g, p, e))
        self.params = [p for _, p, _ in self.entries]

    def per_expert_sums(self, tensors: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        out = {g.layer: torch.zeros(g.num_experts, dtype=torch.float64) for g in self.groups}
        for (g, _, e), t in zip(self.entries, tensors):
            if e is None:  # fused [E, ...]: one sum per leading index
                out[g.layer] += t.detach().double().reshape(t.shape[0], -1).sum(dim=1).cpu()
            else:
                out[g.layer][e] += float(t.detach().double().sum())
        return out


class _RequiresGradOnly:
    """Within the block, only the given parameters require grad (saves the graph for everything else)."""

    def __init__(self, model, params):
        self.model, self.params = model, params

    def __enter__(self):
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)

    def __exit__(self, *exc):
        for p, r in self.saved:
            p.requires_grad_(r)


def _zeros_for_unused(grads, params) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _batches(samples: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [samples[i: i + batch_size] for i in range(0, samples.shape[0], batch_size)]


def hutchinson_probe(model, ep: _ExpertParams, batches: torch.Tensor | list,
                     generator: torch.Generator, should_stop=None) -> dict[int, torch.Tensor]:
    """One probe: draw Rademacher v over every expert parameter and return vᵀHv summed per expert.

    H is the Hessian of the mean calibration loss over all ``batches``; Hv is accumulated batch by batch (one
    double-backward per batch, so memory stays that of one batch) — mathematically one product per probe.
    """
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    # Batches are token tensors or model-input dicts (image+text); each is weighted by its loss targets, which
    # for equal-length token windows is the same weight as by tokens.
    total = sum(_batch_targets(b) for b in batches)
    vs = [(torch.randint(0, 2, p.shape, generator=generator, device="cpu").to(p.device, p.dtype) * 2 - 1)
          for p in ep.params]
    hvs = None
    for batch in batches:
        if should_stop is not None:  # a probe can take minutes on CPU: let a cancel land between batches
            should_stop()
        loss = lm_loss(model, batch) * (_batch_targets(batch) / total)
        # allow_unused: a ModuleList expert that no token of this batch reached is not in the graph.
        grads = _zeros_for_unused(torch.autograd.grad(loss, ep.params, create_graph=True, allow_unused=True),
                                  ep.params)
        gv = sum((g * v).sum() for g, v in zip(grads, vs))
        part = _zeros_for_unused(torch.autograd.grad(gv, ep.params, allow_unused=True), ep.params)
        hvs = list(part) if hvs is None else [a + b for a, b in zip(hvs, part)]
    return ep.per_expert_sums([v * hv for v, hv in zip(vs, hvs)])


def _median_rel_err(samples: dict[int, list[torch.Tensor]]) -> float:
    rels = []
    for per_probe in samples.values():
        x = torch.stack(per_probe)  # [k, E]
        k = x.shape[0]
        mean = x.mean(0)
        se = x.std(0, unbiased=True) / math.sqrt(k)
        rels.append(se / mean.abs().clamp(min=1e-30))
    return float(torch.cat(rels).median())


@register("hutchinson")
def hutchinson(ctx: SensitivityContext) -> SensitivityResult:
    ep = _ExpertParams(ctx.groups)
    gen = torch.Generator().manual_seed(ctx.seed)
    param = next(ctx.model.parameters())
    if isinstance(ctx.samples, torch.Tensor):
        batches = _batches(ctx.samples.to(param.device), ctx.batch_size)
    else:  # image+text SampleSet: one model-input dict per example
        from .data import iter_batches

        batches = list(iter_batches(ctx.samples, ctx.batch_size, param.device, dtype=param.dtype))
    draws: dict[int, list[torch.Tensor]] = {g.layer: [] for g in ctx.groups}
    rel = float("inf")
    k = 0
    with _RequiresGradOnly(ctx.model, ep.params), _GradThroughExperts(ctx.model, ctx.groups):
        for k in range(1, ctx.probes + 1):
            if ctx.should_stop:
                ctx.should_stop()
            # Every probe sees all calibration tokens, so the estimate targets the trace of the Hessian of the
            # whole calibration loss and its standard error is probe noise only.
            est = hutchinson_probe(ctx.model, ep, batches, gen, ctx.should_stop)
            for layer, v in est.items():
                draws[layer].append(v)
            if k >= 2:
                rel = _median_rel_err(draws)
            if ctx.on_progress:
                ctx.on_progress(k / ctx.probes)
            if k >= ctx.min_probes and rel <= ctx.tol:
                break
    scores = {layer: torch.stack(v).mean(0).tolist() for layer, v in draws.items()}
    stderr = {layer: (torch.stack(v).std(0, unbiased=True) / math.sqrt(len(v))).tolist() if len(v) > 1
              else [float("nan")] * len(v[0]) for layer, v in draws.items()}
    return SensitivityResult("hutchinson", scores, probes=k, rel_std_err_median=rel,
                             details={"std_err": {str(a): b for a, b in stderr.items()}, "tol": ctx.tol,
                                      "converged": rel <= ctx.tol})


def per_sample_grad_sq(model, ep: _ExpertParams, samples: torch.Tensor, should_stop=None, on_progress=None
                       ) -> dict[int, torch.Tensor]:
    """Σ_i ‖∇ℓ_i‖² per expert, one backward per sequence i."""
    from .data import iter_batches

    total = {g.layer: torch.zeros(g.num_experts, dtype=torch.float64) for g in ep.groups}
    param = next(model.parameters())
    n = len(samples)
    with _RequiresGradOnly(model, ep.params), _GradThroughExperts(model, ep.groups):
        for i, batch in enumerate(iter_batches(samples, 1, param.device, dtype=param.dtype)):
            if should_stop:
                should_stop()
            loss = lm_loss(model, batch["input_ids"] if len(batch) == 1 else batch)
            grads = _zeros_for_unused(torch.autograd.grad(loss, ep.params, allow_unused=True), ep.params)
            for layer, v in ep.per_expert_sums([g * g for g in grads]).items():
                total[layer] += v
            if on_progress:
                on_progress((i + 1) / n)
    return total


@register("fisher")
def fisher(ctx: SensitivityContext) -> SensitivityResult:
    ep = _ExpertParams(ctx.groups)
    n = len(ctx.samples)
    sums = per_sample_grad_sq(ctx.model, ep, ctx.samples, ctx.should_stop, ctx.on_progress)
    return SensitivityResult("fisher", {layer: (v / n).tolist() for layer, v in sums.items()},
                             details={"samples": n, "estimator": "trace of the empirical Fisher"})


@register("frequency")
def frequency(ctx: SensitivityContext) -> SensitivityResult:
    return SensitivityResult("frequency", {g.layer: ctx.stats.frequency(g.layer).tolist() for g in ctx.groups})


@register("input-hessian")
def input_hessian(ctx: SensitivityContext) -> SensitivityResult:
    scores = {}
    for g in ctx.groups:
        s = torch.zeros(g.num_experts, dtype=torch.float64)
        for p in g.projections:
            # tr(2XᵀX) per output row, out_features rows; normalised per calibration token.
            s += 2.0 * p.out_features * ctx.stats.sq_norms[(g.layer, p.name)] / max(ctx.stats.tokens, 1)
        scores[g.layer] = s.tolist()
    return SensitivityResult("input-hessian", scores)


@register("weight-norm")
def weight_norm(ctx: SensitivityContext) -> SensitivityResult:
    scores = {}
    for g in ctx.groups:
        s = []
        for e in range(g.num_experts):
            total = 0.0
            for p in g.projections:
                norm = float(g.weight(e, p.name).detach().double().norm())
                total += (p.params - 1) / max(norm, 1e-12)
            s.append(total)
        scores[g.layer] = s
    return SensitivityResult("weight-norm", scores, details={"closed_form": "sum_proj (n-1)/||W_proj||_F"})


def compute_sensitivity(method: str, ctx: SensitivityContext) -> SensitivityResult:
    if method not in SENSITIVITY:
        raise KeyError(f"unknown sensitivity method {method!r}; choose from {sorted(SENSITIVITY)}")
    return SENSITIVITY[method](ctx)
