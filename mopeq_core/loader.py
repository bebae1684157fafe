"""``load_quantized(DIR)``: a transformers model whose experts stay packed in memory.

The model skeleton is built with parameters on the meta device (buffers such as RoPE tables stay real), the
non-expert weights are assigned from the artifact, and each experts module gets its packed codes as buffers plus a
forward that dequantizes only the experts a batch routes to. Anything malformed raises ArtifactError naming the file.
"""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path

import torch
from torch import nn

from .artifact import INDEX_NAME, packed_key
from .errors import ArtifactError
from .moe import ExpertGroup, find_expert_groups
from .quantize import QuantizedMatrix, QuantSpec

_PARTS = ("qweight", "scales", "qzeros")


@contextlib.contextmanager
def _parameters_on_meta():
    """New nn.Parameters are created on the meta device; buffers are not (they hold computed constants)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _buffer_name(proj: str, expert: int, part: str) -> str:
    return f"mopeq_{proj}_{expert}_{part}"


def _read_index(path: Path) -> dict[str, str]:
    idx_file = path / INDEX_NAME
    if not idx_file.is_file():
        raise ArtifactError(f"{idx_file} is missing: {path} is not a complete MoPEQ artifact")
    try:
        index = json.loads(idx_file.read_text())
        return dict(index["weight_map"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{idx_file} is malformed: {exc}") from exc


def _read_shards(path: Path, weight_map: dict[str, str]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(set(weight_map.values())):
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{f} is missing (named in {INDEX_NAME})")
        try:
            part = load_file(str(f))
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
            raise ArtifactError(f"{f} is not a readable safetensors file (truncated or corrupt): {exc}") from exc
        for k in weight_map:
            if weight_map[k] == name and k not in part:
                raise ArtifactError(f"{f} lacks tensor {k} named in {INDEX_NAME}")
        tensors.update(part)
    return tensors


def _to_planes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """3-bit codes re-laid in memory as a 2-bit plane (low bits) then a 1-bit plane (high bit): the same
    ceil(n/4) + ceil(n/8) ~ 3n/8 bytes, but unpacked with byte shifts only (no codes straddle bytes)."""
    from .packing import pack_codes, unpack_codes

    codes = unpack_codes(packed, 3, numel)
    return torch.cat([pack_codes(codes & 3, 2), pack_codes(codes >> 2, 1)])


def _unpack_rows(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Codes of several equally shaped packed matrices at once: ``packed`` [n, nbytes] uint8 (the layout of
    :func:`mopeq_core.packing.pack_codes`) -> [n, numel] uint8. No validation (done once at load)."""
    n = packed.shape[0]
    if bits == 8:
        return packed[:, :numel]
    if 8 % bits == 0:  # 1, 2, 4 bits: codes never straddle bytes
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(n, -1)[:, :numel]
    # 3, 5, 6, 7 bits: 8 codes in `bits` whole bytes -> one integer word per chunk
    chunks = -(-packed.shape[1] // bits)
    if chunks * bits != packed.shape[1]:
        packed = torch.nn.functional.pad(packed, (0, chunks * bits - packed.shape[1]))
    wide = torch.int32 if bits <= 3 else torch.int64
    b = packed.view(n, chunks, bits).to(wide)
    word = b[..., 0]
    for j in range(1, bits):
        word = word | (b[..., j] << (8 * j))
    shifts = torch.arange(0, 8 * bits, bits, dtype=wide, device=packed.device)
    return ((word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(n, -1)[:, :numel]


_LUTS: dict[tuple, torch.Tensor] = {}


def _lut(bits: int, offset: float, scale: int, device) -> torch.Tensor:
    """[256, 8 // bits] float32: the codes that one byte holds (``bits`` in 1, 2, 4, 8), times ``scale``, minus
    ``offset``: byte -> values in one gather."""
    key = (bits, offset, scale, str(device))
    t = _LUTS.get(key)
    if t is None:
        b = torch.arange(256, dtype=torch.int64).unsqueeze(-1)
        shifts = torch.arange(0, 8, bits, dtype=torch.int64)
        t = (((b >> shifts) & ((1 << bits) - 1)) * scale).to(torch.float32) - offset
        t = _LUTS[key] = t.to(device)
    return t


def _gather(lut: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """lut[byte] for every byte (index_select: an order of magnitude faster than advanced indexing on CPU)."""
    return lut.index_select(0, packed.reshape(-1).int())


def _codes_minus(qweight: torch.Tensor, bits: int, numel: int, offset: float, planes: bool) -> torch.Tensor:
    """[n, numel] float32 ``code - offset`` of n packed matrices (exact: small integers)."""
    n = qweight.shape[0]
    if planes and bits == 3:
        n_lo = -(-numel // 4)
        lo = _gather(_lut(2, offset, 1, qweight.device), qweight[:, :n_lo]).view(n, -1)[:, :numel]
        hi = _gather(_lut(1, 0.0, 4, qweight.device), qweight[:, n_lo:]).view(n, -1)[:, :numel]
        return lo + hi
    if 8 % bits == 0:
        return _gather(_lut(bits, offset, 1, qweight.device), qweight).view(n, -1)[:, :numel]
    return _unpack_rows(qweight, bits, numel).to(torch.float32) - offset


def _dequantize_rows(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, spec: QuantSpec,
                     shape: tuple[int, int], dtype: torch.dtype, planes: bool = False) -> torch.Tensor:
    """[n, out, in] weights of n packed matrices of one width: ``scale * (code - zero)`` in float32 (bit-identical
    to :meth:`QuantizedMatrix.dequantize`), cast to ``dtype``. ``planes``: 3-bit codes are in
    :func:`_to_planes`' layout."""
    n = qweight.shape[0]
    out, inp = shape
    ng = scales.shape[-1]
    G = spec.group_size
    offset = float(1 << (spec.bits - 1)) if qzeros is None else 0.0
    q = _codes_minus(qweight, spec.bits, out * inp, offset, planes).view(n, out, inp)
    if ng * G != inp:
        q = torch.nn.functional.pad(q, (0, ng * G - inp))
    q = q.view(n, out, ng, G)
    s = scales.to(torch.float32).unsqueeze(-1)
    if qzeros is None:
        w = q * s
    else:
        z = _unpack_rows(qzeros, spec.bits, out * ng).view(n, out, ng, 1).to(torch.float32)
        w = (q - z) * s
    w = w.view(n, out, ng * G)
    if ng * G != inp:
        w = w[..., :inp]
    return w.to(dtype)


def _qlinear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, G: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T`` for ``W = s * q`` group-wise (q [out, in] = code - zero, s [out, n_groups]) without forming W:
    each group's partial product is scaled after the matmul, so the [out, in] scale multiply is never done."""
    inp = q.shape[1]
    y = None
    for g in range(s.shape[1]):
        a, b = g * G, min(inp, (g + 1) * G)
        part = nn.functional.linear(x[..., a:b], q[:, a:b]) * s[:, g]
        y = part if y is None else y + part
    return y if bias is None else y + bias


_MAX_SCALED_GROUPS = 4  # beyond this many groups per row, dequantizing the matrix once is cheaper


def _scaled_ok(group: ExpertGroup, specs: dict[str, list[QuantSpec]]) -> bool:
    """Symmetric, [out, in] experts with few groups per row: the scale-after-matmul path applies."""
    every = [s for ss in specs.values() for s in ss]
    return (group.kind == "fused" and not group.transposed and all(s.symmetric for s in every)
            and all(-(-p.in_features // s.group_size) <= _MAX_SCALED_GROUPS for p in group.projections for s in every))


def _joint(group: ExpertGroup, specs: dict[str, list[QuantSpec]], e: int) -> QuantSpec | None:
    """The spec shared by all projections of expert ``e`` when its codes are kept as one joint buffer."""
    ss = {specs[p.name][e] for p in group.projections}
    return ss.pop() if len(ss) == 1 and _scaled_ok(group, specs) else None


def _packed_fused_forward(group: ExpertGroup, specs: dict[str, list[QuantSpec]]):
    from .moe import _bias

    module = group.module
    proj_shapes = {p.name: (p.out_features, p.in_features) for p in group.projections}
    in_name = next(p.name for p in group.projections if p.role == "in")
    scaled_ok = _scaled_ok(group, specs)
    joint = {e: _joint(group, specs, e) for e in range(group.num_experts)}
    numels = [o * i for o, i in proj_shapes.values()]

    def buf(name: str, e: int, part: str):
        return getattr(module, _buffer_name(name, e, part), None)

    def rows(name: str, es: list[int], part: str) -> torch.Tensor:
        return buf(name, es[0], part).unsqueeze(0) if len(es) == 1 else torch.stack([buf(name, e, part) for e in es])

    def prepare(experts: list[int], dtype) -> dict[int, dict[str, tuple]]:
        """Every routed expert's matrices, decoded once per layer visit: one gather per (projection, width).
        ("q", codes - zero, scales) on the scaled path; ("w", weight) otherwise."""
        out: dict[int, dict[str, tuple]] = {e: {} for e in experts}
        # experts whose projections share a width: one joint code buffer, one gather for all their projections
        by_joint: dict[QuantSpec, list[int]] = {}
        for e in experts:
            if joint[e] is not None:
                by_joint.setdefault(joint[e], []).append(e)
        for spec, es in by_joint.items():
            qw = rows("joint", es, "qweight")
            q_all = _codes_minus(qw, spec.bits, sum(numels), float(1 << (spec.bits - 1)), True).to(dtype)
            start = 0
            for name, (o, i) in proj_shapes.items():
                q = q_all[:, start:start + o * i].view(-1, o, i)
                start += o * i
                s = rows(name, es, "scales").to(torch.float32).to(dtype)
                for k, e in enumerate(es):
                    out[e][name] = ("q", q[k], s[k], spec.group_size)
        rest = [e for e in experts if joint[e] is None]
        for name, (o, i) in proj_shapes.items():
            by_spec: dict[QuantSpec, list[int]] = {}
            for e in rest:
                by_spec.setdefault(specs[name][e], []).append(e)
            for spec, es in by_spec.items():
                qw, sc = rows(name, es, "qweight"), rows(name, es, "scales")
                if scaled_ok:
                    q = _codes_minus(qw, spec.bits, o * i, float(1 << (spec.bits - 1)), True).view(-1, o, i)
                    q, s = q.to(dtype), sc.to(torch.float32).to(dtype)
                    for k, e in enumerate(es):
                        out[e][name] = ("q", q[k], s[k], spec.group_size)
                else:
                    qz = None if spec.symmetric else rows(name, es, "qzeros")
                    w = _dequantize_rows(qw, sc, qz, spec, (o, i), dtype, planes=True)
                    for k, e in enumerate(es):
                        out[e][name] = ("w", w[k])
        return out

    def apply(m, x, e: int, name: str) -> torch.Tensor:
        kind, *rest = m[name]
        if kind == "q":
            return _qlinear(x, rest[0], rest[1], rest[2], _bias(module, name, e))
        return nn.functional.linear(x, rest[0], _bias(module, name, e))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        experts = [e for e in torch.unique(top_k_index).tolist() if 0 <= e < group.num_experts]
        mats = prepare(experts, hidden_states.dtype)
        for e in experts:
            token_idx, pos = torch.where(top_k_index == e)
            x = hidden_states[token_idx]
            h = apply(mats[e], x, e, in_name)
            inter = self._apply_gate(h) if getattr(self, "has_gate", True) else self.act_fn(h)
            y = apply(mats[e], inter, e, "down_proj")
            y = y * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    return forward


class PackedLinear(nn.Module):
    """A Linear whose weight is stored packed and dequantized on every call."""

    def __init__(self, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int],
                 bias: torch.Tensor | None):
        super().__init__()
        self.spec, self.shape = spec, shape
        self.in_features, self.out_features = shape[1], shape[0]
        for part, t in tensors.items():
            self.register_buffer(part, t)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._parts = tuple(tensors)

    def forward(self, x):
        qz = getattr(self, "qzeros", None)
        w = _dequantize_rows(self.qweight.unsqueeze(0), self.scales.unsqueeze(0),
                             None if qz is None else qz.unsqueeze(0), self.spec, self.shape, x.dtype)[0]
        return nn.functional.linear(x, w, self.bias)


def _projection_specs(group: ExpertGroup, info: dict, qc: dict, where: Path) -> dict[str, list[QuantSpec]]:
    """{projection: [QuantSpec per expert]}: ``bits`` per expert, or per projection where the module lists
    ``proj_bits`` ({projection: [width per expert]}, granularity layer-projection)."""
    per_proj = info.get("proj_bits") or {}
    for proj, ws in per_proj.items():
        if proj not in {p.name for p in group.projections} or len(ws) != group.num_experts:
            raise ArtifactError(f"{where}/config.json: {group.path} proj_bits[{proj!r}] does not give one width per "
                                f"expert of a projection of this module")
    return {p.name: [QuantSpec(bits=int(b), group_size=int(qc["group_size"]), symmetric=bool(qc["symmetric"]))
                     for b in per_proj.get(p.name, info["bits"])] for p in group.projections}


def _install_packed(group: ExpertGroup, info: dict, tensors: dict[str, torch.Tensor], qc: dict, where: Path):
    bits = info["bits"]
    if len(bits) != group.num_experts:
        raise ArtifactError(f"{where}/config.json: {group.path} lists {len(bits)} widths for "
                            f"{group.num_experts} experts")
    specs = _projection_specs(group, info, qc, where)

    def take(proj: str, e: int) -> dict[str, torch.Tensor]:
        got = {}
        for part in _PARTS:
            key = packed_key(group.path, proj, e, part)
            if key in tensors:
                got[part] = tensors.pop(key)
        try:  # validate now: a truncated or inconsistent tensor fails at load, never as garbage output
            QuantizedMatrix.from_packed(got, specs[proj][e], tuple(info["projections"][proj]))
        except (ValueError, KeyError) as exc:
            raise ArtifactError(f"{where}: packed tensors of {group.path}.{proj}.{e} are invalid: {exc}") from exc
        return got

    if group.kind == "fused":
        from .packing import pack_codes, unpack_codes

        codes: dict[int, list[torch.Tensor]] = {}
        for p in group.projections:
            group.module._parameters.pop(p.name, None)
            for e in range(group.num_experts):
                joint = _joint(group, specs, e)
                for part, t in take(p.name, e).items():
                    if part == "qweight" and joint is not None:  # kept below as one buffer per expert
                        codes.setdefault(e, []).append(unpack_codes(t, joint.bits, p.out_features * p.in_features))
                        continue
                    if part == "qweight" and specs[p.name][e].bits == 3:  # same bytes, faster to unpack
                        t = _to_planes(t, p.out_features * p.in_features)
                    group.module.register_buffer(_buffer_name(p.name, e, part), t)
        for e, cs in codes.items():  # the expert's projections' codes, concatenated (same bytes at 2/4/8 bits)
            all_codes = torch.cat(cs)
            bits = _joint(group, specs, e).bits
            packed = pack_codes(all_codes, bits)
            t = _to_planes(packed, all_codes.numel()) if bits == 3 else packed
            group.module.register_buffer(_buffer_name("joint", e, "qweight"), t)
        group.module.forward = types.MethodType(_packed_fused_forward(group, specs), group.module)
    else:
        for e in range(group.num_experts):
            expert = group.module[e]
            for p in group.projections:
                lin = getattr(expert, p.name)
                bias_key = f"{group.path}.{e}.{p.name}.bias"
                bias = tensors.pop(bias_key, None) if lin.bias is not None else None
                setattr(expert, p.name, PackedLinear(take(p.name, e), specs[p.name][e],
                                                     (p.out_features, p.in_features), bias))


def _check_remote_code(raw: dict, path: Path, trust_remote_code: bool) -> None:
    """A remote-code artifact needs trust and its modeling files beside config.json; say so instead of letting
    transformers fail with an OSError/ValueError (or prompt on stdin)."""
    from .models import is_native

    auto_map = raw.get("auto_map")
    if not auto_map or is_native(raw):  # native implementation: the auto_map is not used
        return
    from .errors import RemoteCodeRequiredError

    if not trust_remote_code:
        raise RemoteCodeRequiredError(f"{path} is a remote-code model (config.json has auto_map); pass "
                                      "trust_remote_code=True only if you trust its code")
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, (list, tuple)) else [v]) if r]
    missing = sorted({r.rsplit(".", 1)[0] + ".py" for r in refs if "--" not in r
                      and not (path / (r.rsplit(".", 1)[0] + ".py")).is_file()})
    if missing:
        raise ArtifactError(f"{path} lacks the modeling code its config.json names in auto_map ({', '.join(missing)}"
                            "): copy those files from the source model into the artifact")


def load_quantized(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   attn_implementation: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoConfig

    from .models import trust_for
    from .multimodal import auto_model_class

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ArtifactError(f"{cfg_file} is missing")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{cfg_file} is not valid JSON: {exc}") from exc
    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") != "mopeq":
        raise ArtifactError(f"{cfg_file} has no mopeq quantization_config; load it with from_pretrained instead")
    trust_remote_code = trust_for(raw, trust_remote_code)  # a native model_type wins over auto_map
    _check_remote_code(raw, path, trust_remote_code)
    tensors = _read_shards(path, _read_index(path))

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    kwargs = {"experts_implementation": "eager"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with _parameters_on_meta():
        # VLMs: the image-text class, so the vision tower and projector are part of the skeleton.
        model = auto_model_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **kwargs)
    groups = {g.path: g for g in find_expert_groups(model)}
    for module_path, info in qc["modules"].items():
        if module_path not in groups:
            raise ArtifactError(f"{cfg_file}: module {module_path} is not an experts module of this model")
        _install_packed(groups[module_path], info, tensors, qc, path)
    leftovers = [k for k in tensors if k.endswith((".qweight", ".scales", ".qzeros"))]
    if leftovers:
        raise ArtifactError(f"{path}: packed tensors not described by config.json, e.g. {leftovers[:3]}")
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ArtifactError(f"{path}: unexpected tensors {result.unexpected_keys[:5]}")
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings",
                                                                False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ArtifactError(f"{path}: the artifact lacks weights {missing[:5]}")
    return model.to(device).eval()


def load_packed_matrices(path: str | Path, groups: list[ExpertGroup]) -> dict[tuple[int, int], dict[str, QuantizedMatrix]]:
    """The packed experts of an artifact as QuantizedMatrix objects, keyed (layer, expert) -> {proj: matrix}."""
    path = Path(path)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    tensors = _read_shards(path, _read_index(path))
    out = {}
    for g in groups:
        specs = _projection_specs(g, qc["modules"][g.path], qc, path)
        for e in range(g.num_experts):
            per = {}
            for p in g.projections:
                spec = specs[p.name][e]
                t = {part: tensors[packed_key(g.path, p.name, e, part)] for part in _PARTS
                     if packed_key(g.path, p.name, e, part) in tensors}
                try:
                    per[p.name] = QuantizedMatrix.from_packed(t, spec, (p.out_features, p.in_features))
                except ValueError as exc:
                    raise ArtifactError(f"{path}: {g.path}.{p.name}.{e}: {exc}") from exc
            out[(g.layer, e)] = per
    return out


# ---------------------------------------------------------------------------------------------------------------------
# compressed-tensors with a width per MoE layer: a carried fix for transformers' fused-expert dequantizer
# ---------------------------------------------------------------------------------------------------------------------


def _ct_scheme_from_shapes(ct_config, input_dict: dict):
    """The config group whose (num_bits, group_size) fits the packed expert tensors in ``input_dict``: int32 words per
    row = ceil(in / (32 / bits)), scale columns = ceil(in / group_size). None when zero or several groups fit."""
    import math

    key = next((k for k in input_dict if "weight_packed" in k), None)
    shapes = input_dict.get(key.replace("weight_packed", "weight_shape")) if key else None
    scales = input_dict.get(key.replace("weight_packed", "weight_scale")) if key else None
    if key is None or shapes is None or scales is None:
        return None
    packed0, shape0, scale0 = input_dict[key][0], shapes[0], scales[0]
    if shape0 is None or shape0.numel() != 2:
        return None
    in_f = int(shape0[1])
    fits = []
    for group in ct_config.config_groups.values():
        w = group.weights
        if w is None or w.type != "int" or not w.num_bits:
            continue
        words = math.ceil(in_f * w.num_bits / 32) if 32 % w.num_bits else math.ceil(in_f / (32 // w.num_bits))
        gs = w.group_size if w.group_size and w.group_size > 0 else in_f
        if packed0.shape[-1] == words and scale0.shape[-1] == math.ceil(in_f / gs):
            fits.append(group)
    return fits[0] if len({(g.weights.num_bits, g.weights.group_size) for g in fits}) == 1 else None


@contextlib.contextmanager
def ct_experts_scheme_per_layer():
    """Load compressed-tensors checkpoints whose MoE layers have different widths with transformers 5 (checked on
    5.24, which has the bug): ``CompressedTensorsDequantize`` is built without a scheme and decodes every fused expert
    with ``get_experts_scheme`` (the first config group that targets experts), so layers of another width load wrong,
    silently. Config-group targets cannot steer it (regex or exact module names: the same first group). While this
    context is active, an expert converter without a scheme takes the config group that the packed tensors' own
    shapes identify (:func:`_ct_scheme_from_shapes`); uniform-width checkpoints decode exactly as before. Remove when
    ``tests/test_exporters.py::test_transformers_still_misloads_mixed_width_layers`` starts failing."""
    from transformers.integrations import compressed_tensors as ct

    cls = ct.CompressedTensorsDequantize
    original = cls.convert

    def convert(self, input_dict, source_patterns, target_patterns, full_layer_name=None, **kwargs):
        dense = "weight" in input_dict or "weight_scale" in input_dict
        if self.scheme is None and not dense:
            scheme = _ct_scheme_from_shapes(self.hf_quantizer.compressor.quantization_config, input_dict)
            if scheme is not None:
                self.scheme = scheme
                try:
                    return original(self, input_dict, source_patterns, target_patterns,
                                    full_layer_name=full_layer_name, **kwargs)
                finally:
                    self.scheme = None
        return original(self, input_dict, source_patterns, target_patterns, full_layer_name=full_layer_name,
                        **kwargs)

    cls.convert = convert
    try:
        yield
    finally:
        cls.convert = original


def load_compressed_tensors(path: str | Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` with :func:`ct_experts_scheme_per_layer` active: what
    a ``--format compressed-tensors`` export with a width per MoE layer needs on transformers 5.24."""
    from transformers import AutoModelForCausalLM

    with ct_experts_scheme_per_layer():
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
