"""Group-wise weight quantization of expert projections: round-to-nearest (RTN) and GPTQ.

Conventions
-----------
- A weight matrix ``W`` is in ``nn.Linear`` orientation ``[out, in]``; groups of ``group_size`` consecutive input
  columns share one scale (and one zero point) per output row. The last group is shorter when ``in % G != 0``.
- Codes follow the GPTQ convention: ``maxq = 2**bits - 1``, ``q = clamp(round(w / scale) + zero, 0, maxq)`` and
  ``w_hat = scale * (q - zero)``.
  * Asymmetric: the range ``[min(w_min, 0), max(w_max, 0)]`` (zero is always inside it, as in GPTQ, because a
    zero point stored in ``[0, maxq]`` forces it), ``scale = (max - min) / maxq``, ``zero = round(-min / scale)``
    clamped to ``[0, maxq]``.
  * Symmetric: ``zero = 2**(bits-1)`` (implicit, not stored). The grid ``{-2**(bits-1), ..., 2**(bits-1) - 1}``
    is one level longer on the negative side, so the scale is the smallest one that makes both signs fit:
    ``scale = max(w_max / (2**(bits-1) - 1), -w_min / 2**(bits-1))``. (GPTQ's ``2*absmax/maxq`` clips the positive
    side instead; the clip search below covers that choice.)
- ``clip_search`` shrinks the range by a factor ``p`` in ``[0.5, 1]`` per group (coarse grid step 0.05, then a fine
  step 0.01 around the best) and keeps the factor with the lowest squared error of that group.
- Scales are rounded to float16 *before* codes are computed. ``dequantize`` computes ``float(scale16) * (q - zero)``
  in float32, which is exact (an 11-bit mantissa times an integer of at most 9 bits), so the quantizer, the
  fake-quantized model and the packed-artifact loader all see bit-identical weights.
- Scales are clamped to ``[2**-24, 65504]`` (the float16 range), so all-zero groups give scale ``2**-24``, codes equal
  to the zero point and exact zeros; no NaN or inf can arise.

GPTQ (Frantar et al. 2022): damping ``damp * mean(diag H)`` on the diagonal; dead inputs (``diag H == 0``) get a
unit-scale diagonal entry and are simply rounded (their weights are kept, not zeroed: calibration not seeing an input
does not mean it is always zero); the upper Cholesky factor of ``H^-1`` drives the error feedback; lazy batch updates
of ``block_size`` columns (rounded to a multiple of the group size so a group never straddles two blocks, which keeps
the blocked algorithm exactly equal to the column-by-column one); group parameters are computed when a group's first
column is reached, from the already-updated weights. ``act_order`` uses static groups: every group's parameters are
computed from the original ``W`` first, then columns are processed in descending ``diag(H)`` order, so the stored
format needs no ``g_idx``. Computation is float32 (float64 when ``W`` is float64); the Cholesky is float64 and the
damping grows tenfold (up to 6 times) when it fails, after which GPTQ falls back to RTN with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mopeq_core import sizing
from mopeq_core.packing import pack_codes, packed_nbytes, unpack_codes

__all__ = [
    "QUANTIZERS",
    "QuantSpec",
    "QuantizedMatrix",
    "quantization_error",
    "quantize_gptq",
    "quantize_rtn",
]

_FP16_MIN_SCALE = 2.0**-24  # smallest positive float16 (subnormal)
_FP16_MAX = 65504.0
_COARSE_GRID = [1.0 - 0.05 * i for i in range(11)]  # 1.00, 0.95, ..., 0.50
_FINE_OFFSETS = [d * 0.01 for d in (-4, -3, -2, -1, 1, 2, 3, 4)]
_MIN_SHRINK = 0.46
_RTN_CHUNK_ELEMENTS = 1 << 22  # rows are processed in chunks of about this many weights to bound memory


@dataclass(frozen=True)
class QuantSpec:
    bits: int  # 2, 3, 4 or 8 (any integer 2..8 works)
    group_size: int  # groups run along the input dim; the last group may be shorter when in % G != 0
    symmetric: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits must be an integer in 2..8, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"QuantSpec.group_size must be a positive integer, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"QuantSpec.symmetric must be a bool, got {self.symmetric!r}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        return 1 << (self.bits - 1)

    def n_groups(self, in_features: int) -> int:
        return sizing.n_groups(in_features, self.group_size)


@dataclass
class QuantizedMatrix:
    codes: torch.Tensor  # uint8 [out, in], values in [0, 2**bits - 1]
    scales: torch.Tensor  # float16 [out, n_groups]
    zeros: torch.Tensor  # uint8 [out, n_groups]; symmetric: all equal to 2**(bits-1)
    spec: QuantSpec
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        out, inp = self.shape
        ng = self.spec.n_groups(inp)
        if self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != (out, inp):
            raise ValueError(
                f"codes must be uint8 {[out, inp]}, got {self.codes.dtype} {list(self.codes.shape)}"
            )
        if self.scales.dtype != torch.float16 or tuple(self.scales.shape) != (out, ng):
            raise ValueError(
                f"scales must be float16 {[out, ng]}, got {self.scales.dtype} {list(self.scales.shape)}"
            )
        if self.zeros.dtype != torch.uint8 or tuple(self.zeros.shape) != (out, ng):
            raise ValueError(
                f"zeros must be uint8 {[out, ng]}, got {self.zeros.dtype} {list(self.zeros.shape)}"
            )

    # -- reconstruction ---------------------------------------------------------------------------------------------
    def dequantize(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``scale * (code - zero)`` as ``dtype`` [out, in]; computed exactly in float32 from the float16 scales."""
        out, inp = self.shape
        G = self.spec.group_size
        codes = self.codes if device is None else self.codes.to(device)
        scales = self.scales if device is None else self.scales.to(device)
        zeros = self.zeros if device is None else self.zeros.to(device)
        ng = scales.shape[1]
        pad = ng * G - inp
        q = codes.to(torch.float32)
        if pad:
            q = torch.nn.functional.pad(q, (0, pad))
        q = q.view(out, ng, G)
        w = (q - zeros.to(torch.float32).unsqueeze(-1)) * scales.to(torch.float32).unsqueeze(-1)
        w = w.view(out, ng * G)
        if pad:
            w = w[:, :inp]
        return w.to(dtype)

    def nbytes(self) -> int:
        """Bytes of the packed form: codes at ``bits`` bits, float16 scales, packed zeros when asymmetric."""
        out, inp = self.shape
        return sizing.matrix_bytes(out, inp, self.spec.bits, self.spec.group_size, self.spec.symmetric)

    # -- packed form --------------------------------------------------------------------------------------------------
    def to_packed(self) -> dict[str, torch.Tensor]:
        """``{"qweight": packed codes (1-D uint8), "scales": float16 [out, n_groups]}`` plus ``"qzeros"`` (packed
        zero points, 1-D uint8) when asymmetric."""
        tensors = {
            "qweight": pack_codes(self.codes, self.spec.bits),
            "scales": self.scales.contiguous().clone(),
        }
        if not self.spec.symmetric:
            tensors["qzeros"] = pack_codes(self.zeros, self.spec.bits)
        return tensors

    @classmethod
    def from_packed(cls, tensors: dict, spec: QuantSpec, shape: tuple[int, int]) -> QuantizedMatrix:
        """Inverse of :meth:`to_packed`. Validates every tensor and raises ``ValueError`` naming what is wrong."""
        if not isinstance(spec, QuantSpec):
            raise ValueError(f"spec must be a QuantSpec, got {type(spec).__name__}")  # noqa: TRY004
        try:
            out, inp = (int(shape[0]), int(shape[1]))
            if len(shape) != 2:
                raise TypeError
        except (TypeError, ValueError, IndexError):
            raise ValueError(f"shape must be (out_features, in_features), got {shape!r}") from None
        if out < 1 or inp < 1:
            raise ValueError(f"shape must be positive, got {(out, inp)}")
        ng = spec.n_groups(inp)
        allowed = {"qweight", "scales"} | (set() if spec.symmetric else {"qzeros"})
        missing = sorted(allowed - set(tensors))
        if missing:
            raise ValueError(f"packed matrix is missing tensor(s) {missing} (have {sorted(tensors)})")
        extra = sorted(set(tensors) - allowed)
        if extra:
            kind = "symmetric" if spec.symmetric else "asymmetric"
            raise ValueError(f"packed matrix has unexpected tensor(s) {extra} for a {kind} spec")

        qweight = tensors["qweight"]
        _check_packed(qweight, "qweight", out * inp, spec.bits)
        scales = tensors["scales"]
        if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float16:
            raise ValueError(f"scales must be a float16 tensor, got {getattr(scales, 'dtype', type(scales))}")
        if tuple(scales.shape) != (out, ng):
            raise ValueError(f"scales have shape {list(scales.shape)}, expected {[out, ng]}")
        if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
            raise ValueError("scales contain non-finite or non-positive values (corrupt artifact)")

        codes = unpack_codes(qweight, spec.bits, out * inp).view(out, inp)
        if spec.symmetric:
            zeros = torch.full((out, ng), spec.sym_zero, dtype=torch.uint8, device=codes.device)
        else:
            qzeros = tensors["qzeros"]
            _check_packed(qzeros, "qzeros", out * ng, spec.bits)
            zeros = unpack_codes(qzeros, spec.bits, out * ng).view(out, ng)
        return cls(codes=codes, scales=scales.contiguous(), zeros=zeros, spec=spec, shape=(out, inp))


def _check_packed(t: Any, name: str, numel: int, bits: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")  # noqa: TRY004
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D uint8 tensor, got {t.dtype} of shape {list(t.shape)}")
    expected = packed_nbytes(numel, bits)
    if t.numel() != expected:
        raise ValueError(f"{name} has {t.numel()} bytes, expected {expected} ({numel} values at {bits} bits)")


# ---------------------------------------------------------------------------------------------------------------------
# group parameters
# ---------------------------------------------------------------------------------------------------------------------


def _compute_dtype(W: torch.Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def _params_for_shrink(
    xmin: torch.Tensor, xmax: torch.Tensor, p: torch.Tensor | float, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16-rounded, in the compute dtype) and zero point (float, integer-valued) for shrink ``p``.

    ``xmin <= 0 <= xmax`` elementwise.
    """
    maxq = spec.maxq
    if spec.symmetric:
        h = spec.sym_zero
        scale = p * torch.maximum(xmax / (h - 1), -xmin / h)
        scale = scale.clamp(_FP16_MIN_SCALE, _FP16_MAX).to(torch.float16).to(xmin.dtype)
        zero = torch.full_like(scale, float(h))
    else:
        lo = p * xmin
        scale = p * (xmax - xmin) / maxq
        scale = scale.clamp(_FP16_MIN_SCALE, _FP16_MAX).to(torch.float16).to(xmin.dtype)
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def _quant_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer-valued float codes ``clamp(round(x / scale) + zero, 0, maxq)`` (scale/zero broadcast against x)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def _find_params(x: torch.Tensor, spec: QuantSpec, clip_search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Group parameters for groups laid along the last dim of ``x`` ([..., G], zero padding allowed).

    Returns ``scale`` (float16-rounded values in x's dtype) and ``zero`` (integer-valued floats), shape ``x.shape[:-1]``.
    """
    xmin = x.amin(dim=-1).clamp(max=0)
    xmax = x.amax(dim=-1).clamp(min=0)
    scale, zero = _params_for_shrink(xmin, xmax, 1.0, spec)
    if not clip_search:
        return scale, zero

    maxq = spec.maxq

    def group_err(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        s_, z_ = s.unsqueeze(-1), z.unsqueeze(-1)
        q = _quant_codes(x, s_, z_, maxq)
        return ((q - z_) * s_ - x).square_().sum(dim=-1)

    best_err = group_err(scale, zero)
    best_p = torch.ones_like(xmin)
    for p in _COARSE_GRID[1:]:
        s, z = _params_for_shrink(xmin, xmax, p, spec)
        err = group_err(s, z)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    coarse_p = best_p.clone()
    for d in _FINE_OFFSETS:
        p = (coarse_p + d).clamp(_MIN_SHRINK, 1.0)
        s, z = _params_for_shrink(xmin, xmax, p, spec)
        err = group_err(s, z)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def _as_matrix(W: torch.Tensor) -> torch.Tensor:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2 or W.shape[0] < 1 or W.shape[1] < 1:
        raise ValueError(f"W must be a non-empty 2-D [out, in] matrix, got shape {list(W.shape)}")
    if not W.dtype.is_floating_point:
        raise ValueError(f"W must be a floating-point tensor, got {W.dtype}")
    Wc = W.detach().to(_compute_dtype(W))
    if not bool(torch.isfinite(Wc).all()):
        raise ValueError("W contains NaN or inf")
    return Wc


def _make_qm(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, shape
) -> QuantizedMatrix:
    return QuantizedMatrix(
        codes=codes.to(torch.uint8).contiguous(),
        scales=scale.to(torch.float16).contiguous(),
        zeros=zero.to(torch.uint8).contiguous(),
        spec=spec,
        shape=(int(shape[0]), int(shape[1])),
    )


# ---------------------------------------------------------------------------------------------------------------------
# RTN
# ---------------------------------------------------------------------------------------------------------------------


def _rtn_rows(W: torch.Tensor, spec: QuantSpec, clip_search: bool):
    out, inp = W.shape
    G = spec.group_size
    ng = spec.n_groups(inp)
    pad = ng * G - inp
    x = torch.nn.functional.pad(W, (0, pad)) if pad else W  # zero padding: neutral for range and error
    x = x.reshape(out, ng, G)
    scale, zero = _find_params(x, spec, clip_search)
    q = _quant_codes(x, scale.unsqueeze(-1), zero.unsqueeze(-1), spec.maxq).reshape(out, ng * G)[:, :inp]
    return q, scale, zero


def quantize_rtn(W: torch.Tensor, spec: QuantSpec, *, clip_search: bool = True) -> QuantizedMatrix:
    """Group-wise round-to-nearest quantization of ``W`` [out, in] (optionally with a per-group range search)."""
    Wc = _as_matrix(W)
    out, inp = Wc.shape
    rows = max(1, _RTN_CHUNK_ELEMENTS // max(inp, 1))
    parts = [_rtn_rows(Wc[r : r + rows], spec, clip_search) for r in range(0, out, rows)]
    q = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    scale = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    zero = torch.cat([p[2] for p in parts]) if len(parts) > 1 else parts[0][2]
    return _make_qm(q, scale, zero, spec, (out, inp))


# ---------------------------------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------------------------------


def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of ``(H + lambda I)^-1`` in float64, or None when it cannot be computed.

    ``H`` (float64) must already have its dead diagonal entries replaced. ``lambda`` starts at
    ``damp * mean(diag H)`` and grows tenfold on failure (at most 6 attempts).
    """
    n = H.shape[0]
    mean_diag = float(H.diagonal().mean())
    lam = max(float(damp), 0.0) * mean_diag
    if lam <= 0:
        lam = 1e-6 * mean_diag
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0 and bool(torch.isfinite(U).all()):
                if attempt:
                    warnings.warn(
                        f"GPTQ: Hessian not positive definite at damp={damp}; used damping {lam / mean_diag:.3g}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return U
        lam *= 10.0
    return None


def quantize_gptq(
    W: torch.Tensor,
    H: torch.Tensor | None,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    clip_search: bool = True,
) -> QuantizedMatrix:
    """GPTQ of ``W`` [out, in] against the input second moments ``H`` = sum x x^T ([in, in]).

    ``H`` None or all zero (the expert saw no tokens) falls back to :func:`quantize_rtn`.
    """
    Wc = _as_matrix(W)
    out, inp = Wc.shape
    if H is None:
        return quantize_rtn(Wc, spec, clip_search=clip_search)
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (inp, inp):
        raise ValueError(
            f"H must be a [{inp}, {inp}] tensor for W of shape {[out, inp]}, got {getattr(H, 'shape', H)}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    H64 = H.detach().to(device=Wc.device, dtype=torch.float64).clone()
    if not bool(torch.isfinite(H64).all()):
        raise ValueError("H contains NaN or inf")
    diag = H64.diagonal()
    dead = diag <= 0
    if bool(dead.all()):
        return quantize_rtn(Wc, spec, clip_search=clip_search)
    live_mean = float(diag[~dead].mean())
    if bool(dead.any()):
        # Dead inputs carry no signal: decouple them (their row/column of a PSD H is zero anyway) and give them a
        # diagonal on the scale of the live ones, so they are rounded without feeding error elsewhere.
        H64[dead, :] = 0
        H64[:, dead] = 0
        H64.diagonal()[dead] = live_mean

    cdt = Wc.dtype
    G = spec.group_size
    ng = spec.n_groups(inp)
    maxq = spec.maxq
    scales = torch.empty(out, ng, dtype=cdt, device=Wc.device)
    zeros = torch.empty(out, ng, dtype=cdt, device=Wc.device)

    if act_order:
        # static groups from the original weights
        pad = ng * G - inp
        x = torch.nn.functional.pad(Wc, (0, pad)) if pad else Wc
        s, z = _find_params(x.reshape(out, ng, G), spec, clip_search)
        scales.copy_(s)
        zeros.copy_(z)
        perm = torch.argsort(H64.diagonal(), descending=True, stable=True)
        Wp = Wc[:, perm].clone()
        Hp = H64[perm][:, perm]
        col_group = (perm // G).tolist()
        B = block_size
    else:
        perm = None
        Wp = Wc.clone()
        Hp = H64
        col_group = None
        B = max(G, (block_size // G) * G)  # aligned to groups: a group never straddles two blocks

    U64 = _inverse_hessian_factor(Hp, damp)
    if U64 is None:
        warnings.warn(
            "GPTQ: Cholesky failed even with heavy damping; falling back to RTN", RuntimeWarning, stacklevel=2
        )
        return quantize_rtn(Wc, spec, clip_search=clip_search)
    Hinv = U64.to(cdt)
    del Hp, H64

    Q = torch.empty(out, inp, dtype=cdt, device=Wc.device)  # integer-valued codes, permuted column order
    for i1 in range(0, inp, B):
        i2 = min(i1 + B, inp)
        count = i2 - i1
        W1 = Wp[:, i1:i2].clone()
        Err1 = torch.empty(out, count, dtype=cdt, device=Wc.device)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            if col_group is None:
                g = col // G
                if col % G == 0:
                    s, z = _find_params(W1[:, i : i + G], spec, clip_search)  # already-updated weights
                    scales[:, g] = s
                    zeros[:, g] = z
            else:
                g = col_group[col]
            s = scales[:, g]
            z = zeros[:, g]
            w = W1[:, i]
            q = _quant_codes(w, s, z, maxq)
            Q[:, col] = q
            err = (w - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        if i2 < inp:
            Wp[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return _make_qm(Q, scales, zeros, spec, (out, inp))


# ---------------------------------------------------------------------------------------------------------------------
# registry and error
# ---------------------------------------------------------------------------------------------------------------------

_GPTQ_ONLY = ("damp", "act_order", "block_size")


def _rtn_entry(
    W: torch.Tensor, H: torch.Tensor | None, spec: QuantSpec, *, clip_search: bool = True, **kw
) -> QuantizedMatrix:
    """Registry form of RTN: ``f(W, H, spec, **kw)``; ignores ``H`` and GPTQ-only keywords."""
    unknown = sorted(set(kw) - set(_GPTQ_ONLY))
    if unknown:
        raise TypeError(f"rtn quantizer got unexpected keyword(s) {unknown}")
    return quantize_rtn(W, spec, clip_search=clip_search)


def _gptq_entry(W: torch.Tensor, H: torch.Tensor | None, spec: QuantSpec, **kw) -> QuantizedMatrix:
    return quantize_gptq(W, H, spec, **kw)


QUANTIZERS: dict[str, Callable[..., QuantizedMatrix]] = {"rtn": _rtn_entry, "gptq": _gptq_entry}


def quantization_error(W: torch.Tensor, qm: QuantizedMatrix) -> float:
    """``||dequantize(qm) - W||_F^2`` computed in float64."""
    Wd = W.detach().to(torch.float64)
    if tuple(Wd.shape) != tuple(qm.shape):
        raise ValueError(f"W has shape {list(Wd.shape)}, quantized matrix has {list(qm.shape)}")
    D = qm.dequantize(torch.float64, device=Wd.device) - Wd
    return float(D.square().sum())
