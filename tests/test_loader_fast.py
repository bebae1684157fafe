"""The packed loader's fast path (one unpack per layer visit, projection and width) against the reference code:
``packing.unpack_codes`` and ``QuantizedMatrix.dequantize``, bit for bit."""

from __future__ import annotations

import pytest
import torch

from mopeq_core.loader import _dequantize_rows, _unpack_rows
from mopeq_core.packing import pack_codes, unpack_codes
from mopeq_core.quantize import QuantizedMatrix, QuantSpec, quantize_rtn


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [1, 7, 8, 64, 333])
def test_unpack_rows_matches_unpack_codes(bits, numel):
    g = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(0, 1 << bits, (3, numel), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = torch.stack([pack_codes(c, bits) for c in codes])
    got = _unpack_rows(packed, bits, numel)
    for i in range(3):
        assert torch.equal(got[i], unpack_codes(packed[i], bits, numel))
        assert torch.equal(got[i], codes[i])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape,G", [((24, 64), 16), ((16, 56), 32)])  # 56 = one padded group
def test_dequantize_rows_is_bit_identical(bits, symmetric, shape, G):
    g = torch.Generator().manual_seed(bits)
    spec = QuantSpec(bits, G, symmetric)
    mats = [quantize_rtn(torch.randn(*shape, generator=g), spec) for _ in range(3)]
    packed = [m.to_packed() for m in mats]
    qw = torch.stack([p["qweight"] for p in packed])
    sc = torch.stack([p["scales"] for p in packed])
    qz = None if symmetric else torch.stack([p["qzeros"] for p in packed])
    for dtype in (torch.float32, torch.bfloat16):
        w = _dequantize_rows(qw, sc, qz, spec, shape, dtype)
        for i, m in enumerate(mats):
            ref = QuantizedMatrix.from_packed(packed[i], spec, shape).dequantize(dtype)
            assert torch.equal(w[i], ref)


@pytest.mark.parametrize("numel", [8, 21, 448 * 128])
def test_three_bit_planes_hold_the_same_codes_in_the_same_bytes(numel):
    from mopeq_core.loader import _codes_minus, _to_planes

    codes = torch.randint(0, 8, (numel,), generator=torch.Generator().manual_seed(numel)).to(torch.uint8)
    packed = pack_codes(codes, 3)
    planes = _to_planes(packed, numel)
    assert planes.numel() == -(-numel // 4) + -(-numel // 8) <= packed.numel() + 1
    assert torch.equal(_codes_minus(planes.unsqueeze(0), 3, numel, 4.0, True)[0], codes.float() - 4.0)


@pytest.mark.parametrize("shape,G", [((24, 64), 64), ((16, 56), 32), ((8, 96), 32)])
def test_scaled_matmul_equals_matmul_with_the_dequantized_weight(shape, G):
    """Group scales applied after the matmul give x @ W^T of the dequantized W (only summation order differs)."""
    from mopeq_core.loader import _codes_minus, _qlinear

    g = torch.Generator().manual_seed(G)
    spec = QuantSpec(4, G, True)
    m = quantize_rtn(torch.randn(*shape, generator=g), spec)
    p = m.to_packed()
    q = _codes_minus(p["qweight"].unsqueeze(0), 4, shape[0] * shape[1], 8.0, False)[0].view(shape)
    x = torch.randn(5, shape[1], generator=g)
    bias = torch.randn(shape[0], generator=g)
    ref = torch.nn.functional.linear(x, m.dequantize(torch.float64).float(), bias)
    got = _qlinear(x, q, p["scales"].float(), G, bias)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_qlinear(x, q, p["scales"].float().flip(-1), G, bias), ref, atol=1e-3) or \
        p["scales"].shape[1] == 1


def test_artifact_with_a_width_per_projection_loads_packed(tmp_path):
    """quantization_config.modules[...].proj_bits (granularity layer-projection): gate_up and down of one expert at
    different widths. The artifact is written with uniform widths and its down_proj tensors re-packed at another
    width (the writer side is the engine's); load_quantized must match the fake-quantized model."""
    import json
    import sys
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_models

    from mopeq_core.apply import apply_fake_quant
    from mopeq_core.artifact import packed_key, write_mopeq_artifact
    from mopeq_core.loader import load_packed_matrices, load_quantized
    from mopeq_core.loading import load_model
    from mopeq_core.moe import find_expert_groups

    src = tiny_models.build_model("mixtral", tmp_path)
    model = load_model(src)
    groups = find_expert_groups(model)
    G = 16
    width = {"gate_up_proj": lambda layer: (2, 4)[layer % 2], "down_proj": lambda layer: (3, 8)[layer % 2]}
    chosen = {(g.layer, e): {p.name: quantize_rtn(g.weight(e, p.name).detach().float(),
                                                  QuantSpec(width[p.name](g.layer), G, True))
                             for p in g.projections} for g in groups for e in range(g.num_experts)}
    # write at the gate_up widths, then replace the down tensors and declare proj_bits
    first = {}
    for g in groups:
        for e in range(g.num_experts):  # down at the gate_up width for now; its tensors are replaced below
            first[(g.layer, e)] = {"gate_up_proj": chosen[(g.layer, e)]["gate_up_proj"],
                                   "down_proj": quantize_rtn(g.weight(e, "down_proj").detach().float(),
                                                             QuantSpec(width["gate_up_proj"](g.layer), G, True))}
    bits = {k: width["gate_up_proj"](k[0]) for k in chosen}
    out = tmp_path / "art"
    write_mopeq_artifact(out, model, groups, lambda g: {e: first[(g.layer, e)] for e in range(g.num_experts)}, bits,
                         group_size=G, symmetric=True, quantizer="rtn")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in set(index.values()):
        t = load_file(str(out / shard))
        for g in groups:
            for e in range(g.num_experts):
                for part, v in chosen[(g.layer, e)]["down_proj"].to_packed().items():
                    key = packed_key(g.path, "down_proj", e, part)
                    if key in t:
                        t[key] = v
        save_file(t, str(out / shard), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    for g in groups:
        cfg["quantization_config"]["modules"][g.path]["proj_bits"] = {
            "down_proj": [width["down_proj"](g.layer)] * g.num_experts}
    (out / "config.json").write_text(json.dumps(cfg))

    apply_fake_quant(groups, chosen)
    ids = torch.randint(3, 4000, (2, 20), generator=torch.Generator().manual_seed(0))
    q = load_quantized(out, attn_implementation="eager")
    ref = load_model(src)
    rg = find_expert_groups(ref)
    back = load_packed_matrices(out, rg)
    assert all(back[(g.layer, 0)]["down_proj"].spec.bits == width["down_proj"](g.layer) for g in rg)
    with torch.no_grad():
        a, b = q(input_ids=ids).logits, model(input_ids=ids).logits
    assert float((a - b).norm() / b.norm()) <= 1e-5
