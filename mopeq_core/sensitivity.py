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
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    samples: Any  # calibration token windows (or an image+text data.SampleSet) for loss-based scores
    probes: int = 64
    tol: float = 0.02
    min_probes: int = 8
    seed: int = 0
    batch_size: int = 8
    should_stop: Callable[[], None] | None = None
    on_progress: Callable[[float], None] | None = None
    probe_batch: int = 8  # probes carried together by one forward and one backward stream
    # Set by the engine (built here from ``model`` when absent): the layer stream, the calibration batches as
    # (key, model inputs with labels), each batch's cross-fitting fold, every layer's recorded inputs, and the
    # layer-local scores the calibration stream already computed.
    stream: Any = None
    batches: list | None = None
    folds: list[int] | None = None
    inputs: Any = None
    precomputed: dict[str, dict[int, list[float]]] = field(default_factory=dict)


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


def _zeros_for_unused(grads, params) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


# =====================================================================================================================
# whole-model loss scores, streamed layer by layer
# =====================================================================================================================
def probe_vector(seed: int, probe: int, layer: int, index: int, like: torch.Tensor) -> torch.Tensor:
    """Rademacher entries for one expert parameter of one probe. Drawn from (seed, probe, layer, parameter index)
    alone, so a probe is the same vector whichever order the layers are visited in."""
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + probe) * 10_007 + layer) * 101 + index)
    v = torch.randint(0, 2, like.shape, generator=gen, dtype=torch.int8).to(like.device, like.dtype)
    return v.mul_(2).sub_(1)  # int8 draws: no int64 copy of an expert-sized tensor


class _LayerParams:
    """The expert weights of one layer (none for a dense layer) as autograd leaves for the block.

    Fused experts (``[E, ...]`` parameters) are differentiated through one leaf per expert (views of the fused
    tensor) and a per-expert forward of the experts module: indexing a fused parameter under autograd makes a
    zero tensor of the whole parameter per expert in the backward pass (E times the layer's expert weights,
    twice over for a Hessian-vector product); per-expert leaves keep each gradient the size of its expert. The
    per-expert forward is checked once against the module's own on the first batch; where they differ (an
    experts module this code does not know), the module's forward and the fused parameters are used."""

    def __init__(self, group):
        self.group = group
        self.fused_mode = False
        if group is None:
            self.params, self.fused = [], []
        elif group.kind == "fused":
            self.fused = [getattr(group.module, p.name) for p in group.projections]
            self.leaves = [list(w.detach().unbind(0)) for w in self.fused]
            self.params = [t for per in self.leaves for t in per]
            self.fused_mode = True
        else:
            self.fused = []
            self.ep = _ExpertParams([group])
            self.params = self.ep.params

    def __enter__(self):
        if self.fused_mode and not _per_expert_forward_agrees(self.group, self.leaves):
            self.fused_mode = False  # the module's own forward, through the fused parameters
            self.ep = _ExpertParams([self.group])
            self.params = self.ep.params
        if self.fused_mode:
            self.group.module.forward = _per_expert_forward(self.group, self.leaves)
        self.saved = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        for p, r in zip(self.params, self.saved):
            p.requires_grad_(r)
        if self.fused_mode:
            del self.group.module.forward

    def vectors(self, seed: int, probe: int) -> list[torch.Tensor]:
        """The probe's v over this layer's expert weights, in ``params`` order (drawn per fused parameter)."""
        if self.group is None:
            return []
        if self.fused_mode:
            return [t for j, w in enumerate(self.fused)
                    for t in probe_vector(seed, probe, self.group.layer, j, w.detach()).unbind(0)]
        return [probe_vector(seed, probe, self.group.layer, j, p) for j, p in enumerate(self.params)]

    def per_expert_dots(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """Σ a·b over each expert's weights (a and b in ``params`` order)."""
        if self.fused_mode:
            E = self.group.num_experts
            out = torch.zeros(E, dtype=torch.float64)
            for n, (x, y) in enumerate(zip(a, b)):
                out[n % E] += float(_inner(x.detach().double(), y.detach()))
            return out
        return self.per_expert([x * y for x, y in zip(a, b)])

    def per_expert(self, products: list[torch.Tensor]) -> torch.Tensor:
        if self.fused_mode:
            E = self.group.num_experts
            out = torch.zeros(E, dtype=torch.float64)
            for n, t in enumerate(products):
                out[n % E] += float(t.detach().double().sum())
            return out
        return self.ep.per_expert_sums(products)[self.group.layer]


def _oriented(group, w: torch.Tensor) -> torch.Tensor:
    return w.t() if group.transposed else w


def _per_expert_forward(group, leaves):
    """``experts(hidden_states, top_k_index, top_k_weights)`` computed expert by expert from per-expert weights."""
    from .moe import _bias

    m = group.module
    names = [p.name for p in group.projections]
    ins = [k for k, p in enumerate(group.projections) if p.role == "in"]
    out_k = next(k for k, p in enumerate(group.projections) if p.role == "out")

    def forward(hidden_states, top_k_index, top_k_weights):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        index = top_k_index.reshape(x.shape[0], -1)
        weights = top_k_weights.reshape(x.shape[0], -1)
        if weights.shape[-1] != index.shape[-1]:
            weights = weights.gather(-1, index)
        out = torch.zeros(x.shape[0], group.projections[out_k].out_features, dtype=x.dtype, device=x.device)
        for e in range(group.num_experts):
            tok, pos = torch.where(index == e)
            if not tok.numel():
                continue
            h = group.intermediate(e, x[tok], weights={names[k]: _oriented(group, leaves[k][e]) for k in ins})
            y = torch.nn.functional.linear(h, _oriented(group, leaves[out_k][e]).to(h.dtype),
                                           _bias(m, names[out_k], e))
            out = out.index_add(0, tok, (y * weights[tok, pos, None]).to(out.dtype))
        return out.reshape(*shape[:-1], out.shape[-1])
    return forward


def _per_expert_forward_agrees(group, leaves) -> bool:
    cached = getattr(group, "_per_expert_ok", None)
    if cached is not None:
        return cached
    ok = False
    try:
        gen = torch.Generator().manual_seed(0)
        w0 = group.weight(0, group.projections[0].name)
        hidden = group.projections[0].in_features
        x = torch.randn(6, hidden, generator=gen).to(w0.device, w0.dtype)
        k = min(2, group.num_experts)
        index = torch.stack([torch.randperm(group.num_experts, generator=gen)[:k] for _ in range(6)]).to(w0.device)
        weights = torch.rand(6, k, generator=gen).to(w0.device, w0.dtype)
        with torch.no_grad():
            ref = group.module(x, index, weights)
            got = _per_expert_forward(group, leaves)(x, index, weights)
        ok = ref.shape == got.shape and bool(torch.allclose(ref, got, rtol=1e-4, atol=1e-5 * float(ref.abs().max())))
    except Exception:  # noqa: BLE001 - a module with another calling convention: use its own forward
        ok = False
    group._per_expert_ok = ok
    return ok


def _grad(out, inputs, **kw) -> list[torch.Tensor]:
    return _zeros_for_unused(torch.autograd.grad(out, inputs, allow_unused=True, **kw), inputs)


def _inner(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """<x, y> without an elementwise product tensor (autograd keeps only the two inputs)."""
    return torch.dot(x.reshape(-1), y.reshape(-1).to(x.dtype))


def _dot(a: list[torch.Tensor], b: list[torch.Tensor | None]) -> torch.Tensor:
    terms = [_inner(x, y) for x, y in zip(a, b) if y is not None]
    return sum(terms) if terms else torch.zeros(())


class _StreamedLoss:
    """The calibration loss as a composition of decoder layers (``ctx.stream``), with the inputs of every layer
    recorded by one forward stream (``ctx.inputs``, or recorded here)."""

    def __init__(self, ctx: SensitivityContext):
        from .streaming import ModelStream, make_batches, record_inputs

        self.ctx = ctx
        self.stream = ctx.stream or ModelStream.from_model(ctx.model, ctx.groups)
        param = next(self.stream.model.parameters())
        self.batches = ctx.batches or make_batches(ctx.samples, "calib", ctx.batch_size, param.device, self.stream.dtype)
        self.folds = ctx.folds or [0] * len(self.batches)
        self.n_folds = max(self.folds) + 1
        self.fold_targets = [0] * self.n_folds
        for f, (_, b) in zip(self.folds, self.batches):
            self.fold_targets[f] += _batch_targets(b)
        self.inputs = ctx.inputs if ctx.inputs is not None else record_inputs(self.stream, self.batches,
                                                                               should_stop=ctx.should_stop)
        self.n = self.stream.n_layers

    def check(self):
        if self.ctx.should_stop:
            self.ctx.should_stop()

    def head_loss(self, key_batch, y: torch.Tensor, fold: int) -> torch.Tensor:
        """The batch's share of its fold's mean loss."""
        loss, _ = self.stream.loss(key_batch, y)
        return loss.sum() / max(self.fold_targets[fold], 1)


def _tangents_through_layer(stream, layer, i, lp, x, emb, ins, vectors) -> list[torch.Tensor]:
    """J·(tangent_in, v_k) for each probe k: the layer output's tangent (double-vjp identity). ``vectors(j)`` draws
    probe j's v when it is needed, so one probe vector is held at a time. A function of its own so that the graph
    (which holds the layer's weights) is gone when it returns."""
    with torch.enable_grad(), _GradThroughExperts(stream.model, [lp.group] if lp.group else []):
        x = x.detach().requires_grad_(True)
        y = stream.run_layer(layer, i, x, emb)
        w = torch.zeros_like(y, requires_grad=True)
        gw = _grad(_inner(y, w), [x] + lp.params, create_graph=True)
        return [torch.autograd.grad(_dot(gw, [t] + vectors(j)), w, retain_graph=True)[0].detach()
                for j, t in enumerate(ins)]


def _hvp_through_layer(stream, layer, i, lp, x, emb, head, G, Gts, ins, vectors):
    """One layer of the backward stream: the input gradient, and per probe the input gradient's tangent and
    v·(Hv) per expert over the layer's expert parameters (forward-over-reverse of the layer's local function
    ``<y, G>``, or of the loss for the top layer). One probe's vector and product are held at a time."""
    with torch.enable_grad(), _GradThroughExperts(stream.model, [lp.group] if lp.group else []):
        x = x.detach().requires_grad_(True)
        y = stream.run_layer(layer, i, x, emb)
        s1 = head(y) if head is not None else _inner(y, G)
        g1 = _grad(s1, [x] + lp.params, create_graph=True)
        gts, vhv = [], []
        for j, (gt, t) in enumerate(zip(Gts, ins)):
            v = vectors(j)
            s2 = _dot(g1, [t] + v)
            if gt is not None:
                s2 = s2 + _inner(y, gt)
            g2 = _grad(s2, [x] + lp.params, retain_graph=True)
            gts.append(g2[0].detach())
            vhv.append(lp.per_expert_dots(v, g2[1:]) if lp.params else None)
            del g2, v
        return g1[0].detach(), gts, vhv


def _hutchinson_chunk(sl: _StreamedLoss, probes: list[int]) -> list[dict[int, dict[int, torch.Tensor]]]:
    """vᵀHv per fold, probe, layer and expert for ``probes``: one forward stream carries each probe's tangent of
    the hidden states (J·v, by the double-vjp identity Ju = ∂/∂w ⟨Jᵀw, u⟩), one backward stream carries the
    gradient and its tangent (forward-over-reverse: the Hessian-vector product of each layer's local function),
    recomputing one layer at a time."""
    import tempfile

    from .streaming import DEFAULT_SPILL_BYTES, ActivationStore

    ctx, stream = sl.ctx, sl.stream
    seed = ctx.seed
    # (layer input index, key, probe) -> tangent of that layer's input (absent: zero); spilled to disk past the
    # activation budget, like every carried activation
    held = sl.inputs if isinstance(sl.inputs, ActivationStore) else None
    spill_dir = Path(tempfile.mkdtemp(prefix="mopeq-tangents-", dir=held.dir.parent if held else None))
    tangents = ActivationStore(spill_dir, held.spill_bytes if held else DEFAULT_SPILL_BYTES)
    # -- forward: tangents of every layer's input
    stream.count_pass("sensitivity-forward")
    for i in range(sl.n - 1):
        with stream.layer(i) as layer, _LayerParams(stream.group_of.get(i)) as lp:
            def vectors(j, lp=lp):
                return lp.vectors(seed, probes[j])
            for key, batch in sl.batches:
                sl.check()
                ins = [tangents.maybe((i, key, k), stream.device) for k in probes]
                if not lp.params and all(t is None for t in ins):
                    continue
                outs = _tangents_through_layer(stream, layer, i, lp, sl.inputs.get((i, key), stream.device),
                                               stream.embed(key, batch), ins, vectors)
                for k, t in zip(probes, outs):
                    tangents.put((i + 1, key, k), t)
        del lp, layer  # the real weights of the layer: nothing keeps them once it is released
    # -- backward: the gradient G and its tangent Gt, layer by layer from the top
    stream.count_pass("sensitivity-backward")
    est = [{k: {} for k in probes} for _ in range(sl.n_folds)]
    G: dict = {}
    Gt: dict = {}
    for i in range(sl.n - 1, -1, -1):
        with stream.layer(i) as layer, _LayerParams(stream.group_of.get(i)) as lp:
            def vectors(j, lp=lp):
                return lp.vectors(seed, probes[j])
            for (key, batch), fold in zip(sl.batches, sl.folds):
                sl.check()
                top = i == sl.n - 1
                head = (lambda y, batch=batch, fold=fold: sl.head_loss(batch, y, fold)) if top else None
                g_in, gt_in, hvs = _hvp_through_layer(
                    stream, layer, i, lp, sl.inputs.get((i, key), stream.device), stream.embed(key, batch),
                    head, None if top else G[key], [None if top else Gt[(key, k)] for k in probes],
                    [tangents.maybe((i, key, k), stream.device) for k in probes], vectors)
                G[key] = g_in
                for k, gt, per in zip(probes, gt_in, hvs):
                    Gt[(key, k)] = gt
                    if per is not None:
                        acc = est[fold][k]
                        acc[lp.group.layer] = acc.get(lp.group.layer, 0) + per
                for k in probes:
                    tangents.pop((i, key, k))
        del lp, layer
    tangents.clear()
    shutil.rmtree(spill_dir, ignore_errors=True)
    return est


def streamed_hvp_products(ctx: SensitivityContext, probes: list[int]) -> dict[int, dict[int, torch.Tensor]]:
    """Probe ``k`` -> layer -> [E] vᵀHv (all calibration batches, one fold): the streamed estimate for the given
    probe indices (``probe_vector`` gives their v). Used by the tests against whole-model autograd."""
    est = _hutchinson_chunk(_StreamedLoss(ctx), probes)
    return est[0]


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
    sl = _StreamedLoss(ctx)
    draws: list[dict[int, list[torch.Tensor]]] = [{g.layer: [] for g in ctx.groups} for _ in range(sl.n_folds)]
    w = [float(t) for t in sl.fold_targets]
    rel, k, streams = float("inf"), 0, 0
    while k < ctx.probes:
        size = max(1, ctx.min_probes) if k == 0 else ctx.probe_batch
        chunk = list(range(k, min(ctx.probes, k + size)))
        est = _hutchinson_chunk(sl, chunk)
        streams += 2
        for f in range(sl.n_folds):
            for p in chunk:
                for g in ctx.groups:
                    draws[f][g.layer].append(est[f][p].get(g.layer, torch.zeros(g.num_experts, dtype=torch.float64)))
        k = chunk[-1] + 1
        # The whole-data estimate per probe (the folds' Hessians weighted by their targets) decides convergence.
        full = {g.layer: [sum(wf * draws[f][g.layer][j] for f, wf in enumerate(w)) / sum(w) for j in range(k)]
                for g in ctx.groups}
        if k >= 2:
            rel = _median_rel_err(full)
        if ctx.on_progress:
            ctx.on_progress(k / ctx.probes)
        if k >= ctx.min_probes and rel <= ctx.tol:
            break
    scores = {layer: torch.stack(v).mean(0).tolist() for layer, v in full.items()}
    stderr = {layer: (torch.stack(v).std(0, unbiased=True) / math.sqrt(len(v))).tolist() if len(v) > 1
              else [float("nan")] * len(v[0]) for layer, v in full.items()}
    details = {"std_err": {str(a): b for a, b in stderr.items()}, "tol": ctx.tol, "converged": rel <= ctx.tol,
               "streams": streams}
    if sl.n_folds > 1:
        details["fold_scores"] = [{str(layer): torch.stack(v).mean(0).tolist() for layer, v in d.items()}
                                  for d in draws]
    return SensitivityResult("hutchinson", scores, probes=k, rel_std_err_median=rel, details=details)


def _grad_through_layer(stream, layer, i, lp, x, emb, unit, G) -> list[torch.Tensor]:
    """Gradients of one sequence's mean loss (top layer: ``unit`` given) or of ``<y, G>`` w.r.t. the layer input
    and its expert parameters."""
    with torch.enable_grad(), _GradThroughExperts(stream.model, [lp.group] if lp.group else []):
        x = x.detach().requires_grad_(True)
        y = stream.run_layer(layer, i, x, emb)
        if unit is not None:
            loss, count = stream.loss(unit, y)
            s = loss.sum() / count.sum().clamp(min=1)
        else:
            s = _inner(y, G)
        return [g.detach() for g in _grad(s, [x] + lp.params)]


def _units(sl: _StreamedLoss):
    """(unit key, unit batch, parent key, row, fold): every calibration sequence as a batch of its own."""
    for (key, batch), fold in zip(sl.batches, sl.folds):
        rows = batch["input_ids"].shape[0]
        for r in range(rows):
            unit = batch if rows == 1 else {k: v[r: r + 1] for k, v in batch.items()}
            yield (key, r) if rows > 1 else key, unit, key, r, fold, rows


@register("fisher")
def fisher(ctx: SensitivityContext) -> SensitivityResult:
    """Trace of the empirical Fisher, (1/N) Σ_i ‖∇_{W_e} ℓ_i‖² over calibration sequences i (ℓ_i the sequence's
    mean token loss): exact per-sequence gradients from one backward stream, one layer recomputed at a time."""
    sl = _StreamedLoss(ctx)
    stream = sl.stream
    units = list(_units(sl))
    sums = [{g.layer: torch.zeros(g.num_experts, dtype=torch.float64) for g in ctx.groups}
            for _ in range(sl.n_folds)]
    G: dict = {}
    stream.count_pass("sensitivity-backward")
    for i in range(sl.n - 1, -1, -1):
        with stream.layer(i) as layer, _LayerParams(stream.group_of.get(i)) as lp:
            for ukey, unit, key, r, fold, rows in units:
                sl.check()
                x = sl.inputs.get((i, key), stream.device)
                grads = _grad_through_layer(stream, layer, i, lp, x[r: r + 1] if rows > 1 else x,
                                            stream.embed(("unit", ukey), unit),
                                            unit if i == sl.n - 1 else None, G.get(ukey))
                G[ukey] = grads[0].detach()
                if lp.params:
                    sums[fold][lp.group.layer] += lp.per_expert([g * g for g in grads[1:]])
            if ctx.on_progress:
                ctx.on_progress((sl.n - i) / sl.n)
        del lp, layer, grads
    counts = [0] * sl.n_folds
    for *_, fold, _rows in units:
        counts[fold] += 1
    n = len(units)
    total = {layer: sum(s[layer] for s in sums) for layer in sums[0]}
    details = {"samples": n, "estimator": "trace of the empirical Fisher", "streams": 1}
    if sl.n_folds > 1:
        details["fold_scores"] = [{str(layer): (v / max(c, 1)).tolist() for layer, v in s.items()}
                                  for s, c in zip(sums, counts)]
    return SensitivityResult("fisher", {layer: (v / n).tolist() for layer, v in total.items()}, details=details)


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


def weight_norm_scores(g: ExpertGroup) -> list[float]:
    """Σ_proj (n_proj − 1)/‖W_proj‖_F per expert of a materialised layer."""
    return [sum((p.params - 1) / max(float(g.weight(e, p.name).detach().double().norm()), 1e-12)
                for p in g.projections) for e in range(g.num_experts)]


@register("weight-norm")
def weight_norm(ctx: SensitivityContext) -> SensitivityResult:
    scores = ctx.precomputed.get("weight-norm") or {g.layer: weight_norm_scores(g) for g in ctx.groups}
    return SensitivityResult("weight-norm", dict(scores), details={"closed_form": "sum_proj (n-1)/||W_proj||_F"})


@register("layer-hessian")
def layer_hessian(ctx: SensitivityContext) -> SensitivityResult:
    """Layer-local: the exact trace of the Hessian of the MoE block's routed-output reconstruction error
    (see ``layer_hessian_trace``), accumulated by the calibration stream."""
    scores = ctx.precomputed.get("layer-hessian")
    if scores is None:
        from .streaming import ModelStream, make_batches, record_inputs

        stream = ctx.stream or ModelStream.from_model(ctx.model, ctx.groups)
        batches = ctx.batches or make_batches(ctx.samples, "calib", ctx.batch_size, stream.device, stream.dtype)
        hooks = {g.layer: TraceHook(g) for g in ctx.groups}
        record_inputs(stream, batches, keep=False, layer_hooks=hooks)
        scores = {layer: (h.sums / max(ctx.stats.tokens, 1)).tolist() for layer, h in hooks.items()}
    return SensitivityResult("layer-hessian", dict(scores), rel_std_err_median=0.0,
                             details={"objective": "exact trace of the Hessian of the MoE block's routed-output "
                                                   "reconstruction error (layer-local)", "converged": True})


# ---- layer-local Hessian trace: exact, from one elementwise backward per expert -------------------------------------
def _in_projection_forward(group, e: int, x: torch.Tensor) -> tuple[list[torch.Tensor], Callable]:
    """The "in" projection outputs of expert ``e`` on ``x`` (leaf tensors requiring grad) and ``f`` with
    ``h = f(*outputs)`` the expert's intermediate activation (elementwise in the outputs)."""
    import torch.nn.functional as F

    m = group.module
    if group.kind == "fused":
        name = "gate_up_proj" if getattr(m, "has_gate", True) else "up_proj"
        w = group.weight(e, name).float()
        bias = None
        if getattr(m, "has_bias", False) and getattr(m, f"{name}_bias", None) is not None:
            bias = getattr(m, f"{name}_bias")[e].float()
        y = F.linear(x, w, bias).detach().requires_grad_(True)
        if getattr(m, "has_gate", True):
            return [y], lambda y_: m._apply_gate(y_)
        return [y], lambda y_: m.act_fn(y_)
    from .moe import _expert_act

    expert = m[e]
    act = _expert_act(expert)
    names = [p.name for p in group.projections if p.role == "in"]

    def lin(n):
        mod = getattr(expert, n)
        b = None if mod.bias is None else mod.bias.float()
        return F.linear(x, mod.weight.float(), b).detach().requires_grad_(True)

    if len(names) == 2:
        gate_name = "gate_proj" if "gate_proj" in names else "w1"
        up_name = "up_proj" if "up_proj" in names else "w3"
        return [lin(gate_name), lin(up_name)], lambda g, u: act(g) * u
    y = lin(names[0])
    if names[0] == "gate_up_proj":
        return [y], lambda y_: act(y_.chunk(2, dim=-1)[0]) * y_.chunk(2, dim=-1)[1]
    return [y], lambda y_: act(y_)


def layer_hessian_trace(group, e: int, x: torch.Tensor, w: torch.Tensor | None = None) -> float:
    """``tr(d^2 L / dW_e^2)`` at ``W0`` for ``L = sum_t ||F(x_t; W) - F(x_t; W0)||^2`` over the tokens ``x`` [n, H]
    routed to expert ``e`` with routing weights ``w`` [n] (None: 1). Exact; see the module docstring."""
    x = x.detach().float()
    if x.shape[0] == 0:
        return 0.0
    w2 = torch.ones(x.shape[0], device=x.device) if w is None else w.detach().float() ** 2
    out_proj = next(p for p in group.projections if p.role == "out")
    Wd = group.weight(e, out_proj.name).detach().float()  # [H_out, F]
    sqrt_c = Wd.square().sum(0).sqrt()  # ||W_down[:, j]||
    with torch.enable_grad():
        ys, f = _in_projection_forward(group, e, x)
        h = f(*ys)
        grads = torch.autograd.grad((h * sqrt_c).sum(), ys)
    x_sq = x.square().sum(-1)
    trace_in = sum((w2 * x_sq * g.square().sum(-1)).sum() for g in grads)
    trace_out = out_proj.out_features * (w2 * h.detach().square().sum(-1)).sum()
    return float(2.0 * (trace_in + trace_out))


class TraceHook:
    """Accumulates every expert's layer-Hessian trace from the experts module's (or each expert's) inputs."""

    def __init__(self, group):
        self.group = group
        self.sums = torch.zeros(group.num_experts, dtype=torch.float64)
        self.handles = []

    def install(self) -> TraceHook:
        g = self.group
        if g.kind == "fused":
            self.handles.append(g.module.register_forward_pre_hook(self._fused, with_kwargs=True))
        else:
            for e in range(g.num_experts):
                self.handles.append(g.module[e].register_forward_pre_hook(
                    lambda mod, args, kwargs, e=e: self._expert(e, args, kwargs), with_kwargs=True))
        return self

    def _fused(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
        weights = args[2] if len(args) > 2 else kwargs.get("top_k_weights", kwargs.get("routing_weights"))
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(hidden.shape[0], -1)
        if weights is not None and weights.dim() >= 2 and weights.shape[-1] != index.shape[-1]:
            weights = weights.gather(-1, index)  # dense [n, E] routing weights (some models pass those)
        for e in range(self.group.num_experts):
            tok, pos = torch.where(index == e)
            if tok.numel():
                w = None if weights is None else weights.reshape(hidden.shape[0], -1)[tok, pos]
                self.sums[e] += layer_hessian_trace(self.group, e, hidden[tok], w)

    def _expert(self, e, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        # ModuleList experts (remote code) are called without their routing weight: it is taken as 1.
        self.sums[e] += layer_hessian_trace(self.group, e, x.reshape(-1, x.shape[-1]), None)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def compute_sensitivity(method: str, ctx: SensitivityContext) -> SensitivityResult:
    if method not in SENSITIVITY:
        raise KeyError(f"unknown sensitivity method {method!r}; choose from {sorted(SENSITIVITY)}")
    return SENSITIVITY[method](ctx)
