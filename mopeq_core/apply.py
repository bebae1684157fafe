"""Quantizes experts at candidate widths, measures each width's error, and swaps weights in and out of the model.

``ExpertKey = (layer, expert)``. Quantized matrices are kept in [out, in] orientation per projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .calibrate import CalibrationStats
from .moe import ExpertGroup
from .quantize import QUANTIZERS, QuantizedMatrix, QuantSpec, quantization_error
from .sizing import expert_bytes

ExpertKey = tuple[int, int]


@dataclass
class QuantSettings:
    quantizer: str = "gptq"
    group_size: int = 128
    symmetric: bool = True
    act_order: bool = False
    damp: float = 0.01

    def spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits=bits, group_size=self.group_size, symmetric=self.symmetric)


@dataclass
class CandidateSet:
    """Every expert quantized at every width: the errors the allocator weighs, and the matrices to apply."""

    errors: dict[ExpertKey, dict[int, float]] = field(default_factory=dict)
    matrices: dict[tuple[int, int, int], dict[str, QuantizedMatrix]] = field(default_factory=dict)  # (l, e, b)


def quantize_expert(group: ExpertGroup, expert: int, bits: int | dict[str, int], stats: CalibrationStats | None,
                    qs: QuantSettings) -> dict[str, QuantizedMatrix]:
    """The expert's projections at ``bits`` (one width, or a width per projection name)."""
    out = {}
    fn = QUANTIZERS[qs.quantizer]
    for p in group.projections:
        b = bits[p.name] if isinstance(bits, dict) else bits
        W = group.weight(expert, p.name).detach().float()
        H = None
        if stats is not None and stats.hessians:
            H = stats.hessians[(group.layer, p.name)][expert].to(W.device)
        kw = {"damp": qs.damp, "act_order": qs.act_order} if qs.quantizer == "gptq" else {}
        out[p.name] = fn(W, H, qs.spec(b), **kw)
    return out


def expert_cost(group: ExpertGroup, bits: int, qs: QuantSettings) -> int:
    return expert_bytes([(p.out_features, p.in_features) for p in group.projections], bits, qs.group_size,
                        qs.symmetric)


def build_candidates(groups: list[ExpertGroup], bits_choices: tuple[int, ...], stats: CalibrationStats | None,
                     qs: QuantSettings, *, keep: bool = True, should_stop=None, on_progress=None) -> CandidateSet:
    cs = CandidateSet()
    total = sum(g.num_experts for g in groups) * len(bits_choices)
    done = 0
    for g in groups:
        for e in range(g.num_experts):
            errs = {}
            for b in bits_choices:
                if should_stop:
                    should_stop()
                qms = quantize_expert(g, e, b, stats, qs)
                errs[b] = sum(quantization_error(g.weight(e, name), qm) for name, qm in qms.items())
                if keep:
                    cs.matrices[(g.layer, e, b)] = qms
                done += 1
                if on_progress:
                    on_progress(done / total)
            cs.errors[(g.layer, e)] = errs
    return cs


def apply_fake_quant(groups: list[ExpertGroup], chosen: dict[ExpertKey, dict[str, QuantizedMatrix]]) -> None:
    """Write each expert's dequantized weights into the model (the fake-quantized model)."""
    for g in groups:
        for e in range(g.num_experts):
            for name, qm in chosen[(g.layer, e)].items():
                dst = g.weight(e, name)
                g.set_weight(e, name, qm.dequantize(dst.dtype, device=dst.device))
