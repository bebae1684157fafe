"""RTN and GPTQ group-wise quantization, the packed form, and byte accounting.

References used here are independent re-implementations: plain per-group RTN from the documented formulas, and a
float64 column-by-column GPTQ in the original OBS form (explicit inverse Hessian, one Gaussian-elimination step per
column; no Cholesky, no blocks, no lazy updates).
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from mopeq_core import sizing
from mopeq_core.quantize import (
    QUANTIZERS,
    QuantizedMatrix,
    QuantSpec,
    quantization_error,
    quantize_gptq,
    quantize_rtn,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------------------------------------


def ref_group_params(x: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row params of one group x [out, g] (float64), no clip search, float16-rounded scale."""
    maxq = 2**bits - 1
    lo = torch.clamp(x.min(dim=1).values, max=0.0)
    hi = torch.clamp(x.max(dim=1).values, min=0.0)
    if symmetric:
        h = 2 ** (bits - 1)
        s = torch.maximum(hi / (h - 1), -lo / h)
    else:
        s = (hi - lo) / maxq
    s = s.clamp(2.0**-24, 65504.0).half().double()
    if symmetric:
        z = torch.full_like(s, float(2 ** (bits - 1)))
    else:
        z = torch.clamp(torch.round(-lo / s), 0, maxq)
    return s, z


def ref_rtn(W: torch.Tensor, spec: QuantSpec):
    W = W.double()
    out, n = W.shape
    G = spec.group_size
    codes = torch.empty(out, n, dtype=torch.float64)
    scales, zeros = [], []
    for g0 in range(0, n, G):
        s, z = ref_group_params(W[:, g0 : g0 + G], spec.bits, spec.symmetric)
        scales.append(s)
        zeros.append(z)
        for j in range(g0, min(g0 + G, n)):
            codes[:, j] = torch.clamp(torch.round(W[:, j] / s) + z, 0, 2**spec.bits - 1)
    return codes, torch.stack(scales, 1), torch.stack(zeros, 1)


def ref_gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, damp: float, act_order: bool):
    """Column-by-column GPTQ (OBS form) in float64."""
    W = W.double().clone()
    H = H.double().clone()
    out, n = W.shape
    G = spec.group_size
    maxq = 2**spec.bits - 1
    diag = H.diagonal().clone()
    dead = diag == 0
    H[dead, :] = 0
    H[:, dead] = 0
    H[dead, dead] = diag[~dead].mean()
    ng = -(-n // G)
    S = torch.zeros(out, ng, dtype=torch.float64)
    Z = torch.zeros(out, ng, dtype=torch.float64)
    if act_order:
        for g in range(ng):
            S[:, g], Z[:, g] = ref_group_params(W[:, g * G : (g + 1) * G], spec.bits, spec.symmetric)
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
    else:
        perm = torch.arange(n)
    W = W[:, perm]
    H = H[perm][:, perm]
    H = H + damp * H.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros(out, n, dtype=torch.float64)
    for j in range(n):
        g = int(perm[j]) // G
        if not act_order and j % G == 0:
            S[:, g], Z[:, g] = ref_group_params(W[:, j : j + G], spec.bits, spec.symmetric)
        s, z = S[:, g], Z[:, g]
        q = torch.clamp(torch.round(W[:, j] / s) + z, 0, maxq)
        Q[:, j] = q
        # OBS: optimal update of the remaining weights, then remove column j from the inverse Hessian
        err = (W[:, j] - (q - z) * s) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv[j:, j:] -= torch.outer(Hinv[j:, j], Hinv[j, j:]) / Hinv[j, j]
    return Q[:, torch.argsort(perm)], S, Z


def output_error(X: torch.Tensor, W: torch.Tensor, qm: QuantizedMatrix) -> float:
    X = X.double()
    return float((X @ (W.double() - qm.dequantize(torch.float64)).T).square().sum())


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64) * (
        torch.linspace(1.0, 0.05, d, dtype=torch.float64)
    )
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ A.T + 0.3 * torch.randn(
        d, generator=g, dtype=torch.float64
    )


# ---------------------------------------------------------------------------------------------------------------------
# sizes and packed form
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape,G", [((24, 64), 16), ((19, 70), 16), ((5, 33), 128)])
def test_bytes_match_sizing(bits: int, symmetric: bool, shape: tuple[int, int], G: int) -> None:
    spec = QuantSpec(bits, G, symmetric)
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    qm = quantize_rtn(W, spec)
    expected = sizing.matrix_bytes(shape[0], shape[1], bits, G, symmetric)
    assert qm.nbytes() == expected
    packed = qm.to_packed()
    assert set(packed) == ({"qweight", "scales"} if symmetric else {"qweight", "scales", "qzeros"})
    assert sum(t.numel() * t.element_size() for t in packed.values()) == expected
    assert packed["scales"].dtype == torch.float16 and packed["scales"].shape == (
        shape[0],
        sizing.n_groups(shape[1], G),
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_packed_round_trip_is_bit_identical(bits: int, symmetric: bool) -> None:
    spec = QuantSpec(bits, 32, symmetric)
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(40, 100, generator=g, dtype=torch.float64)
    for qm in (
        quantize_rtn(W, spec),
        quantize_gptq(W, correlated_inputs(300, 100, 2).T @ correlated_inputs(300, 100, 2), spec),
    ):
        back = QuantizedMatrix.from_packed(qm.to_packed(), spec, (40, 100))
        assert torch.equal(back.codes, qm.codes)
        assert torch.equal(back.scales, qm.scales)
        assert torch.equal(back.zeros, qm.zeros)
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            assert torch.equal(back.dequantize(dtype), qm.dequantize(dtype))


def test_from_packed_rejects_malformed() -> None:
    spec_a = QuantSpec(3, 16, symmetric=False)
    qm = quantize_rtn(torch.randn(8, 40), spec_a)
    good = qm.to_packed()

    def bad(msg: str, spec: QuantSpec = spec_a, shape=(8, 40), **changes) -> None:
        t = {**good, **changes}
        t = {k: v for k, v in t.items() if v is not None}
        with pytest.raises(ValueError, match=msg):
            QuantizedMatrix.from_packed(t, spec, shape)

    bad("missing.*qzeros", qzeros=None)
    bad("missing.*qweight", qweight=None)
    bad("qweight has 14 bytes, expected 120", qweight=good["qweight"][:14])
    bad("qzeros has", qzeros=good["qzeros"][:-1])
    bad("scales have shape", scales=good["scales"][:, :2])
    bad("float16", scales=good["scales"].float())
    nan_scales = good["scales"].clone()
    nan_scales[0, 0] = float("nan")
    bad("non-finite", scales=nan_scales)
    bad("unexpected.*qzeros", spec=QuantSpec(3, 16, symmetric=True))
    bad("qweight has", shape=(8, 41))
    bad("shape", shape=(8,))


# ---------------------------------------------------------------------------------------------------------------------
# RTN
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_decreases_with_bits(symmetric: bool) -> None:
    W = torch.randn(64, 200, generator=torch.Generator().manual_seed(3))
    errs = [quantization_error(W, quantize_rtn(W, QuantSpec(b, 64, symmetric))) for b in (2, 3, 4, 8)]
    assert all(a > b for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] > 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", [True, False])
def test_rtn_values_within_half_step_of_clipped_weight(bits: int, symmetric: bool, clip: bool) -> None:
    spec = QuantSpec(bits, 32, symmetric)
    W = torch.randn(30, 90, generator=torch.Generator().manual_seed(bits)) * 0.05
    W[0, :5] += 1.0  # an outlier group
    qm = quantize_rtn(W, spec, clip_search=clip)
    assert int(qm.codes.max()) <= 2**bits - 1
    if symmetric:
        assert bool((qm.zeros == 2 ** (bits - 1)).all())
    idx = torch.arange(90) // 32
    s = qm.scales.double()[:, idx]
    z = qm.zeros.double()[:, idx]
    lo, hi = -z * s, (2**bits - 1 - z) * s
    clipped = torch.minimum(torch.maximum(W.double(), lo), hi)
    dq = qm.dequantize(torch.float64)
    assert bool(((dq - clipped).abs() <= s / 2 * (1 + 1e-6)).all())
    if not clip:  # the full range is representable: nothing is clipped beyond half a step
        assert bool(((dq - W.double()).abs() <= s / 2 * (1 + 1e-6) + 1e-12).all())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_matches_reference_and_clip_search_helps(bits: int, symmetric: bool) -> None:
    spec = QuantSpec(bits, 16, symmetric)
    W = torch.randn(20, 50, generator=torch.Generator().manual_seed(10 + bits), dtype=torch.float64)
    codes, S, Z = ref_rtn(W, spec)
    qm = quantize_rtn(W, spec, clip_search=False)
    assert torch.equal(qm.codes.double(), codes)
    assert torch.equal(qm.scales.double(), S)
    assert torch.equal(qm.zeros.double(), Z)
    # the clip search never makes any group worse
    qc = quantize_rtn(W, spec, clip_search=True)
    idx = torch.arange(50) // 16
    e_plain = (qm.dequantize(torch.float64) - W).square()
    e_clip = (qc.dequantize(torch.float64) - W).square()
    per_group = lambda e: torch.zeros(20, 4, dtype=torch.float64).index_add_(1, idx, e)
    assert bool((per_group(e_clip) <= per_group(e_plain) + 1e-15).all())
    if bits == 2:
        assert e_clip.sum() < 0.9 * e_plain.sum()


def test_all_zero_matrix_and_zero_groups() -> None:
    for symmetric in (True, False):
        for bits in (2, 3, 4, 8):
            spec = QuantSpec(bits, 16, symmetric)
            qm = quantize_rtn(torch.zeros(6, 40), spec)
            dq = qm.dequantize()
            assert torch.equal(dq, torch.zeros(6, 40))
            assert bool(torch.isfinite(qm.scales).all()) and bool((qm.scales > 0).all())
            W = torch.randn(6, 40)
            W[:, 16:32] = 0  # a whole zero group
            W[2] = 0
            for qm in (quantize_rtn(W, spec), quantize_gptq(W, torch.eye(40) * 3, spec)):
                dq = qm.dequantize()
                assert bool(torch.isfinite(dq).all())
                assert bool((dq[:, 16:32] == 0).all()) and bool((dq[2] == 0).all())


def test_input_dtypes_and_validation() -> None:
    W = torch.randn(16, 48)
    spec = QuantSpec(4, 16)
    ref = quantize_rtn(W, spec)
    assert torch.equal(quantize_rtn(W.to(torch.float32), spec).codes, ref.codes)
    assert quantize_rtn(W.to(torch.bfloat16), spec).dequantize(torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        QuantSpec(1, 16)
    with pytest.raises(ValueError):
        QuantSpec(4, 0)
    with pytest.raises(ValueError, match="NaN"):
        quantize_rtn(torch.full((2, 4), float("nan")), spec)
    with pytest.raises(ValueError, match="H must be"):
        quantize_gptq(W, torch.eye(47), spec)


# ---------------------------------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_column_by_column_reference(bits: int, symmetric: bool, act_order: bool) -> None:
    n, out, G = 72, 24, 16  # 72 % 16 != 0: the last group has 8 columns
    spec = QuantSpec(bits, G, symmetric)
    g = torch.Generator().manual_seed(100 + bits)
    W = torch.randn(out, n, generator=g, dtype=torch.float64)
    X = correlated_inputs(400, n, seed=bits)
    X[:, 5] = 0.0  # a dead input
    H = X.T @ X
    codes, S, Z = ref_gptq(W, H, spec, damp=0.01, act_order=act_order)
    # float64 path: identical codes and group parameters (block_size 40 -> blocks of 32 columns, several blocks)
    qm = quantize_gptq(W, H, spec, damp=0.01, act_order=act_order, block_size=40, clip_search=False)
    assert torch.equal(qm.scales.double(), S)
    assert torch.equal(qm.zeros.double(), Z)
    assert torch.equal(qm.codes.double(), codes)
    # float32 path: the same algorithm up to float32 rounding
    q32 = quantize_gptq(W.float(), H.float(), spec, act_order=act_order, block_size=16, clip_search=False)
    assert (q32.codes.double() == codes).double().mean() > 0.97
    ref_err = float(
        (X @ (W - (codes - Z.repeat_interleave(G, 1)[:, :n]) * S.repeat_interleave(G, 1)[:, :n]).T)
        .square()
        .sum()
    )
    assert output_error(X, W, q32) == pytest.approx(ref_err, rel=0.02)


def test_gptq_fallbacks_and_registry() -> None:
    W = torch.randn(12, 40, generator=torch.Generator().manual_seed(7))
    spec = QuantSpec(3, 16, symmetric=False)
    rtn = quantize_rtn(W, spec)
    for H in (None, torch.zeros(40, 40)):
        qm = quantize_gptq(W, H, spec)
        assert torch.equal(qm.codes, rtn.codes) and torch.equal(qm.scales, rtn.scales)
    assert torch.equal(QUANTIZERS["rtn"](W, torch.eye(40), spec, damp=0.1).codes, rtn.codes)
    X = correlated_inputs(100, 40, 1).float()
    assert torch.equal(
        QUANTIZERS["gptq"](W, X.T @ X, spec, act_order=True).codes,
        quantize_gptq(W, X.T @ X, spec, act_order=True).codes,
    )
    with pytest.raises(TypeError):
        QUANTIZERS["rtn"](W, None, spec, bogus=1)
    # an indefinite H: damping is raised until the Cholesky succeeds, with a warning
    Hbad = torch.eye(40) + 2.0 * (torch.ones(40, 40) - torch.eye(40)) * 0.5
    Hbad[0, 1] = Hbad[1, 0] = 5.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm = quantize_gptq(W, Hbad, spec)
    assert any("damping" in str(w.message) for w in caught)
    assert bool(torch.isfinite(qm.dequantize()).all())


def _mixtral_expert0_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    model = MixtralForCausalLM(cfg).eval()
    experts = model.model.layers[0].mlp.experts
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        rows = (top_k_index == 0).any(dim=-1)
        captured.append(hidden[rows].detach().double())

    handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ids = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    X = torch.cat(captured)
    assert X.shape[0] >= 64, "expert 0 saw too few tokens for the test"
    return X, experts.gate_up_proj[0].detach().clone()


def test_gptq_beats_rtn_on_real_mixtral_activations() -> None:
    X, W = _mixtral_expert0_inputs()
    H = X.T @ X
    assert W.shape == (256, 64)
    for bits in (2, 3, 4):
        spec = QuantSpec(bits, 32)
        e_rtn = output_error(X, W, quantize_rtn(W, spec))
        for act_order in (False, True):
            e_gptq = output_error(X, W, quantize_gptq(W, H.float(), spec, act_order=act_order))
            assert e_gptq < 0.9 * e_rtn, (bits, act_order, e_gptq, e_rtn)
