"""Engine-compatible exports (mopeq_core.exporters): compressed-tensors, GPTQ and llama.cpp tensor-type overrides.

Tolerances: the fake-quantized experts are ``float(scale16) * (code - zero)`` computed exactly in float32, the
compressed-tensors export stores the same float16 scales as float32 and the same codes, and transformers
dequantizes them with the same float32 product, so the loaded expert weights must be *bit-identical* (checked with
``torch.equal``). Logits then differ only by floating-point summation order between two model instances, so a
relative error of 1e-6 (float32 has ~6e-8 resolution; a few hundred accumulations) is a safe bound, far below the
~1e-2 that a single wrongly decoded expert produces.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models

from mopeq_core.apply import apply_fake_quant
from mopeq_core.config import FORMATS, QuantizeConfig
from mopeq_core.errors import ExportError
from mopeq_core.exporters import (
    EXPORTERS,
    export,
    gguf_commands,
    pack_dense_int32,
    precheck,
    write_compressed_tensors,
)
from mopeq_core.loading import load_model
from mopeq_core.moe import find_expert_groups
from mopeq_core.quantize import QuantSpec, quantize_rtn

torch.set_num_threads(1)
G = 16
LOGIT_RTOL = 1e-6


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp-models")
    dirs = {name: tiny_models.build_model(name, root) for name in ("mixtral", "qwen2_moe")}
    dirs["standin"] = lambda: tiny_models.build_standin(root)[0]  # nn.ModuleList of nn.Linear experts (remote code)
    return dirs


def quantized(model_dir: Path, width, *, symmetric=True, group_size=G):
    """Load, RTN-quantize every expert at ``width(layer_index, expert)`` and fake-quantize the model in place."""
    model = load_model(model_dir)
    groups = find_expert_groups(model)
    chosen, bits = {}, {}
    for i, g in enumerate(groups):
        for e in range(g.num_experts):
            b = width(i, e)
            bits[(g.layer, e)] = b
            chosen[(g.layer, e)] = {
                p.name: quantize_rtn(g.weight(e, p.name).detach().float(), QuantSpec(b, group_size, symmetric))
                for p in g.projections}
    apply_fake_quant(groups, chosen)
    return model, groups, chosen, bits


def cfg_for(fmt, *, symmetric=True, group_size=G, bits=(2, 3, 4, 8)):
    return QuantizeConfig(model="x", format=fmt, granularity="layer", group_size=group_size, symmetric=symmetric,
                          bits=bits)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def rel_err(a, b):
    return float((a - b).norm() / a.norm())


IDS = torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------------


def test_registry_covers_every_engine_format(tmp_path):
    assert set(EXPORTERS) == set(FORMATS) - {"mopeq", "fake"}
    with pytest.raises(ExportError, match="unknown export format"):
        export("onnx", tmp_path, None, [], {}, {}, cfg_for("mopeq"))


def test_precheck_refuses_configurations_up_front():
    with pytest.raises(ExportError, match="4 and 8"):
        precheck("compressed-tensors", cfg_for("compressed-tensors", bits=(2, 4)))
    with pytest.raises(ExportError, match="symmetric"):
        precheck("compressed-tensors", cfg_for("compressed-tensors", bits=(4,), symmetric=False))
    ct_expert = QuantizeConfig(model="x", format="compressed-tensors", granularity="expert", bits=(4, 8))
    with pytest.raises(ExportError, match="one width per MoE layer.*--granularity layer"):
        precheck("compressed-tensors", ct_expert)
    precheck("compressed-tensors", cfg_for("compressed-tensors", bits=(4, 8)))  # a width per layer: written
    gguf_expert = QuantizeConfig(model="x", format="gguf-overrides", granularity="expert", bits=(2, 3, 4))
    with pytest.raises(ExportError, match="--granularity layer"):
        precheck("gguf-overrides", gguf_expert)
    with pytest.raises(ExportError, match="maps widths"):
        precheck("gguf-overrides", cfg_for("gguf-overrides", bits=(2, 5)))
    with pytest.raises(ExportError, match="takes widths"):
        precheck("gptq", cfg_for("gptq", bits=(5,)))
    for fmt, bits in (("compressed-tensors", (8,)), ("gptq", (2, 3, 4, 8)), ("gguf-overrides", (2, 3, 4))):
        precheck(fmt, cfg_for(fmt, bits=bits))
    precheck("gptq", cfg_for("gptq", symmetric=False))  # asymmetric GPTQ is written as gptq_v2


# ---------------------------------------------------------------------------------------------------------------------
# compressed-tensors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,width", [("mixtral", 4), ("qwen2_moe", 8), ("standin", 4)])
def test_compressed_tensors_loads_with_from_pretrained(model_dirs, tmp_path, arch, width):
    from transformers import AutoModelForCausalLM

    d = model_dirs[arch]
    model, groups, chosen, bits = quantized(d() if callable(d) else d, lambda i, e: width)
    out = tmp_path / "ct"
    files = export("compressed-tensors", out, model, groups, chosen, bits, cfg_for("compressed-tensors"))
    assert all(f.exists() for f in files) and out / "config.json" in files

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    (scheme,) = qc["config_groups"].values()
    assert scheme["weights"]["num_bits"] == width and scheme["weights"]["type"] == "int"
    assert scheme["weights"]["strategy"] == "group" and scheme["weights"]["group_size"] == G
    assert scheme["weights"]["symmetric"] is True and scheme["format"] == "pack-quantized"
    # every non-expert module is ignored, no expert module is
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    packed = {k[: -len(".weight_packed")] for k in index if k.endswith(".weight_packed")}
    assert len(packed) == sum(g.num_experts * 3 for g in groups)  # gate, up, down per expert on disk
    assert not packed & set(qc["ignore"])
    dense_2d = set()
    for shard in set(index.values()):
        with safe_open(str(out / shard), "pt") as f:
            dense_2d |= {k[: -len(".weight")] for k in f.keys()  # noqa: SIM118 (safe_open is not iterable)
                         if k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2}
    assert dense_2d <= set(qc["ignore"]) and "lm_head" in qc["ignore"]

    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    # nn.Linear experts (stand-in) stay compressed in memory (compressed-tensors decompresses them per forward)
    lgroups = find_expert_groups(loaded) if all(g.kind == "fused" for g in groups) else []
    for g, lg in zip(groups, lgroups):
        for e in range(g.num_experts):
            for p in g.projections:
                assert torch.equal(lg.weight(e, p.name), g.weight(e, p.name)), (g.path, e, p.name)
    assert rel_err(logits(model, IDS), logits(loaded, IDS)) <= LOGIT_RTOL


def test_compressed_tensors_refusals(model_dirs, tmp_path):
    out = tmp_path / "refused"
    d = model_dirs["mixtral"]
    # per-expert widths inside one layer: engines take one scheme per fused MoE layer
    m, g, c, b = quantized(d, lambda i, e: 4 if e % 2 else 8)
    with pytest.raises(ExportError, match=r"one width per MoE layer.*--granularity layer"):
        export("compressed-tensors", out, m, g, c, b, cfg_for("compressed-tensors"))
    # widths the MoE kernels do not take
    m, g, c, b = quantized(d, lambda i, e: 3)
    with pytest.raises(ExportError, match="4 and 8 only"):
        export("compressed-tensors", out, m, g, c, b, cfg_for("compressed-tensors"))
    # asymmetric: transformers' fused-expert loader drops the zero points
    m, g, c, b = quantized(d, lambda i, e: 4, symmetric=False)
    with pytest.raises(ExportError, match="symmetric"):
        export("compressed-tensors", out, m, g, c, b, cfg_for("compressed-tensors", symmetric=False))
    # groups that do not tile the input features
    m, g, c, b = quantized(d, lambda i, e: 4, group_size=24)
    with pytest.raises(ExportError, match="not a multiple of --group-size 24"):
        export("compressed-tensors", out, m, g, c, b, cfg_for("compressed-tensors", group_size=24))
    assert not out.exists() or not any(out.iterdir())  # refusals write nothing


def test_transformers_still_misloads_mixed_width_layers(model_dirs, tmp_path):
    """The evidence behind refusing mixed 4/8-bit layers: a correctly written two-group checkpoint (4-bit layer 0,
    8-bit layer 1) loads without error but with wrong layer-1 weights, because transformers' fused-expert dequantizer
    uses one scheme for all experts. If this test fails, transformers fixed it: lift the refusal in
    export_compressed_tensors."""
    from transformers import AutoModelForCausalLM

    model, groups, chosen, _ = quantized(model_dirs["mixtral"], lambda i, e: 4 if i == 0 else 8)
    out = tmp_path / "mixed"
    out.mkdir()
    write_compressed_tensors(out, model, groups, chosen, {groups[0].layer: 4, groups[1].layer: 8}, G)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sorted(s["weights"]["num_bits"] for s in qc["config_groups"].values()) == [4, 8]
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    lgroups = find_expert_groups(loaded)
    assert torch.equal(lgroups[0].module.down_proj, groups[0].module.down_proj)  # the 4-bit layer is right
    assert not torch.allclose(lgroups[1].module.down_proj, groups[1].module.down_proj, atol=1e-3)


def test_mixed_width_layers_load_with_the_carried_fix_and_match_our_loader(model_dirs, tmp_path):
    """A width per MoE layer (4 and 8 bits) through --format compressed-tensors: from_pretrained under
    loader.ct_experts_scheme_per_layer gives bit-identical experts, and its logits match load_quantized's on the
    mopeq artifact of the same quantized matrices. The same checkpoint without the fix is still wrong (upstream)."""
    from transformers import AutoModelForCausalLM

    from mopeq_core.artifact import write_mopeq_artifact
    from mopeq_core.loader import load_compressed_tensors, load_quantized

    model, groups, chosen, bits = quantized(model_dirs["mixtral"], lambda i, e: 8 if i == 0 else 4)
    out = tmp_path / "ct-mixed"
    export("compressed-tensors", out, model, groups, chosen, bits, cfg_for("compressed-tensors", bits=(4, 8)))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sorted(s["weights"]["num_bits"] for s in qc["config_groups"].values()) == [4, 8]
    loaded = load_compressed_tensors(out, attn_implementation="eager")
    lgroups = find_expert_groups(loaded)
    for g, lg in zip(groups, lgroups):
        for p in g.projections:
            assert torch.equal(getattr(lg.module, p.name), getattr(g.module, p.name)), (g.layer, p.name)
    ours = tmp_path / "mopeq"
    write_mopeq_artifact(ours, model, groups, lambda g: {e: chosen[(g.layer, e)] for e in range(g.num_experts)},
                         bits, group_size=G, symmetric=True, quantizer="rtn")
    packed = load_quantized(ours, attn_implementation="eager")
    assert rel_err(logits(packed, IDS), logits(loaded, IDS)) <= LOGIT_RTOL
    # upstream state: stock from_pretrained decodes both layers with the first (4-bit) group: layer 0 is wrong
    stock = find_expert_groups(AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager"))
    assert torch.equal(stock[1].module.down_proj, groups[1].module.down_proj)
    assert not torch.allclose(stock[0].module.down_proj, groups[0].module.down_proj, atol=1e-3)


def test_layouts_without_per_expert_linears_are_refused(tmp_path):
    root = tmp_path / "m"
    for arch, msg in (("gpt_oss", "transposed"), ("granitemoe", "fused on disk")):
        d = tiny_models.build_model(arch, root)
        m, g, c, b = quantized(d, lambda i, e: 4)
        for fmt in ("compressed-tensors", "gptq"):
            with pytest.raises(ExportError, match=msg):
                export(fmt, tmp_path / f"{arch}-{fmt}", m, g, c, b, cfg_for(fmt))


# ---------------------------------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------------------------------


def unpack_gptq(words: torch.Tensor, bits: int, count: int, dim: int) -> list[list[int]]:
    """Independent reference: read ``count`` unsigned ``bits``-bit values per line from int32 ``words`` packed along
    ``dim`` as one little-endian bit stream (value i at bit i*bits), using Python integers."""
    w = words.tolist() if dim == 1 else words.t().tolist()
    mask = (1 << bits) - 1
    out = []
    for line in w:
        stream = 0
        for k, word in enumerate(line):
            stream |= (word & 0xFFFFFFFF) << (32 * k)
        out.append([(stream >> (i * bits)) & mask for i in range(count)])
    return out if dim == 1 else [list(col) for col in zip(*out)]


def resolve_dynamic(dynamic: dict, module: str):
    """What a GPTQModel/vLLM loader does with ``dynamic``: False for a negative match, the override dict for the
    first positive match, None when nothing matches (vLLM's get_dynamic_override semantics)."""
    for pattern, override in dynamic.items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], module):
                return False
        elif re.match(pattern.removeprefix("+:"), module):
            return override
    return None


def test_pack_dense_int32_matches_reference():
    g = torch.Generator().manual_seed(1)
    for b in (2, 3, 4, 8):
        v = torch.randint(0, 1 << b, (64, 5), generator=g)
        packed = pack_dense_int32(v, b, dim=0)
        assert packed.dtype == torch.int32 and packed.shape == (64 * b // 32, 5)
        assert unpack_gptq(packed, b, 64, dim=0) == v.tolist()
        packed1 = pack_dense_int32(v.t(), b, dim=1)
        assert unpack_gptq(packed1, b, 64, dim=1) == v.t().tolist()
    # AutoGPTQ 3-bit layout, first word: values 0..9 at 3*j, value 10's low two bits at 30..31
    v = torch.arange(32).remainder(8).view(32, 1)
    w0 = int(pack_dense_int32(v, 3, dim=0)[0, 0]) & 0xFFFFFFFF
    assert w0 == sum(int(v[j]) << (3 * j) for j in range(10)) | ((int(v[10]) & 3) << 30)
    with pytest.raises(ValueError):
        pack_dense_int32(torch.zeros(20, 1, dtype=torch.int64), 3, dim=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_files_reproduce_codes_and_scales(model_dirs, tmp_path, symmetric):
    widths = (2, 3, 4, 8, 4, 4)
    model, groups, chosen, bits = quantized(
        model_dirs["mixtral"], lambda i, e: widths[(i * 4 + e) % len(widths)], symmetric=symmetric)
    if not symmetric:  # a zero point of 0 (v1 cannot store it; v2 must)
        chosen[(groups[0].layer, 0)]["down_proj"].zeros[0, 0] = 0
    out = tmp_path / "gptq"
    files = export("gptq", out, model, groups, chosen, bits, cfg_for("gptq", symmetric=symmetric))
    assert all(f.exists() for f in files)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == ("gptq" if symmetric else "gptq_v2")
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    assert qc["group_size"] == G and qc["sym"] is symmetric and qc["desc_act"] is False
    assert qc["bits"] == 4  # the width most expert modules use

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in set(index.values()):
        with safe_open(str(out / shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    checked = 0
    # Mixtral on disk: experts.E.w1 = gate rows [0:F) and w3 = up rows [F:2F) of gate_up_proj; w2 = down_proj
    for g in groups:
        F = g.projection("down_proj").in_features
        for e in range(g.num_experts):
            b = bits[(g.layer, e)]
            for disk, proj, (r0, r1) in (("w1", "gate_up_proj", (0, F)), ("w3", "gate_up_proj", (F, 2 * F)),
                                         ("w2", "down_proj", (0, g.projection("down_proj").out_features))):
                mod = f"model.layers.{g.layer}.block_sparse_moe.experts.{e}.{disk}"
                qm = chosen[(g.layer, e)][proj]
                N, K = r1 - r0, qm.shape[1]
                ng = math.ceil(K / G)
                qweight, qzeros = tensors[f"{mod}.qweight"], tensors[f"{mod}.qzeros"]
                assert qweight.dtype == torch.int32 and qweight.shape == (K * b // 32, N)
                assert qzeros.dtype == torch.int32 and qzeros.shape == (ng, N * b // 32)
                codes = unpack_gptq(qweight, b, K, dim=0)  # [K][N]
                assert codes == qm.codes[r0:r1].t().tolist()
                zeros = unpack_gptq(qzeros, b, N, dim=1)  # [ng][N]; v1 stores zero - 1, v2 the zero itself
                assert [[z + symmetric for z in row] for row in zeros] == qm.zeros[r0:r1].t().tolist()
                assert torch.equal(tensors[f"{mod}.scales"], qm.scales[r0:r1].t())
                assert tensors[f"{mod}.scales"].dtype == torch.float16
                assert torch.equal(tensors[f"{mod}.g_idx"], torch.arange(K, dtype=torch.int32) // G)
                # the dynamic map gives this module its width
                rule = resolve_dynamic(qc["dynamic"], mod)
                assert rule is not False
                assert (rule or {}).get("bits", qc["bits"]) == b
                checked += 1
    assert checked == sum(g.num_experts * 3 for g in groups)
    # non-expert weights stay float and are skipped by negative rules
    for k, t in tensors.items():
        if k.endswith(".weight"):
            assert t.is_floating_point()
            if t.dim() == 2:
                assert resolve_dynamic(qc["dynamic"], k[: -len(".weight")]) is False, k


def test_gptq_layer_rules_match_fused_module_prefix(model_dirs, tmp_path):
    model, groups, chosen, bits = quantized(model_dirs["qwen2_moe"], lambda i, e: 8 if i == 0 else 4)
    out = tmp_path / "gptq-layer"
    export("gptq", out, model, groups, chosen, bits, cfg_for("gptq"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    # ties go to the wider width; the other layer gets one layer-wide override
    assert qc["bits"] == 8
    other = groups[1]
    assert resolve_dynamic(qc["dynamic"], other.path) == {"bits": 4}  # vLLM's FusedMoE prefix
    assert resolve_dynamic(qc["dynamic"], f"{other.path}.2.up_proj") == {"bits": 4}
    assert resolve_dynamic(qc["dynamic"], f"{groups[0].path}.2.up_proj") is None
    # shared expert and the dense layer's MLP are left unquantized
    assert resolve_dynamic(qc["dynamic"], "model.layers.0.mlp.shared_expert.gate_proj") is False
    assert resolve_dynamic(qc["dynamic"], "model.layers.1.mlp.down_proj") is False


def test_gptq_refusals(model_dirs, tmp_path):
    d = model_dirs["mixtral"]
    m, g, c, b = quantized(d, lambda i, e: 5)
    with pytest.raises(ExportError, match=r"packs widths \[2, 3, 4, 8\]"):
        export("gptq", tmp_path / "a", m, g, c, b, cfg_for("gptq"))
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


# ---------------------------------------------------------------------------------------------------------------------
# llama.cpp tensor-type overrides
# ---------------------------------------------------------------------------------------------------------------------

GGML_TYPES = {"q2_k", "q3_k", "q4_k", "q8_0"}


def test_gguf_overrides(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    model, groups, chosen, bits = quantized(model_dirs["mixtral"], lambda i, e: 3 if i == 0 else 2)
    out = tmp_path / "gguf"
    files = export("gguf-overrides", out, model, groups, chosen, bits, cfg_for("gguf-overrides"))
    assert out / "tensor-types.txt" in files and all(f.exists() for f in files)
    text = (out / "tensor-types.txt").read_text()
    assert text.split() == [
        "blk.0.ffn_gate_exps=q3_K", "blk.0.ffn_up_exps=q3_K", "blk.0.ffn_down_exps=q3_K",
        "blk.1.ffn_gate_exps=q2_K", "blk.1.ffn_up_exps=q2_K", "blk.1.ffn_down_exps=q2_K"]
    for token in text.split():  # what llama-quantize's parse_tensor_type_file accepts: name=type, no comments
        name, _, typ = token.partition("=")
        assert name and typ.lower() in GGML_TYPES and "#" not in token
        assert re.search(name, f"{name}.weight")  # a valid regex matching the tensor it names
    assert not re.search("blk.1.ffn_gate_exps", "blk.11.ffn_gate_exps.weight")
    # the fake-quantized weights, loadable by transformers (what convert_hf_to_gguf.py reads)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for g, lg in zip(groups, find_expert_groups(loaded)):
        assert torch.equal(lg.module.gate_up_proj, g.module.gate_up_proj)
    cmds = gguf_commands("OUT")
    assert "convert_hf_to_gguf.py OUT" in cmds[0] and "--tensor-type-file OUT/tensor-types.txt" in cmds[1]


def test_gguf_overrides_refusals(model_dirs, tmp_path):
    d = model_dirs["mixtral"]
    m, g, c, b = quantized(d, lambda i, e: 2 if e == 0 else 4)
    with pytest.raises(ExportError, match="one width per MoE layer"):
        export("gguf-overrides", tmp_path / "a", m, g, c, b, cfg_for("gguf-overrides"))
    m, g, c, b = quantized(d, lambda i, e: 6)
    with pytest.raises(ExportError, match="maps widths"):
        export("gguf-overrides", tmp_path / "b", m, g, c, b, cfg_for("gguf-overrides"))
    assert not any((tmp_path / "a").glob("*")) and not any((tmp_path / "b").glob("*"))


# ---------------------------------------------------------------------------------------------------------------------
# through the pipeline
# ---------------------------------------------------------------------------------------------------------------------


def test_pipeline_compressed_tensors_artifact_reproduces_report(model_dirs, tmp_path):
    """`--format compressed-tensors --granularity layer --bits 4`: the artifact loads with stock from_pretrained and
    its perplexity on the evaluation text equals the one in report.json (the fake-quantized model's)."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mopeq_core import engine
    from mopeq_core.config import Budget
    from mopeq_core.data import read_texts, token_samples
    from mopeq_core.evaluate import mean_token_loss

    eval_file = Path(tiny_models.REPO) / "data" / "eval.txt"
    cfg = QuantizeConfig(model=str(model_dirs["mixtral"]), budget=Budget(avg_bits=4.0), bits=(4,), group_size=G,
                         calib_samples=4, seq_len=32, probes=2, sensitivity="input-hessian", quantizer="rtn",
                         calib_file=str(eval_file), eval_file=str(eval_file), eval_samples=4,
                         format="compressed-tensors", granularity="layer")
    out = tmp_path / "run"
    result = engine.run(cfg, out)
    names = {f.name for f in result.files}
    assert {"config.json", "bitmap.json", "report.json", "README.md", "bitmap.png"} <= names
    assert any(n.endswith(".safetensors") for n in names) and any(n.startswith("tokenizer") for n in names)
    front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert "compressed-tensors" in front["tags"] and front["library_name"] == "transformers"

    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(out)
    samples = token_samples(tok, read_texts(eval_file), 4, 32)
    ppl = math.exp(mean_token_loss(loaded, samples))
    assert ppl == pytest.approx(result.report["perplexity"]["quantized_perplexity"], rel=1e-5)
