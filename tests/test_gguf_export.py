"""--format gguf: llama.cpp types per expert tensor, bytes in those types' real blocks, read back with gguf's reader.

References are independent of the writer: ``gguf.quants.dequantize`` (the gguf package's port of ggml's decoders)
decodes our K-type encodings, ``gguf.GGUFReader`` reads the file, and the byte figures come from the ggml block table
(``GGML_QUANT_SIZES``) and the file's size on disk.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models

from mopeq_core.apply import apply_fake_quant
from mopeq_core.config import Budget, QuantizeConfig
from mopeq_core.errors import ExportError
from mopeq_core.exporters import export, precheck
from mopeq_core.gguf_export import (
    ggml_tensor_bytes,
    ggml_type_for_width,
    gguf_projection_cost,
    gguf_sizes,
    quantize_k,
)
from mopeq_core.loading import load_model
from mopeq_core.moe import find_expert_groups
from mopeq_core.quantize import QuantSpec, quantize_rtn

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "mopeq-tiny-moe"
torch.set_num_threads(1)

# Largest relative RMS error of ggml's own quantizers on Gaussian weights is about 0.28 (Q2_K), 0.16 (Q3_K),
# 0.075 (Q4_K), 0.09 (Q4_0, ggml's own encoder), 0.005 (Q8_0); a wrong byte layout decodes to unrelated values (relative error >= 1).
MAX_REL = {"Q2_K": 0.30, "Q3_K": 0.18, "Q4_K": 0.085, "Q4_0": 0.10, "Q8_0": 0.006}
BITS_PER_WEIGHT = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q4_0": 4.5, "Q8_0": 8.5}


@pytest.mark.parametrize("t", sorted(MAX_REL))
def test_encoders_decode_with_ggml_reference(t):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((12, 512)) * 0.04).astype(np.float32)
    w[1] = np.abs(w[1]) + 0.01  # all-positive rows (min > 0)
    w[2] = -np.abs(w[2])  # all-negative rows
    w[3, :256] = 0.0  # an all-zero super-block must decode to zeros
    raw = quantize_k(w, t)
    assert raw.dtype == np.uint8 and raw.shape == (12, ggml_tensor_bytes(1, 512, t))
    deq = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[t])
    assert deq.shape == w.shape
    assert np.all(deq[3, :256] == 0)
    rel = np.sqrt(((deq - w) ** 2).sum(axis=1) / (w**2).sum(axis=1))
    assert rel.max() < MAX_REL[t], rel
    assert ggml_tensor_bytes(12, 512, t) * 8 == 12 * 512 * BITS_PER_WEIGHT[t]


def test_k_encoders_keep_the_sign_pattern_and_amplitude():
    """The sub-block layout is right, not only the average: every 16-weight sub-block keeps its own amplitude."""
    rng = np.random.default_rng(1)
    amp = np.repeat(rng.uniform(0.001, 0.2, size=(4, 32)), 16, axis=1).astype(np.float32)
    w = amp * rng.choice([-1.0, 1.0], size=amp.shape).astype(np.float32) * rng.uniform(0.5, 1, size=amp.shape)
    for t in ("Q2_K", "Q3_K", "Q4_K"):
        deq = gguf.quants.dequantize(quantize_k(w, t), gguf.GGMLQuantizationType[t])
        sub_w = np.abs(w).reshape(4, 32, 16).max(axis=-1)
        sub_d = np.abs(deq).reshape(4, 32, 16).max(axis=-1)
        assert np.corrcoef(sub_w.ravel(), sub_d.ravel())[0, 1] > 0.97, t


def test_type_for_width_follows_row_length():
    assert [ggml_type_for_width(b, 512) for b in (2, 3, 4, 8)] == ["Q2_K", "Q3_K", "Q4_K", "Q8_0"]
    assert [ggml_type_for_width(b, 224) for b in (2, 3, 4, 8)] == [None, None, "Q4_0", "Q8_0"]
    assert ggml_type_for_width(4, 100) is None
    assert gguf_projection_cost(448, 128, 4) == 448 * 128 // 32 * 18
    with pytest.raises(ValueError, match="no llama.cpp type"):
        gguf_projection_cost(448, 128, 2)


def _fake_quantize(model_dir: Path, width):
    """RTN at ``width(layer, projection)`` (one width per layer x projection), fake-quantized in place."""
    model = load_model(model_dir)
    groups = find_expert_groups(model)
    chosen, bits = {}, {}
    for g in groups:
        for e in range(g.num_experts):
            chosen[(g.layer, e)] = {p.name: quantize_rtn(g.weight(e, p.name).detach().float(),
                                                         QuantSpec(width(g.layer, p.name), 32, True))
                                    for p in g.projections}
            bits[(g.layer, e)] = width(g.layer, "gate_up_proj")
    apply_fake_quant(groups, chosen)
    return model, groups, chosen, bits


def _check_file(path: Path, model, groups, widths):
    """Tensor types and bytes of the GGUF against the allocation, with gguf's reader."""
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in r.tensors}
    expert = 0
    for g in groups:
        for p in g.projections:
            t = ggml_type_for_width(widths(g.layer, p.name), p.in_features)
            names = ["ffn_gate_exps", "ffn_up_exps"] if p.name == "gate_up_proj" else ["ffn_down_exps"]
            for n in names:
                rt = tensors[f"blk.{g.layer}.{n}.weight"]
                assert rt.tensor_type.name == t
                rows = g.num_experts * p.out_features // len(names)
                blck, size = gguf.GGML_QUANT_SIZES[rt.tensor_type]
                assert int(rt.n_bytes) == rows * p.in_features // blck * size
                expert += int(rt.n_bytes)
                assert [int(x) for x in rt.shape] == [p.in_features, p.out_features // len(names), g.num_experts]
                # the stored weights are the fake-quantized experts re-encoded in the ggml type
                deq = gguf.quants.dequantize(rt.data, rt.tensor_type).reshape(g.num_experts, -1, p.in_features)
                W = torch.stack([g.weight(e, p.name).detach().float() for e in range(g.num_experts)]).numpy()
                if len(names) == 2:
                    F = W.shape[1] // 2
                    W = W[:, :F] if n == "ffn_gate_exps" else W[:, F:]
                rel = np.sqrt(((deq - W) ** 2).sum() / (W**2).sum())
                assert rel < MAX_REL[t], (n, t, rel)
    sizes = gguf_sizes(path)
    assert sizes["expert_bytes"] == expert
    assert sizes["total_bytes"] == path.stat().st_size
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["llama.expert_count"].contents() == model.config.num_local_experts
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(r.fields["tokenizer.ggml.tokens"].data) == model.config.vocab_size
    return tensors


def test_shipped_model_gguf_per_layer_projection_types(tmp_path):
    """The shipped Mixtral (rows of 128 and 224: no K-type fits) at 4/8 bits per layer x projection."""
    widths = lambda layer, proj: 8 if (layer + (proj == "down_proj")) % 2 else 4  # noqa: E731
    model, groups, chosen, bits = _fake_quantize(SHIPPED, widths)
    cfg = QuantizeConfig(model=str(SHIPPED), format="gguf", granularity="layer-projection", bits=(4, 8))
    precheck("gguf", cfg)
    files = export("gguf", tmp_path, model, groups, chosen, bits, cfg)
    assert [f.name for f in files] == ["model.gguf"]
    tensors = _check_file(files[0], model, groups, widths)
    assert {tensors[f"blk.{i}.ffn_down_exps.weight"].tensor_type.name for i in range(4)} == {"Q4_0", "Q8_0"}
    # the token embedding is the checkpoint's float32, bit for bit
    emb = tensors["token_embd.weight"]
    assert np.array_equal(np.asarray(emb.data).reshape(model.config.vocab_size, -1),
                          model.model.embed_tokens.weight.detach().numpy())


def test_k_types_on_a_256_aligned_mixtral(tmp_path):
    """Q2_K / Q3_K / Q4_K where the rows allow them (hidden 256, intermediate 256)."""
    tok = tiny_models.tokenizer()
    cfg = transformers.MixtralConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=256,
                                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                     num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                     tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    src = tiny_models._save(transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), tok,
                            tmp_path / "src")
    table = {(0, "gate_up_proj"): 2, (0, "down_proj"): 3, (1, "gate_up_proj"): 4, (1, "down_proj"): 2,
             (2, "gate_up_proj"): 3, (2, "down_proj"): 8}
    widths = lambda layer, proj: table[(layer, proj)]  # noqa: E731
    model, groups, chosen, bits = _fake_quantize(src, widths)
    files = export("gguf", tmp_path / "out", model, groups, chosen, bits,
                   QuantizeConfig(model=str(src), format="gguf", granularity="layer-projection"))
    tensors = _check_file(files[0], model, groups, widths)
    assert {t.tensor_type.name for n, t in tensors.items() if "_exps" in n} == {"Q2_K", "Q3_K", "Q4_K", "Q8_0"}
    assert "output.weight" in tensors  # untied head is written


def test_gguf_refuses_what_it_cannot_express(tmp_path):
    with pytest.raises(ExportError, match="granularity layer-projection"):
        precheck("gguf", QuantizeConfig(model="x", format="gguf", granularity="expert", bits=(2, 4)))
    precheck("gguf", QuantizeConfig(model="x", format="gguf", granularity="expert", bits=(4,)))
    # 2 bits in rows of 128: no ggml type
    model, groups, chosen, bits = _fake_quantize(SHIPPED, lambda layer, proj: 2)
    with pytest.raises(ExportError, match="no llama.cpp type stores 2-bit"):
        export("gguf", tmp_path, model, groups, chosen, bits, QuantizeConfig(model="x", format="gguf", bits=(2,)))
    # two widths inside one layer x projection
    model, groups, chosen, bits = _fake_quantize(SHIPPED, lambda layer, proj: 4)
    g = groups[0]
    chosen[(g.layer, 0)]["down_proj"] = quantize_rtn(g.weight(0, "down_proj").detach().float(),
                                                     QuantSpec(8, 32, True))
    with pytest.raises(ExportError, match="mixes widths"):
        export("gguf", tmp_path, model, groups, chosen, bits, QuantizeConfig(model="x", format="gguf"))
    assert not list(tmp_path.glob("*.gguf*"))


def test_pipeline_writes_gguf_whose_types_match_bitmap(tmp_path):
    """The shipped model end to end with --format gguf --granularity layer --bits 4,8: bitmap widths = GGUF types."""
    from mopeq_core import engine

    cfg = QuantizeConfig(model=str(SHIPPED), budget=Budget(avg_bits=6.0), bits=(4, 8), granularity="layer",
                         format="gguf", quantizer="rtn", sensitivity="weight-norm", group_size=32,
                         calib_file=str(REPO / "data" / "calib.jsonl"), calib_samples=4, seq_len=32, probes=1)
    res = engine.run(cfg, tmp_path)
    bitmap = json.loads((tmp_path / "bitmap.json").read_text())
    ggufs = list(tmp_path.glob("*.gguf"))
    assert len(ggufs) == 1
    r = gguf.GGUFReader(str(ggufs[0]))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    used = set()
    for layer in bitmap["layers"]:
        ws = {e["bits"] for e in layer["experts"]}
        assert len(ws) == 1
        b = ws.pop()
        used.add(b)
        for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            assert types[f"blk.{layer['layer']}.{n}.weight"] == {4: "Q4_0", 8: "Q8_0"}[b]
    assert used == {4, 8}  # 6 mean bits over 4 layers: a real mix
    assert res.out_dir == tmp_path
    # the budget is counted in llama.cpp's blocks: bitmap.json's bytes are the file's
    assert bitmap["total_bytes"] == ggufs[0].stat().st_size
    assert bitmap["expert_bytes"] == sum(int(t.n_bytes) for t in r.tensors if "_exps." in t.name)
    assert bitmap["expert_bytes"] <= res.report["allocation"]["budget_expert_bytes"]


def test_block_table_matches_gguf_and_estimate_offers_engines():
    from mopeq_core.allocate import ENGINE_GRANULARITIES
    from mopeq_core.estimate import estimate_model
    from mopeq_core.gguf_export import GGML_BLOCKS

    for name, blk in GGML_BLOCKS.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == blk
    est = estimate_model(str(SHIPPED), bits=(2, 3, 4, 8), roots=[REPO]).to_dict()
    eng = est["engines"]
    assert set(eng) == set(ENGINE_GRANULARITIES)
    assert eng["llama.cpp (gguf)"] == {"granularities": ["layer-projection", "layer"], "bits": [4, 8]}
    assert eng["vLLM (compressed-tensors)"]["bits"] == [4, 8]
    assert eng["mopeq loader (mopeq)"]["granularities"] == ["expert", "layer-projection", "layer"]


def test_float_gguf_holds_the_weights_exactly(tmp_path):
    """chosen=None: every tensor at the checkpoint's float32, the reference llama-quantize starts from."""
    from mopeq_core.gguf_export import write_gguf

    model = load_model(SHIPPED)
    groups = find_expert_groups(model)
    info = write_gguf(tmp_path / "f32.gguf", model, groups, None)
    assert set(info["tensor_types"].values()) == {"F32"}
    r = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "f32.gguf")).tensors}
    g = groups[1]
    down = np.asarray(r["blk.1.ffn_down_exps.weight"].data).reshape(g.num_experts, 128, 224)
    assert np.array_equal(down, g.module.down_proj.detach().numpy())
    F = model.config.intermediate_size
    up = np.asarray(r["blk.1.ffn_up_exps.weight"].data).reshape(g.num_experts, F, 128)
    assert np.array_equal(up, g.module.gate_up_proj.detach().numpy()[:, F:])
    # q rows are permuted to llama.cpp's rotary layout: same rows, another order
    q = np.asarray(r["blk.0.attn_q.weight"].data).reshape(128, 128)
    hf = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert not np.array_equal(q, hf) and np.array_equal(np.sort(q, axis=0), np.sort(hf, axis=0))
