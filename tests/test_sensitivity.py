"""Sensitivity scores against independent references: a dense Hessian, a dense per-sample Jacobian, closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from mopeq_core.calibrate import calibrate
from mopeq_core.moe import find_expert_groups
from mopeq_core.sensitivity import (
    SensitivityContext,
    _ExpertParams,
    compute_sensitivity,
    lm_loss,
    probe_vector,
    streamed_hvp_products,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=24, hidden_size=8, intermediate_size=4, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    model = MixtralForCausalLM(cfg).double().eval()
    with torch.no_grad():  # larger expert weights so the Hessian is not dominated by the rest of the net
        for g in find_expert_groups(model):
            for _, p, _ in g.expert_parameters():
                p.mul_(8.0)
    ids = torch.randint(0, 24, (3, 10), generator=torch.Generator().manual_seed(1))
    groups = find_expert_groups(model)
    return model, groups, ids


def _flat_loss_fn(model, ep, ids):
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in ep.params]
    shapes = [p.shape for p in ep.params]
    sizes = [p.numel() for p in ep.params]

    def f(flat):
        parts = torch.split(flat, sizes)
        params = {k: t.view(s) for k, t, s in zip(keys, parts, shapes)}
        logits = torch.func.functional_call(model, params, (ids,)).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    flat = torch.cat([p.detach().reshape(-1) for p in ep.params])
    return f, flat, sizes


def _expert_slices(ep, sizes):
    """(layer, expert) -> flat index tensor of that expert's weights in the concatenated parameter vector."""
    out, offset = {}, 0
    for (g, p, e), n in zip(ep.entries, sizes):
        idx = torch.arange(offset, offset + n).view(p.shape)
        experts = range(g.num_experts) if e is None else [e]
        for ex in experts:
            sl = idx[ex] if e is None else idx
            out.setdefault((g.layer, ex), []).append(sl.reshape(-1))
        offset += n
    return {k: torch.cat(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def dense_hessian(tiny):
    model, groups, ids = tiny
    ep = _ExpertParams(groups)
    f, flat, sizes = _flat_loss_fn(model, ep, ids)
    H = torch.autograd.functional.hessian(f, flat)
    return H, _expert_slices(ep, sizes), ep


def test_hutchinson_matches_exact_trace_within_three_standard_errors(tiny, dense_hessian):
    model, groups, ids = tiny
    H, slices, _ = dense_hessian
    stats = calibrate(model, groups, ids, collect_hessians=False)
    # Batches of 2 and 1 samples: Hv is accumulated over both, so the target is exactly tr(H_ee) of the mean loss.
    ctx = SensitivityContext(model, groups, stats, ids, probes=150, tol=0.0, min_probes=150, batch_size=2)
    res = compute_sensitivity("hutchinson", ctx)
    assert res.probes == 150
    checked = 0
    for (layer, e), idx in slices.items():
        exact = float(H[idx][:, idx].diagonal().sum())
        est = res.scores[layer][e]
        se = res.details["std_err"][str(layer)][e]
        assert abs(est - exact) <= 3 * se + 1e-9, (layer, e, est, exact, se)
        checked += 1
    assert checked == 6
    # and the estimate is informative: experts' exact traces differ by far more than the error bars
    exacts = [float(H[idx][:, idx].diagonal().sum()) for idx in slices.values()]
    assert max(exacts) - min(exacts) > 0


def _probe_vectors(groups, ep, k):
    """The v of probe ``k`` over the concatenated expert parameters, as the streamed estimator draws it."""
    out = []
    for g in groups:
        for j, p in enumerate(_ExpertParams([g]).params):
            out.append(probe_vector(0, k, g.layer, j, p.detach()).reshape(-1))
    return torch.cat(out)


@pytest.fixture
def float64_routing(monkeypatch):
    """Mixtral computes its router, attention softmax and RMSNorm in float32 whatever the model's dtype; for a
    float64 comparison they run in float64 here (same formulas, no cast)."""
    import transformers.models.mixtral.modeling_mixtral as mm

    softmax = torch.nn.functional.softmax

    def softmax64(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)

    def router(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(hidden_states, self.weight)
        top, idx = torch.topk(softmax(logits, dim=-1), self.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), idx

    def rms_norm(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax64)
    monkeypatch.setattr(mm.MixtralRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(mm.MixtralTopKRouter, "forward", router)


def test_streamed_hvp_equals_whole_model_autograd_and_dense_hessian(tiny, dense_hessian, float64_routing):
    """Forward-over-reverse, one layer at a time, against (a) the whole-model double-backward Hessian-vector
    product with the same v, all in float64 (rel 1e-6), and (b) v·(Hv) from the dense Hessian (computed with
    Mixtral's float32 router softmax, so to float32 rounding). Batches of 2 and 1 sequences: Hv of the mean loss
    is accumulated over both."""
    model, groups, ids = tiny
    H, slices, ep = dense_hessian
    stats = calibrate(model, groups, ids, collect_hessians=False)
    ctx = SensitivityContext(model, groups, stats, ids, batch_size=2)
    probes = [0, 1, 2, 3]
    streamed = streamed_hvp_products(ctx, probes)
    f, flat, _ = _flat_loss_fn(model, ep, ids)
    for k in probes:
        v = _probe_vectors(groups, ep, k).double()
        assert v.numel() == flat.numel()
        _, Hv_autograd = torch.autograd.functional.hvp(f, flat, v)  # whole model, reverse-over-reverse
        Hv_dense = H @ v
        for (layer, e), idx in slices.items():
            ref = float(v[idx] @ Hv_autograd[idx])
            got = float(streamed[k][layer][e])
            assert got == pytest.approx(ref, rel=1e-6, abs=1e-9), (k, layer, e, got, ref)
            scale = float(v[idx].abs() @ Hv_dense[idx].abs())
            assert got == pytest.approx(float(v[idx] @ Hv_dense[idx]), abs=1e-5 * scale + 1e-12)


def test_fisher_matches_dense_per_sample_jacobian(tiny):
    model, groups, ids = tiny
    ep = _ExpertParams(groups)
    _, flat, sizes = _flat_loss_fn(model, ep, ids)
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in ep.params]

    def per_sample_losses(flat):
        parts = torch.split(flat, sizes)
        params = {k: t.view(p.shape) for k, t, p in zip(keys, parts, ep.params)}
        logits = torch.func.functional_call(model, params, (ids,)).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return ce.mean(dim=1)

    J = torch.autograd.functional.jacobian(per_sample_losses, flat)  # [N, P]
    slices = _expert_slices(ep, sizes)
    stats = calibrate(model, groups, ids, collect_hessians=False)
    res = compute_sensitivity("fisher", SensitivityContext(model, groups, stats, ids))
    for (layer, e), idx in slices.items():
        ref = float((J[:, idx] ** 2).sum()) / ids.shape[0]
        assert res.scores[layer][e] == pytest.approx(ref, rel=1e-6)  # router softmax is float32


def test_frequency_input_hessian_and_weight_norm_closed_forms(tiny):
    model, groups, ids = tiny
    stats = calibrate(model, groups, ids, collect_hessians=True)
    ctx = SensitivityContext(model, groups, stats, ids)
    freq = compute_sensitivity("frequency", ctx)
    ih = compute_sensitivity("input-hessian", ctx)
    wn = compute_sensitivity("weight-norm", ctx)
    n_tokens = ids.numel()
    for g in groups:
        assert sum(freq.scores[g.layer]) == pytest.approx(1.0)
        assert int(stats.counts[g.layer].sum()) == n_tokens * 2  # top-2 routing
        for e in range(g.num_experts):
            # input-Hessian trace from the full second-moment matrices: Σ_proj out · tr(2 XᵀX) / tokens
            ref = sum(p.out_features * 2 * float(stats.hessians[(g.layer, p.name)][e].trace())
                      for p in g.projections) / n_tokens
            assert ih.scores[g.layer][e] == pytest.approx(ref, rel=1e-5)
            # Hessian of ‖W‖_F is (I − ŵŵᵀ)/‖W‖: trace (n − 1)/‖W‖, summed over projections
            w = [g.weight(e, p.name).detach() for p in g.projections]
            ref_wn = sum((t.numel() - 1) / float(t.norm()) for t in w)
            assert wn.scores[g.layer][e] == pytest.approx(ref_wn, rel=1e-9)


def test_hutchinson_stops_early_at_tolerance(tiny):
    model, groups, ids = tiny
    stats = calibrate(model, groups, ids, collect_hessians=False)
    loose = compute_sensitivity("hutchinson", SensitivityContext(model, groups, stats, ids, probes=64, tol=10.0,
                                                                 min_probes=4, batch_size=3))
    assert loose.probes == 4 and loose.rel_std_err_median <= 10.0
    strict = compute_sensitivity("hutchinson", SensitivityContext(model, groups, stats, ids, probes=12, tol=1e-9,
                                                                  min_probes=4, batch_size=3))
    assert strict.probes == 12 and strict.details["converged"] is False
    assert math.isfinite(strict.rel_std_err_median)


def test_loss_helper_is_plain_cross_entropy(tiny):
    model, _, ids = tiny
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss
        assert float(lm_loss(model, ids)) == pytest.approx(float(ref), rel=1e-10)
