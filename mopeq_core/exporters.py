"""Engine-compatible exports of a quantized MoE model: a registry keyed by ``--format`` name.

``export(fmt, out_dir, model, groups, chosen, bits, cfg) -> list[Path]`` is called by the pipeline's export stage with
the transformers model whose experts are already fake-quantized in place, its :class:`~mopeq_core.moe.ExpertGroup` s,
``chosen[(layer, expert)] = {projection: QuantizedMatrix}`` at the chosen widths, ``bits[(layer, expert)]`` and the
:class:`~mopeq_core.config.QuantizeConfig`. Every exporter first checks that its format can express the allocation and
raises :class:`~mopeq_core.errors.ExportError` (nothing written) when it cannot.

Formats (see docs/EXPORTS.md for who loads them and the exact commands):

- ``compressed-tensors``: ``pack-quantized`` int checkpoint with per-expert ``Linear`` names on disk (the Hub layout
  that transformers 5 fuses on load), written with compressed-tensors' own ``PackedQuantizationCompressor``.
  ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it on CPU (it dequantizes the experts while fusing them).
- ``gptq``: GPTQ (``checkpoint_format: "gptq"`` when symmetric, ``"gptq_v2"`` when asymmetric)
  ``qweight``/``qzeros``/``scales``/``g_idx`` per expert ``Linear`` with a GPTQModel ``dynamic`` map for experts whose width differs from the default and ``-:`` rules keeping the
  non-expert modules unquantized.
- ``gguf``: one ``model.gguf`` (llama.cpp) whose expert tensors ``blk.N.ffn_{gate,up,down}_exps.weight`` carry the
  allocated llama.cpp types (Q2_K/Q3_K/Q4_K/Q8_0, or Q4_0/Q8_0 for rows that are not a multiple of 256), written by
  :mod:`mopeq_core.gguf_export` with the tokenizer; needs one width per layer x projection.
- ``gguf-overrides``: ``tensor-types.txt`` for ``llama-quantize --tensor-type-file`` plus the fake-quantized model in
  safetensors for ``convert_hf_to_gguf.py``.

How expert rows are found on disk: the fused parameters ``gate_up_proj [E, 2F, H]`` / ``down_proj [E, H, F]`` are
replaced by float64 tensors holding each element's global index and sent through transformers' own
``revert_weight_conversion`` (what ``save_pretrained`` does). Every resulting on-disk tensor then says exactly which
expert and which rows of our ``[out, in]`` matrices it holds (e.g. Mixtral's ``experts.3.w1.weight`` = rows ``0:F`` of
expert 3's ``gate_up_proj``), whatever the architecture's conversion mapping. Layouts that are not per-expert row
slices (experts fused on disk, transposed experts) are refused.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .artifact import write_config
from .errors import ExportError

# Widths each format can express, and the up-front refusals: torch-free, shared with the web API.
from .formats import COMPRESSED_TENSORS_BITS, GGUF_TYPES, GPTQ_BITS, precheck
from .formats import CT_ASYM_MSG as _CT_ASYM_MSG
from .moe import ExpertGroup
from .quantize import QuantizedMatrix

INDEX_NAME = "model.safetensors.index.json"
ExportFn = Callable[..., list[Path]]
EXPORTERS: dict[str, ExportFn] = {}

GGUF_PROJECTIONS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def register(name: str) -> Callable[[ExportFn], ExportFn]:
    def deco(fn: ExportFn) -> ExportFn:
        EXPORTERS[name] = fn
        return fn
    return deco


def export(fmt: str, out_dir, model, groups: list[ExpertGroup], chosen, bits: dict[tuple[int, int], int],
           cfg) -> list[Path]:
    """Write ``fmt`` into ``out_dir`` and return every file written (tokenizer files are the caller's)."""
    fn = EXPORTERS.get(fmt)
    if fn is None:
        raise ExportError(f"unknown export format {fmt!r}; engine formats are {', '.join(sorted(EXPORTERS))} "
                          "(mopeq and fake are written by the pipeline itself)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return fn(out_dir, model, groups, chosen, bits, cfg)


# ---------------------------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskExpert:
    """One per-expert weight tensor of the Hub (on-disk) layout and where it comes from."""

    key: str  # on-disk state-dict key, e.g. model.layers.0.block_sparse_moe.experts.3.w1.weight
    group: ExpertGroup
    proj: str  # our projection name (gate_up_proj, down_proj, w1, ...)
    expert: int
    rows: tuple[int, int]  # rows [r0, r1) of our [out, in] matrix

    @property
    def module(self) -> str:
        return self.key[: -len(".weight")]

    def matrix(self, chosen) -> QuantizedMatrix:
        return chosen[(self.group.layer, self.expert)][self.proj]


def layer_widths(groups: list[ExpertGroup], bits: dict[tuple[int, int], int], fmt: str) -> dict[int, int]:
    """{layer: width} when every MoE layer has one width; ExportError naming the first mixed layer otherwise."""
    out = {}
    for g in groups:
        ws = sorted({bits[(g.layer, e)] for e in range(g.num_experts)})
        if len(ws) != 1:
            counts = Counter(bits[(g.layer, e)] for e in range(g.num_experts))
            raise ExportError(
                f"--format {fmt} needs one width per MoE layer, but layer {g.layer} ({g.path}) mixes "
                f"{', '.join(f'{n} experts at {b} bits' for b, n in sorted(counts.items()))}: serving engines run "
                "one scheme per fused MoE layer. Re-run with --granularity layer (or use --format mopeq for "
                "per-expert widths)")
        out[g.layer] = ws[0]
    return out


def _revert(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names and tensors as ``save_pretrained`` writes them (transformers' reverse conversion mapping)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, state)


def disk_experts(model, group: ExpertGroup, fmt: str) -> list[DiskExpert]:
    """The on-disk per-expert tensors of one MoE layer, each mapped to (expert, projection, row range)."""
    if group.transposed:
        raise ExportError(f"--format {fmt}: {group.path} stores its experts transposed ([in, out], e.g. gpt-oss); "
                          "this exporter writes per-expert nn.Linear weights only - use --format mopeq")
    # Row ids (global row index, constant along each row) and column ids, as zero-copy expanded views: the
    # reverse conversions only split/chunk/rename, so no layer-sized tensor is materialised.
    rows_ids: dict[str, torch.Tensor] = {}
    col_ids: dict[str, torch.Tensor] = {}
    spans: list[tuple[int, int, str, int | None, tuple[int, int]]] = []  # (start, end, proj, expert, (out, in))
    base = 0
    for p in group.projections:
        o, i = p.out_features, p.in_features
        if group.kind == "fused":
            n, E = group.num_experts * o, group.num_experts
            name = f"{group.path}.{p.name}"
            rows_ids[name] = torch.arange(base, base + n, dtype=torch.int64).view(E, o, 1).expand(E, o, i)
            col_ids[name] = torch.arange(i, dtype=torch.int64).view(1, 1, i).expand(E, o, i)
            spans.append((base, base + n, p.name, None, (o, i)))
            base += n
        else:
            for e in range(group.num_experts):
                name = f"{group.path}.{e}.{p.name}.weight"
                rows_ids[name] = torch.arange(base, base + o, dtype=torch.int64).view(o, 1).expand(o, i)
                col_ids[name] = torch.arange(i, dtype=torch.int64).view(1, i).expand(o, i)
                spans.append((base, base + o, p.name, e, (o, i)))
                base += o
    cols_on_disk = _revert(model, col_ids)
    out = []
    for key, t in _revert(model, rows_ids).items():
        t = t[0] if isinstance(t, list) else t
        if t.dim() != 2 or not key.endswith(".weight") or t.numel() == 0:
            raise ExportError(
                f"--format {fmt}: the checkpoint layout of {group.path} keeps its experts fused on disk "
                f"({key}: shape {list(t.shape)}); this exporter needs per-expert nn.Linear weights "
                "(use --format mopeq)")
        first = int(t[0, 0])
        span = next((s for s in spans if s[0] <= first < s[1]), None)
        if span is None:
            raise ExportError(f"--format {fmt}: cannot map on-disk tensor {key} back to an expert")
        start, _end, proj, expert, (o, i) = span
        loc = t[:, 0] - start  # global row within this projection's span
        e0 = int(loc[0]) // o
        e = e0 if expert is None else expert
        r0 = int(loc[0]) - e0 * o
        r1 = r0 + t.shape[0]
        cols = cols_on_disk.get(key)
        cols = cols[0] if isinstance(cols, list) else cols
        if (t.shape[1] != i or r1 > o or not torch.equal(loc, torch.arange(r0, r1) + e0 * o)
                or not bool((t == t[:, :1]).all()) or cols is None or tuple(cols.shape) != tuple(t.shape)
                or not bool((cols == torch.arange(i)).all())):
            raise ExportError(
                f"--format {fmt}: on-disk tensor {key} ({list(t.shape)}) is not a block of whole rows of one "
                f"expert's {proj} [{o}, {i}]; this layout is not supported (use --format mopeq)")
        out.append(DiskExpert(key, group, proj, e, (r0, r1)))
    # every row of every expert projection exactly once
    cover: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for d in out:
        cover.setdefault((d.proj, d.expert), []).append(d.rows)
    for p in group.projections:
        for e in range(group.num_experts):
            spans_ = sorted(cover.get((p.name, e), []))
            pos = 0
            for r0, r1 in spans_:
                if r0 != pos:
                    break
                pos = r1
            if pos != p.out_features or len(spans_) == 0:
                raise ExportError(f"--format {fmt}: the on-disk tensors of {group.path} do not cover expert {e}'s "
                                  f"{p.name} exactly once")
    return sorted(out, key=lambda d: (d.expert, d.key))


def _expert_index_pattern(module: str, expert: int) -> str:
    """Anchored regex for ``module`` with its expert index (the last path segment equal to it) as ``\\d+``."""
    segs = module.split(".")
    j = max(i for i, s in enumerate(segs) if s == str(expert))
    parts = [re.escape(s) for s in segs]
    parts[j] = r"\d+"
    return "^" + r"\.".join(parts) + "$"


def _collapse_numbers(names: Iterable[str], forbidden: Iterable[str]) -> list[str]:
    """Anchored regexes covering ``names`` with numeric path segments generalised to ``\\d+`` where that matches no
    ``forbidden`` name; exact (escaped) names otherwise."""
    forbidden = list(forbidden)
    out: list[str] = []
    for name in sorted(set(names)):
        segs = name.split(".")
        pat = "^" + r"\.".join(r"\d+" if s.isdigit() else re.escape(s) for s in segs) + "$"
        if any(re.match(pat, f) for f in forbidden):
            pat = "^" + re.escape(name) + "$"
        if pat not in out:
            out.append(pat)
    return out


def _non_expert_disk_state(model, groups: list[ExpertGroup]) -> dict[str, torch.Tensor]:
    from .artifact import non_expert_state

    state = _revert(model, non_expert_state(model, groups))
    return {k: (v[0] if isinstance(v, list) else v).contiguous() for k, v in state.items()}


def _loaded_non_expert_linears(model, groups: list[ExpertGroup]) -> list[str]:
    """Names of the in-memory model's nn.Linear modules that are not routed experts."""
    expert_roots = [g.path for g in groups]
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not any(name == r or name.startswith(r + ".") for r in expert_roots):
            names.append(name)
    return names




class _ShardWriter:
    """HF-style shards: one for the non-expert weights, one per MoE layer, and the index."""

    def __init__(self, out_dir: Path, n: int, fmt: str):
        self.out_dir, self.n, self.fmt = out_dir, n, fmt
        self.i = 0
        self.weight_map: dict[str, str] = {}
        self.files: list[Path] = []
        for stale in out_dir.glob("model*.safetensors"):
            stale.unlink()

    def write(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        self.i += 1
        name = f"model-{self.i:05d}-of-{self.n:05d}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(self.out_dir / name),
                  metadata={"format": "pt", "mopeq": f"{self.fmt}: {what}"})
        self.weight_map.update({k: name for k in tensors})
        self.files.append(self.out_dir / name)

    def finish(self) -> list[Path]:
        total = sum((self.out_dir / f).stat().st_size for f in set(self.weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=1))
        return self.files + [self.out_dir / INDEX_NAME]


def _check_layers_consistent(groups: list[ExpertGroup], chosen, bits, cfg) -> None:
    for g in groups:
        for e in range(g.num_experts):
            for p in g.projections:
                qm = chosen[(g.layer, e)][p.name]
                if qm.spec.bits != bits[(g.layer, e)] or qm.spec.group_size != cfg.group_size \
                        or qm.spec.symmetric != cfg.symmetric:
                    raise ExportError(f"{g.path} expert {e} {p.name}: quantized at {qm.spec} but the bit map says "
                                      f"{bits[(g.layer, e)]} bits, group size {cfg.group_size}")


# ---------------------------------------------------------------------------------------------------------------------
# compressed-tensors
# ---------------------------------------------------------------------------------------------------------------------

_CT_MIXED_MSG = (
    "--format compressed-tensors: different MoE layers have different widths ({widths}), written as one config group "
    "per width with per-layer targets. transformers {tv} decodes every fused expert with the first experts group "
    "(a bug: layers of the other width load wrong, without an error); load this checkpoint with "
    "mopeq_core.loader.load_compressed_tensors (from_pretrained with the carried fix), see docs/EXPORTS.md")


def _ct_scheme(bits: int, group_size: int, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(
        targets=targets,
        weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size,
                                 dynamic=False),
        format="pack-quantized")


def _ct_pack(qm: QuantizedMatrix, rows: tuple[int, int], scheme) -> dict[str, torch.Tensor]:
    """compressed-tensors' PackedQuantizationCompressor on rows r0:r1 of ``qm`` (scales kept in float32)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32

    r0, r1 = rows
    b = qm.spec.bits
    sub = QuantizedMatrix(codes=qm.codes[r0:r1], scales=qm.scales[r0:r1], zeros=qm.zeros[r0:r1], spec=qm.spec,
                          shape=(r1 - r0, qm.shape[1]))
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    # float32 scales: float16 scale x integer code is exact in float32 (not in float16 for 8-bit codes), so the
    # dequantized checkpoint reproduces the fake-quantized weights bit for bit.
    state = {"weight": sub.dequantize(torch.float32), "weight_scale": sub.scales.to(torch.float32).contiguous()}
    packed = compressor.compress(state, scheme)
    signed = (sub.codes.to(torch.int16) - (1 << (b - 1))).to(torch.int8)
    if not torch.equal(unpack_from_int32(packed["weight_packed"], b, packed["weight_shape"]), signed):
        raise ExportError("compressed-tensors packing did not reproduce the quantized codes (internal error)")
    return packed


def write_compressed_tensors(out_dir: Path, model, groups: list[ExpertGroup], chosen,
                             widths: dict[int, int], group_size: int) -> list[Path]:
    """Write the checkpoint for per-layer ``widths`` (several widths -> one config group per width, per-layer regex
    targets; one width -> ``targets: ["Linear"]``, the llm-compressor convention). No checks beyond layout."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    fmt = "compressed-tensors"
    plans = {g.layer: disk_experts(model, g, fmt) for g in groups}
    expert_modules = [d.module for ds in plans.values() for d in ds]
    uniform = len(set(widths.values())) == 1
    targets: dict[int, list[str]] = {}
    for g in groups:
        pats = targets.setdefault(widths[g.layer], [])
        for d in plans[g.layer]:
            p = "re:" + _expert_index_pattern(d.module, d.expert)
            if p not in pats:
                pats.append(p)
    schemes = {f"group_{i}": _ct_scheme(b, group_size, ["Linear"] if uniform else targets[b])
               for i, b in enumerate(sorted(targets))}

    writer = _ShardWriter(out_dir, len(groups) + 1, fmt)
    base = _non_expert_disk_state(model, groups)
    ignore_names = {k[: -len(".weight")] for k, v in base.items() if k.endswith(".weight") and v.dim() == 2}
    ignore_names |= set(_loaded_non_expert_linears(model, groups))
    writer.write(base, "non-expert weights")
    del base
    by_bits = {b: name for name, s in schemes.items() for b in [s.weights.num_bits]}
    for g in groups:
        scheme = schemes[by_bits[widths[g.layer]]]
        tensors = {}
        for d in plans[g.layer]:
            for part, t in _ct_pack(d.matrix(chosen), d.rows, scheme).items():
                tensors[f"{d.module}.{part}"] = t
        writer.write(tensors, f"experts of layer {g.layer} ({widths[g.layer]}-bit)")
    files = writer.finish()
    qc = QuantizationConfig(config_groups=schemes, format="pack-quantized", quantization_status="compressed",
                            ignore=sorted(ignore_names - set(expert_modules)))
    qdict = qc.model_dump()
    qdict["version"] = compressed_tensors.__version__
    files += write_config(out_dir, model, qdict)
    return files


@register("compressed-tensors")
def export_compressed_tensors(out_dir: Path, model, groups, chosen, bits, cfg) -> list[Path]:
    import transformers

    fmt = "compressed-tensors"
    if not cfg.symmetric:
        raise ExportError(_CT_ASYM_MSG)
    widths = layer_widths(groups, bits, fmt)
    bad = sorted(set(widths.values()) - set(COMPRESSED_TENSORS_BITS))
    if bad:
        raise ExportError(f"--format compressed-tensors takes widths 4 and 8 only (vLLM's compressed-tensors MoE "
                          f"kernels); layers {[l_ for l_, b in widths.items() if b in bad]} got {bad} bits: use "
                          "--granularity layer --bits 4 or --bits 8, or --format gptq / mopeq")
    if len(set(widths.values())) > 1:
        import logging

        logging.getLogger(__name__).warning(_CT_MIXED_MSG.format(
            widths=", ".join(f"layer {l_}: {b}-bit" for l_, b in sorted(widths.items())), tv=transformers.__version__))
    for g in groups:
        for p in g.projections:
            if p.in_features % cfg.group_size:
                raise ExportError(f"--format compressed-tensors: {g.path}.{p.name} has {p.in_features} input "
                                  f"features, not a multiple of --group-size {cfg.group_size} (the group strategy "
                                  "of compressed-tensors needs whole groups)")
    _check_layers_consistent(groups, chosen, bits, cfg)
    return write_compressed_tensors(out_dir, model, groups, chosen, widths, cfg.group_size)


# ---------------------------------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------------------------------


def pack_dense_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """GPTQ packing: unsigned ``bits``-bit values packed densely along ``dim`` (0 or 1) into int32 words, value ``i``
    at bit ``i * bits`` of the little-endian bit stream (for 3 bits: 32 values in 3 words, as AutoGPTQ/GPTQModel).
    The length along ``dim`` must make whole words (multiple of 32 / gcd(32, bits) values)."""
    v = values.to(torch.int64)
    if dim == 0:
        v = v.t()
    rows, n = v.shape
    per = 32 // math.gcd(32, bits)  # values in one whole number of words
    if n % per:
        raise ValueError(f"{n} values do not fill whole int32 words at {bits} bits")
    wpb = per * bits // 32  # words per block of `per` values
    blocks = v.reshape(rows, n // per, per)
    out = torch.zeros(rows, n // per, wpb, dtype=torch.int64)
    for j in range(per):  # at most 32 steps, each vectorised over all rows and blocks
        pos = j * bits
        w, off = pos // 32, pos % 32
        out[:, :, w] |= (blocks[:, :, j] << off) & 0xFFFFFFFF
        spill = off + bits - 32
        if spill > 0:
            out[:, :, w + 1] |= blocks[:, :, j] >> (bits - spill)
    out = out.reshape(rows, n * bits // 32)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.t().contiguous() if dim == 0 else out.contiguous()


def _gptq_tensors(qm: QuantizedMatrix, rows: tuple[int, int], v1: bool) -> dict[str, torch.Tensor]:
    """qweight/qzeros/scales/g_idx of rows r0:r1 (GPTQ ``[in, out]`` orientation). ``v1`` stores zero - 1 (the
    AutoGPTQ convention, ``checkpoint_format: gptq``); v2 (``gptq_v2``) stores the zero points as they are."""
    r0, r1 = rows
    b, G = qm.spec.bits, qm.spec.group_size
    codes = qm.codes[r0:r1]  # [N, K]
    scales = qm.scales[r0:r1]  # [N, ng]
    zeros = qm.zeros[r0:r1].to(torch.int64)  # [N, ng]
    K = codes.shape[1]
    stored = ((zeros - 1) & ((1 << b) - 1)) if v1 else zeros
    return {
        "qweight": pack_dense_int32(codes.t(), b, dim=0),  # [K * b / 32, N]
        "qzeros": pack_dense_int32(stored.t(), b, dim=1),  # [ng, N * b / 32]
        "scales": scales.t().contiguous().to(torch.float16),  # [ng, N]
        "g_idx": (torch.arange(K, dtype=torch.int32) // G).to(torch.int32),
    }


def _split_at_expert(module: str, expert: int) -> tuple[str, str]:
    """``model.layers.0.mlp.experts.3.gate_proj`` -> (``model.layers.0.mlp.experts``, ``gate_proj``)."""
    segs = module.split(".")
    j = max(i for i, s in enumerate(segs) if s == str(expert))
    return ".".join(segs[:j]), ".".join(segs[j + 1:])


def _gptq_width_rules(plan: list[DiskExpert], experts: list[int] | None) -> list[str]:
    """Anchored regexes for the expert Linears of one layer: all experts (``experts`` None; the pattern also matches
    the fused-experts module itself, the prefix vLLM's FusedMoE passes) or only the listed ones."""
    tails: dict[str, set[str]] = {}
    for d in plan:
        if experts is None or d.expert in experts:
            head, tail = _split_at_expert(d.module, d.expert)
            tails.setdefault(head, set()).add(tail)
    rules = []
    for head, ts in sorted(tails.items()):
        tail = "(" + "|".join(re.escape(t) for t in sorted(ts)) + ")"
        if experts is None:
            rules.append(f"^{re.escape(head)}(\\.\\d+\\.{tail})?$")
        else:
            rules.append(f"^{re.escape(head)}\\.({'|'.join(str(e) for e in sorted(experts))})\\.{tail}$")
    return rules


@register("gptq")
def export_gptq(out_dir: Path, model, groups, chosen, bits, cfg) -> list[Path]:
    from . import __version__

    fmt = "gptq"
    used = sorted(set(bits.values()))
    bad = [b for b in used if b not in GPTQ_BITS]
    if bad:
        raise ExportError(f"--format gptq packs widths {list(GPTQ_BITS)}; this allocation uses {bad}")
    _check_layers_consistent(groups, chosen, bits, cfg)
    for g in groups:
        wset = {bits[(g.layer, e)] for e in range(g.num_experts)}
        for p in g.projections:
            for b in wset:
                per = 32 // math.gcd(32, b)
                if p.in_features % per or p.out_features % per:
                    raise ExportError(
                        f"--format gptq: {g.path}.{p.name} is [{p.out_features}, {p.in_features}]; GPTQ packs "
                        f"{b}-bit values {per} at a time along both dimensions (qweight along inputs, qzeros along "
                        "outputs), which these sizes do not fill")
    plans = {g.layer: disk_experts(model, g, fmt) for g in groups}
    # Symmetric: v1 (zero point 2**(b-1), stored as 2**(b-1) - 1), what every GPTQ loader reads. Asymmetric: v1 cannot
    # store a zero point of 0 (zero - 1 = -1 overflows the field) and GPTQ zero points are 0 whenever a group's range
    # barely crosses zero, so asymmetric exports use GPTQModel's gptq_v2 layout (zero points stored as they are).
    v1 = bool(cfg.symmetric)
    checkpoint_format = "gptq" if v1 else "gptq_v2"

    # default width: the one most expert modules use (ties -> the wider)
    module_bits = Counter(bits[(d.group.layer, d.expert)] for ds in plans.values() for d in ds)
    default = max(module_bits, key=lambda b: (module_bits[b], b))
    expert_modules = [d.module for ds in plans.values() for d in ds]

    writer = _ShardWriter(out_dir, len(groups) + 1, fmt)
    base = _non_expert_disk_state(model, groups)
    skip_names = {k[: -len(".weight")] for k, v in base.items() if k.endswith(".weight") and v.dim() == 2}
    skip_names |= set(_loaded_non_expert_linears(model, groups))
    writer.write(base, "non-expert weights")
    del base

    dynamic: dict[str, dict] = {}
    for pat in _collapse_numbers(skip_names, expert_modules + [g.path for g in groups]):
        dynamic[f"-:{pat}"] = {}
    for g in groups:
        tensors = {}
        for d in plans[g.layer]:
            for part, t in _gptq_tensors(d.matrix(chosen), d.rows, v1).items():
                tensors[f"{d.module}.{part}"] = t
        writer.write(tensors, f"experts of layer {g.layer}")
        layer_bits = {e: bits[(g.layer, e)] for e in range(g.num_experts)}
        if len(set(layer_bits.values())) == 1:
            b = next(iter(layer_bits.values()))
            if b != default:
                dynamic.update({f"+:{r}": {"bits": b} for r in _gptq_width_rules(plans[g.layer], None)})
        else:
            for b in sorted(set(layer_bits.values()) - {default}):
                experts = [e for e, x in layer_bits.items() if x == b]
                dynamic.update({f"+:{r}": {"bits": b} for r in _gptq_width_rules(plans[g.layer], experts)})
    files = writer.finish()
    qc = {
        "quant_method": "gptq", "checkpoint_format": checkpoint_format, "format": checkpoint_format,
        "bits": default, "group_size": cfg.group_size,
        "sym": bool(cfg.symmetric), "desc_act": False, "static_groups": bool(getattr(cfg, "act_order", False)),
        "true_sequential": True, "lm_head": False, "pack_dtype": "int32", "damp_percent": 0.01,
        "dynamic": dynamic,
        "meta": {"quantizer": [f"mopeq:{__version__}"], "mopeq_quantizer": cfg.quantizer},
    }
    files += write_config(out_dir, model, qc)
    (out_dir / "quantize_config.json").write_text(json.dumps(qc, indent=2))  # what AutoGPTQ/GPTQModel look for
    files.append(out_dir / "quantize_config.json")
    return files


# ---------------------------------------------------------------------------------------------------------------------
# llama.cpp (GGUF) tensor-type overrides
# ---------------------------------------------------------------------------------------------------------------------


def gguf_tensor_type_lines(groups: list[ExpertGroup], bits: dict[tuple[int, int], int]) -> list[str]:
    widths = layer_widths(groups, bits, "gguf-overrides")
    bad = sorted(set(widths.values()) - set(GGUF_TYPES))
    if bad:
        raise ExportError(f"--format gguf-overrides maps widths {sorted(GGUF_TYPES)} to "
                          f"{', '.join(GGUF_TYPES.values())}; this allocation uses {bad}")
    return [f"blk.{layer}.{proj}={GGUF_TYPES[b]}" for layer, b in sorted(widths.items())
            for proj in GGUF_PROJECTIONS]


@register("gguf-overrides")
def export_gguf_overrides(out_dir: Path, model, groups, chosen, bits, cfg) -> list[Path]:
    lines = gguf_tensor_type_lines(groups, bits)  # refuses before anything is written
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    model.save_pretrained(out_dir)
    path = out_dir / "tensor-types.txt"
    path.write_text("\n".join(lines) + "\n")  # llama-quantize: pattern=type tokens, no comments
    files = sorted(out_dir.glob("model*.safetensors")) + [out_dir / "config.json", path]
    if (out_dir / INDEX_NAME).exists():
        files.append(out_dir / INDEX_NAME)
    if (out_dir / "generation_config.json").exists():
        files.append(out_dir / "generation_config.json")
    return files


@register("gguf")
def export_gguf(out_dir: Path, model, groups, chosen, bits, cfg) -> list[Path]:
    """One ``model.gguf`` (see :mod:`mopeq_core.gguf_export`); widths per layer x projection from ``chosen``."""
    from .gguf_export import write_gguf

    for stale in out_dir.glob("*.gguf"):
        stale.unlink()
    path = out_dir / "model.gguf"
    tmp = out_dir / "model.gguf.partial"
    try:
        write_gguf(tmp, model, groups, chosen)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return [path]


def gguf_commands(out_dir: str = "DIR", llama_cpp: str = "llama.cpp") -> list[str]:
    """The two commands that turn a gguf-overrides export into a mixed-precision GGUF."""
    return [
        f"python {llama_cpp}/convert_hf_to_gguf.py {out_dir} --outtype f16 --outfile {out_dir}/model-f16.gguf",
        (f"{llama_cpp}/build/bin/llama-quantize --tensor-type-file {out_dir}/tensor-types.txt "
        f"{out_dir}/model-f16.gguf {out_dir}/model-mopeq.gguf Q8_0"),
    ]


__all__ = [
    "EXPORTERS",
    "disk_experts",
    "export",
    "gguf_commands",
    "gguf_tensor_type_lines",
    "layer_widths",
    "pack_dense_int32",
    "precheck",
    "register",
    "write_compressed_tensors",
]
