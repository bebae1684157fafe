"""GGUF (llama.cpp) export: the model in one ``*.gguf`` whose expert tensors carry the allocated llama.cpp types.

Widths map to ggml types by the row length of the tensor (ggml quantizes along rows, i.e. along a projection's
input features):

- rows that are a multiple of 256 (QK_K): 2 -> ``Q2_K``, 3 -> ``Q3_K``, 4 -> ``Q4_K``, 8 -> ``Q8_0``;
- otherwise rows that are a multiple of 32: 4 -> ``Q4_0``, 8 -> ``Q8_0`` (ggml has no 2- or 3-bit type with
  32-element blocks; llama-quantize itself falls back to IQ4_NL / Q5_0 for such rows);
- anything else is refused (:class:`~mopeq_core.errors.ExportError`).

Bytes: a ggml tensor of ``rows x row_len`` in type T takes ``rows * row_len / block(T) * type_size(T)`` bytes
(:func:`ggml_tensor_bytes`); ``Q2_K`` is 84 bytes per 256 weights (2.625 bits), ``Q3_K`` 110 (3.4375), ``Q4_K`` 144
(4.5), ``Q4_0`` 18 per 32 (4.5), ``Q8_0`` 34 per 32 (8.5). :func:`gguf_projection_cost` is the per-expert,
per-projection figure an allocation in GGUF bytes uses.

The K-type encoders (Q2_K, Q3_K, Q4_K) are written here in numpy (the ``gguf`` package can only *decode* them);
their byte layouts are checked against ``gguf.quants.dequantize`` in the tests. Q4_0 / Q8_0 use ``gguf.quants``.

Architecture support: transformers' Mixtral (``llama`` architecture with experts in GGUF, as
``convert_hf_to_gguf.py`` writes it: q/k rows permuted to llama.cpp's rotary layout, the router as
``ffn_gate_inp``) with a byte-level BPE tokenizer (``tokenizer.ggml.model = gpt2``). Non-expert tensors keep the
checkpoint's float type (F32, F16 or BF16; norms F32).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ExportError

if TYPE_CHECKING:
    import torch

QK_K = 256
K_TYPES = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 8: "Q8_0"}
LEGACY_TYPES = {4: "Q4_0", 8: "Q8_0"}
EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
SUPPORTED_ARCHS = ("mixtral",)
# (weights per block, bytes per block) of the ggml types used here (= gguf.GGML_QUANT_SIZES; kept here so that the
# API's estimate needs neither gguf nor torch; a test checks the two agree)
GGML_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q8_0": (32, 34),
               "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144)}

__all__ = [
    "ggml_block",
    "ggml_tensor_bytes",
    "ggml_type_for_width",
    "gguf_projection_cost",
    "gguf_sizes",
    "gguf_widths",
    "quantize_k",
    "write_gguf",
]


def ggml_block(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type."""
    return GGML_BLOCKS[type_name.upper()]


def ggml_tensor_bytes(rows: int, row_len: int, type_name: str) -> int:
    """Bytes of a ``rows x row_len`` tensor stored in ggml type ``type_name`` (``row_len`` = ne[0], the contiguous
    dimension, i.e. a projection's input features). Raises ValueError when rows cannot be cut into whole blocks."""
    blck, size = ggml_block(type_name)
    if row_len % blck:
        raise ValueError(f"{type_name} needs rows that are a multiple of {blck} weights; this row has {row_len}")
    return rows * (row_len // blck) * size


def ggml_type_for_width(bits: int, row_len: int) -> str | None:
    """The llama.cpp type that stores a ``bits``-wide allocation for rows of ``row_len`` weights (None if none)."""
    if row_len % QK_K == 0:
        return K_TYPES.get(bits)
    if row_len % 32 == 0:
        return LEGACY_TYPES.get(bits)
    return None


def gguf_projection_cost(out_features: int, in_features: int, bits: int) -> int:
    """Bytes one expert's ``[out, in]`` projection takes in the GGUF at ``bits`` (its ggml type's real blocks).
    ValueError when no ggml type stores that width for rows of ``in_features``."""
    t = ggml_type_for_width(bits, in_features)
    if t is None:
        raise ValueError(f"no llama.cpp type stores {bits}-bit weights in rows of {in_features} (K-types need "
                         f"multiples of {QK_K}, Q4_0/Q8_0 multiples of 32)")
    return ggml_tensor_bytes(out_features, in_features, t)


def gguf_widths(shapes: list[tuple[int, int]], bits) -> list[int]:
    """The widths of ``bits`` that llama.cpp types can store for every projection ``[out, in]`` in ``shapes``."""
    return [b for b in bits if all(ggml_type_for_width(b, i) is not None for _, i in shapes)]


# ---------------------------------------------------------------------------------------------------------------------
# K-quant encoders (inverse of ggml's dequantize_row_q{2,3,4}_K)
# ---------------------------------------------------------------------------------------------------------------------


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), dtype=np.float32), where=b != 0)


def _affine(x: np.ndarray, nq: int, nsc: int):
    """Scale/min per sub-block (x: [nb, nsub, len]) for codes 0..nq, sub-block scales/mins as nsc-level integers
    under float16 super-scales. Returns (d16, dmin16, sc, mn, q)."""
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = x.max(axis=-1)
    scale = (hi - lo) / nq
    mn = -lo
    # a few alternating least-squares steps (codes <-> scale and min), as ggml's make_qkx quantizers do
    for _ in range(4):
        q = np.clip(np.rint(_safe_div(x + mn[..., None], scale[..., None])), 0, nq)
        n = x.shape[-1]
        sq, sqq, sx, sqx = q.sum(-1), (q * q).sum(-1), x.sum(-1), (q * x).sum(-1)
        det = n * sqq - sq * sq
        a = _safe_div(n * sqx - sq * sx, det)  # x ~ a*q - b
        b = _safe_div(sq * sqx - sqq * sx, det)
        ok = (det > 0) & (a > 0) & (b >= 0)
        scale = np.where(ok, a, scale)
        mn = np.where(ok, b, mn)
    d16 = _f16(scale.max(axis=-1) / nsc)
    dmin16 = _f16(mn.max(axis=-1) / nsc)
    d, dmin = d16.astype(np.float32), dmin16.astype(np.float32)
    sc = np.clip(np.rint(_safe_div(scale, d[:, None])), 0, nsc).astype(np.uint8)
    m = np.clip(np.rint(_safe_div(mn, dmin[:, None])), 0, nsc).astype(np.uint8)
    step = d[:, None] * sc
    off = dmin[:, None] * m
    q = np.clip(np.rint(_safe_div(x + off[..., None], step[..., None])), 0, nq).astype(np.uint8)
    return d16, dmin16, sc, m, q


def _q4_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    d16, dmin16, sc, m, q = _affine(x.reshape(nb, 8, 32), 15, 63)
    scales = np.zeros((nb, 12), dtype=np.uint8)
    scales[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    q = q.reshape(nb, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(nb, 128)
    return np.concatenate([d16.view(np.uint8).reshape(nb, 2), dmin16.view(np.uint8).reshape(nb, 2), scales, qs],
                          axis=1)


def _pack2(q: np.ndarray) -> np.ndarray:
    """256 2-bit codes per block -> 64 bytes: element h*128 + s*32 + l at bits 2s of byte h*32 + l."""
    nb = q.shape[0]
    q = q.reshape(nb, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(nb, 64)


def _q2_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    d16, dmin16, sc, m, q = _affine(x.reshape(nb, 16, 16), 3, 15)
    scales = (sc & 0xF) | (m << 4)
    return np.concatenate([scales, _pack2(q.reshape(nb, 256)), d16.view(np.uint8).reshape(nb, 2),
                           dmin16.view(np.uint8).reshape(nb, 2)], axis=1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs = x.reshape(nb, 16, 16)
    # signed sub-block scale so that the largest-magnitude weight lands on code -4 (the wider side of -4..3)
    idx = np.abs(xs).argmax(axis=-1)
    xm = np.take_along_axis(xs, idx[..., None], axis=-1)[..., 0]
    s = -xm / 4.0
    d16 = _f16(np.abs(s).max(axis=-1) / 31.0)
    d = d16.astype(np.float32)
    sc = np.clip(np.rint(_safe_div(s, d[:, None])), -32, 31).astype(np.int16)
    step = d[:, None] * sc
    q = np.clip(np.rint(_safe_div(xs, step[..., None])), -4, 3).astype(np.int16)
    c = (q + 4).astype(np.uint8).reshape(nb, 256)  # 0..7: low 2 bits in qs, high bit in hmask
    qs = _pack2(c & 3)
    hi = (c >> 2).reshape(nb, 8, 32)
    hmask = np.zeros((nb, 32), dtype=np.uint8)
    for k in range(8):
        hmask |= hi[:, k, :] << k
    u = (sc + 32).astype(np.uint8)
    scales = np.zeros((nb, 12), dtype=np.uint8)
    scales[:, 0:8] = (u[:, 0:8] & 0xF) | ((u[:, 8:16] & 0xF) << 4)
    for j in range(4):
        scales[:, 8 + j] = sum(((u[:, 4 * t + j] >> 4) & 3) << (2 * t) for t in range(4))
    return np.concatenate([hmask, qs, scales, d16.view(np.uint8).reshape(nb, 2)], axis=1)


_K_ENCODERS = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k}


def quantize_k(w: np.ndarray, type_name: str) -> np.ndarray:
    """Quantize ``w`` (float, last dimension = rows of a multiple of the type's block) into ggml ``type_name``:
    uint8 array of shape ``w.shape[:-1] + (row_bytes,)``, as ``gguf.GGUFWriter.add_tensor(raw_dtype=...)`` takes."""
    import gguf
    w = np.ascontiguousarray(w, dtype=np.float32)
    if type_name in _K_ENCODERS:
        if w.shape[-1] % QK_K:
            raise ValueError(f"{type_name} needs rows that are a multiple of {QK_K}, got {w.shape[-1]}")
        blocks = _K_ENCODERS[type_name](w.reshape(-1, QK_K))
        return blocks.reshape(*w.shape[:-1], -1)
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[type_name])


# ---------------------------------------------------------------------------------------------------------------------
# writer
# ---------------------------------------------------------------------------------------------------------------------


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half q/k rows -> llama.cpp's interleaved rotary layout (convert_hf_to_gguf's LlamaModel.permute)."""

    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _float_type(dtype: torch.dtype) -> tuple[str, np.dtype | None]:
    import torch

    if dtype == torch.float16:
        return "F16", np.float16
    if dtype == torch.bfloat16:
        return "BF16", None
    return "F32", np.float32


def _add_float(writer, name: str, t: torch.Tensor, kind: str) -> None:
    import gguf
    import torch

    t = t.detach().cpu()
    if kind == "BF16":
        raw = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
        writer.add_tensor(name, raw.reshape(*t.shape[:-1], -1), raw_dtype=gguf.GGMLQuantizationType.BF16)
    else:
        writer.add_tensor(name, t.float().numpy().astype(np.float16 if kind == "F16" else np.float32))


def _tokenizer_meta(writer, model) -> None:
    """Byte-level BPE tokenizer of the model's source directory as llama.cpp's ``gpt2`` tokenizer."""
    import json

    from transformers import AutoTokenizer

    src = getattr(model.config, "_name_or_path", "") or ""
    try:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
        spec = json.loads(tok.backend_tokenizer.to_str())
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable fast tokenizer
        raise ExportError(f"--format gguf needs the model's fast tokenizer (tokenizer.json) from {src!r}: {exc}") from exc
    bpe = spec.get("model") or {}
    pre = json.dumps(spec.get("pre_tokenizer"))
    if bpe.get("type") != "BPE" or "ByteLevel" not in pre:
        raise ExportError("--format gguf writes byte-level BPE tokenizers (llama.cpp 'gpt2') only; this model's is "
                          f"{bpe.get('type')!r} with pre-tokenizer {pre[:80]}: use --format gguf-overrides and "
                          "llama.cpp's convert_hf_to_gguf.py")
    vocab: dict[str, int] = dict(bpe["vocab"])
    added = {a["content"]: a for a in spec.get("added_tokens", [])}
    for content, a in added.items():
        vocab[content] = a["id"]
    n = max(model.config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED
    for content, i in vocab.items():
        tokens[i] = content
        a = added.get(content)
        types[i] = 3 if (a and a.get("special")) else (4 if a else 1)  # CONTROL / USER_DEFINED / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, fn in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        v = getattr(tok, attr, None)
        if v is not None:
            fn(int(v))
    post = json.dumps(spec.get("post_processor"))
    writer.add_add_bos_token(tok.bos_token is not None and f'"{tok.bos_token}"' in post)
    writer.add_add_eos_token(False)


def write_gguf(path: Path, model, groups, chosen) -> dict:
    """Write ``model`` (its experts at the widths of ``chosen[(layer, expert)][projection].spec.bits``, one width per
    layer x projection; ``chosen=None``: every tensor in the checkpoint's float type, a reference for
    llama-quantize) to ``path``. Returns {"types": {tensor: type}, "expert_bytes": int, "total_bytes": int}."""
    import gguf
    import torch

    cfg = model.config
    if cfg.model_type not in SUPPORTED_ARCHS:
        raise ExportError(f"--format gguf writes {', '.join(SUPPORTED_ARCHS)} models; this is {cfg.model_type!r} "
                          "(use --format gguf-overrides with llama.cpp's convert_hf_to_gguf.py)")
    by_layer = {g.layer: g for g in groups}
    plan: dict[int, dict[str, str]] = {}  # layer -> projection -> ggml type
    for g in groups:
        if g.transposed or g.kind != "fused":
            raise ExportError(f"--format gguf: {g.path} is not a fused [E, out, in] expert layer")
        plan[g.layer] = {}
        for p in g.projections:
            if chosen is None:
                plan[g.layer][p.name] = "F32"
                continue
            ws = {chosen[(g.layer, e)][p.name].spec.bits for e in range(g.num_experts)}
            if len(ws) != 1:
                raise ExportError(f"--format gguf needs one width per layer x projection (one GGUF tensor), but "
                                  f"layer {g.layer} {p.name} mixes widths {sorted(ws)}: use --granularity "
                                  "layer-projection or layer")
            b = ws.pop()
            t = ggml_type_for_width(b, p.in_features)
            if t is None:
                raise ExportError(f"--format gguf: no llama.cpp type stores {b}-bit weights in rows of "
                                  f"{p.in_features} ({g.path}.{p.name}): K-types (Q2_K/Q3_K/Q4_K) need rows of a "
                                  f"multiple of {QK_K}, Q4_0/Q8_0 of 32; offer --bits 4,8 for this model")
            plan[g.layer][p.name] = t
    n_layers = cfg.num_hidden_layers
    if sorted(plan) != list(range(n_layers)):
        raise ExportError("--format gguf needs every decoder layer to be a MoE layer (Mixtral)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 1e6))
    float_kind, _ = _float_type(next(model.parameters()).dtype)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(Path(str(getattr(cfg, "_name_or_path", "") or "model")).name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_expert_count(cfg.num_local_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_vocab_size(cfg.vocab_size)
    _tokenizer_meta(writer, model)

    types: dict[str, str] = {}
    sd = model.state_dict()
    base = "model"
    _add_float(writer, "token_embd.weight", sd[f"{base}.embed_tokens.weight"], float_kind)
    types["token_embd.weight"] = float_kind
    tied = getattr(cfg, "tie_word_embeddings", False)
    for i in range(n_layers):
        pre = f"{base}.layers.{i}"
        blk = f"blk.{i}"
        q = _permute(sd[f"{pre}.self_attn.q_proj.weight"], cfg.num_attention_heads)
        k = _permute(sd[f"{pre}.self_attn.k_proj.weight"], cfg.num_key_value_heads)
        for name, t in ((f"{blk}.attn_q.weight", q), (f"{blk}.attn_k.weight", k),
                        (f"{blk}.attn_v.weight", sd[f"{pre}.self_attn.v_proj.weight"]),
                        (f"{blk}.attn_output.weight", sd[f"{pre}.self_attn.o_proj.weight"])):
            _add_float(writer, name, t, float_kind)
            types[name] = float_kind
        for name, t in ((f"{blk}.attn_norm.weight", sd[f"{pre}.input_layernorm.weight"]),
                        (f"{blk}.ffn_norm.weight", sd[f"{pre}.post_attention_layernorm.weight"])):
            _add_float(writer, name, t, "F32")
            types[name] = "F32"
        g = by_layer[i]
        gate_w = sd[f"{pre}.mlp.gate.weight"]
        _add_float(writer, f"{blk}.ffn_gate_inp.weight", gate_w, "F32")
        types[f"{blk}.ffn_gate_inp.weight"] = "F32"
        for p in g.projections:
            W = torch.stack([g.weight(e, p.name).detach().float().cpu() for e in range(g.num_experts)]).numpy()
            t = plan[i][p.name]
            if p.name == "gate_up_proj":
                F = W.shape[1] // 2
                parts = (("ffn_gate_exps", W[:, :F]), ("ffn_up_exps", W[:, F:]))
            elif p.name == "down_proj":
                parts = (("ffn_down_exps", W),)
            else:
                raise ExportError(f"--format gguf: unknown expert projection {p.name!r} in {g.path}")
            for gname, arr in parts:
                name = f"{blk}.{gname}.weight"
                if t == "F32":
                    writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
                else:
                    writer.add_tensor(name, quantize_k(arr, t), raw_dtype=gguf.GGMLQuantizationType[t])
                types[name] = t
    _add_float(writer, "output_norm.weight", sd[f"{base}.norm.weight"], "F32")
    types["output_norm.weight"] = "F32"
    if not tied:
        _add_float(writer, "output.weight", sd["lm_head.weight"], float_kind)
        types["output.weight"] = float_kind
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"types": types, **gguf_sizes(path)}


def gguf_sizes(path: Path) -> dict:
    """Bytes of a GGUF file as read back by ``gguf.GGUFReader``: ``expert_bytes`` (the ``*_exps`` tensors),
    ``total_bytes`` (the file) and ``types`` per tensor. What bitmap.json's expert/total bytes are for --format gguf."""
    import gguf

    r = gguf.GGUFReader(str(path))
    expert = sum(int(t.n_bytes) for t in r.tensors if t.name.split(".")[-2] in EXPERT_TENSORS)
    return {"expert_bytes": expert, "total_bytes": Path(path).stat().st_size,
            "tensor_types": {t.name: t.tensor_type.name for t in r.tensors}}
