"""Candidate quantization of one MoE layer: every expert at every width, with GPTQ batched across the experts.

:func:`gptq_batched` is :func:`mopeq_core.quantize.quantize_gptq` (without act-order) run on a stack of experts
``W [E, out, in]`` with their Hessians ``H [E, in, in]``: the same blocked algorithm, group parameters and error
feedback, with every per-column step done for all experts in one tensor operation. The column loop is what
dominates GPTQ on a GPU (a few small kernels per column), so batching E experts divides its launches by E.
Experts whose Hessian is empty or cannot be factorised fall back to RTN individually, exactly as
``quantize_gptq`` does; the Cholesky factors are computed once per projection and shared by every width. Results equal the per-expert function up to float summation order (tested).

:func:`quantize_layer_candidates` yields ``(expert, bits, projection, QuantizedMatrix, error)`` for one layer; on a
GPU it uses the batched GPTQ, elsewhere the per-expert quantizers of ``quantize.py`` (same memory as before).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import torch

from .quantize import (
    QUANTIZERS,
    QuantizedMatrix,
    QuantSpec,
    _find_params,
    _inverse_hessian_factor,
    _make_qm,
    _quant_codes,
    quantization_error,
    quantize_rtn,
)


class GptqFactors:
    """Per-expert upper Cholesky factors of ``(H + lambda I)^-1`` for the experts GPTQ can run on, stacked; the
    others (empty Hessian, failed factorisation) are listed for RTN. Computed once per projection and reused for
    every width."""

    def __init__(self, H: torch.Tensor, damp: float, dtype: torch.dtype, device):
        self.live: list[int] = []
        self.rtn: list[int] = []
        factors = []
        for e in range(H.shape[0]):
            H64 = H[e].detach().to(device=device, dtype=torch.float64).clone()
            if not bool(torch.isfinite(H64).all()):
                raise ValueError(f"H[{e}] contains NaN or inf")
            diag = H64.diagonal()
            dead = diag <= 0
            if bool(dead.all()):
                self.rtn.append(e)
                continue
            if bool(dead.any()):  # as quantize_gptq: decouple dead inputs, diagonal on the scale of the live ones
                live_mean = float(diag[~dead].mean())
                H64[dead, :] = 0
                H64[:, dead] = 0
                H64.diagonal()[dead] = live_mean
            U = _inverse_hessian_factor(H64, damp)
            del H64
            if U is None:
                warnings.warn(f"GPTQ: Cholesky failed for expert {e} even with heavy damping; falling back to RTN",
                              RuntimeWarning, stacklevel=2)
                self.rtn.append(e)
                continue
            factors.append(U.to(dtype))
            self.live.append(e)
        self.stacked = torch.stack(factors) if factors else None


def gptq_batched(W: torch.Tensor, H: torch.Tensor | None, spec: QuantSpec, *, damp: float = 0.01,
                 block_size: int = 128, clip_search: bool = True, factors: GptqFactors | None = None
                 ) -> list[QuantizedMatrix]:
    """GPTQ of every ``W[e]`` [out, in] against ``H[e]`` = sum x x^T [in, in] (or precomputed ``factors``); one
    QuantizedMatrix per expert."""
    Wc = W.detach().to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    if Wc.dim() != 3:
        raise ValueError(f"W must be [E, out, in], got {list(W.shape)}")
    E, out, inp = Wc.shape
    if factors is None:
        if H is None or H.dim() != 3 or H.shape[0] != E or tuple(H.shape[1:]) != (inp, inp):
            raise ValueError(f"H must be [{E}, {inp}, {inp}], got {None if H is None else list(H.shape)}")
        factors = GptqFactors(H, damp, Wc.dtype, Wc.device)
    if not bool(torch.isfinite(Wc).all()):
        raise ValueError("W contains NaN or inf")
    results: list[QuantizedMatrix | None] = [None] * E
    for e in factors.rtn:
        results[e] = quantize_rtn(Wc[e], spec, clip_search=clip_search)
    live = factors.live
    if live:
        cdt, dev = Wc.dtype, Wc.device
        Wp = Wc[torch.tensor(live, device=dev)].clone()  # [L, out, in]
        Hinv = factors.stacked.to(dev, cdt)  # [L, in, in]
        L = len(live)
        G = spec.group_size
        ng = spec.n_groups(inp)
        maxq = spec.maxq
        scales = torch.empty(L, out, ng, dtype=cdt, device=dev)
        zeros = torch.empty(L, out, ng, dtype=cdt, device=dev)
        Q = torch.empty(L, out, inp, dtype=cdt, device=dev)
        B = max(G, (block_size // G) * G)  # aligned to groups, as quantize_gptq
        for i1 in range(0, inp, B):
            i2 = min(i1 + B, inp)
            count = i2 - i1
            W1 = Wp[:, :, i1:i2].clone()
            Err1 = torch.empty(L, out, count, dtype=cdt, device=dev)
            Hinv1 = Hinv[:, i1:i2, i1:i2]
            for i in range(count):
                col = i1 + i
                g = col // G
                if col % G == 0:
                    s, z = _find_params(W1[:, :, i: i + G], spec, clip_search)
                    scales[:, :, g] = s
                    zeros[:, :, g] = z
                s = scales[:, :, g]
                z = zeros[:, :, g]
                w = W1[:, :, i]
                q = _quant_codes(w, s, z, maxq)
                Q[:, :, col] = q
                err = (w - (q - z) * s) / Hinv1[:, i, i].unsqueeze(1)
                W1[:, :, i:] -= err.unsqueeze(2) * Hinv1[:, i, i:].unsqueeze(1)
                Err1[:, :, i] = err
            if i2 < inp:
                Wp[:, :, i2:] -= torch.bmm(Err1, Hinv[:, i1:i2, i2:])
        for j, e in enumerate(live):
            results[e] = _make_qm(Q[j], scales[j], zeros[j], spec, (out, inp))
    return results  # type: ignore[return-value]


def quantize_layer_candidates(group, stats, bits_choices, qs, *, device: torch.device | str | None = None,
                              batched: bool | None = None, should_stop=None
                              ) -> Iterator[tuple[int, int, str, QuantizedMatrix, float]]:
    """Every expert of ``group`` at every width in ``bits_choices``: ``(expert, bits, projection, matrix, error)``
    where ``error`` is ``||dequant - W||_F^2`` of that projection (as ``apply.build_candidates`` sums them).

    ``batched`` (default: on CUDA, or as ``MOPEQ_GPTQ_BATCHED`` says) runs GPTQ across the layer's experts at
    once; otherwise each expert goes through the registry quantizer exactly as ``apply.quantize_expert`` calls it.
    """
    first = group.weight(0, group.projections[0].name)
    device = torch.device(device) if device is not None else first.device
    if batched is None:  # MOPEQ_GPTQ_BATCHED=1/0 forces it on/off (benchmarks, tests)
        env = os.environ.get("MOPEQ_GPTQ_BATCHED", "")
        batched = env == "1" if env in ("0", "1") else device.type == "cuda"
    E = group.num_experts
    for p in group.projections:
        H = None
        if stats is not None and stats.hessians:
            H = stats.hessians.get((group.layer, p.name))
        W = factors = None
        for b in bits_choices:
            if should_stop:
                should_stop()
            spec = qs.spec(b)
            if qs.quantizer == "gptq" and H is not None and batched and not qs.act_order:
                if W is None:  # once per projection: the stacked weights and the Cholesky factors
                    W = torch.stack([group.weight(e, p.name).detach().to(device, torch.float32) for e in range(E)])
                    factors = GptqFactors(H, qs.damp, W.dtype, device)
                qms = gptq_batched(W, None, spec, factors=factors)
                for e, qm in enumerate(qms):
                    yield e, b, p.name, qm, quantization_error(W[e], qm)
                del qms
                continue
            fn = QUANTIZERS[qs.quantizer]
            kw = {"damp": qs.damp, "act_order": qs.act_order} if qs.quantizer == "gptq" else {}
            for e in range(E):
                W = group.weight(e, p.name).detach().float().to(device)
                He = None if H is None else H[e].to(W.device)
                qm = fn(W, He, spec, **kw)
                yield e, b, p.name, qm, quantization_error(group.weight(e, p.name), qm)
        del W, factors
