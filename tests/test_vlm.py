"""Vision-language MoE models end to end: tiny random Qwen3-VL-MoE (transformers' own classes, vision + text) and
MoPEQ's native DeepSeek-VL2 and MolmoE (mopeq_core.models, no remote code), at 2.5 mean bits, calibrated and evaluated
on the shipped image+text set (data/vlm) through their processors; the artifact reloads with load_quantized, keeps the
vision weights bit for bit and answers a prompt about an image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import vlm_models as vm

from mopeq_core import engine
from mopeq_core.calibrate import calibrate
from mopeq_core.config import Budget, QuantizeConfig
from mopeq_core.data import IGNORE_INDEX, SampleSet, load_samples, num_targets, read_records
from mopeq_core.errors import CalibrationDataError
from mopeq_core.evaluate import mean_token_loss
from mopeq_core.loader import load_quantized
from mopeq_core.loading import load_model, load_tokenizer
from mopeq_core.moe import find_expert_groups
from mopeq_core.multimodal import (
    encode_example,
    generate_answer,
    image_token_ids,
    is_vision_name,
    load_processor,
    vision_state,
)
from mopeq_core.sensitivity import SensitivityContext, compute_sensitivity

CALIB = vm.VLM_DATA / "calib.jsonl"
EVAL = vm.VLM_DATA / "eval.jsonl"

BUILDERS = {"qwen3_vl_moe": (vm.build_qwen3_vl_moe, False),
            "deepseek_vl2": (vm.build_deepseek_vl2, False),
            "molmoe": (vm.build_molmoe, False)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {name: build(root) for name, (build, _) in BUILDERS.items()}


def _load(model_dir: Path, trust: bool):
    return (load_model(model_dir, trust_remote_code=trust), load_tokenizer(model_dir, trust_remote_code=trust),
            load_processor(model_dir, trust_remote_code=trust))


# ---- data --------------------------------------------------------------------------------------------------------
def test_shipped_image_text_set_is_small_licensed_and_readable():
    rows = read_records(CALIB) + read_records(EVAL)
    assert len(rows) >= 20 and all(r["image"] is not None and r["image"].is_file() for r in rows)
    assert not {r["image"] for r in read_records(CALIB)} & {r["image"] for r in read_records(EVAL)}
    size = sum(p.stat().st_size for p in vm.VLM_DATA.rglob("*") if p.is_file())
    assert size < 2_000_000
    licence = (vm.VLM_DATA / "LICENSE.md").read_text()
    for r in rows:  # every image is named in the license note
        assert f"images/{r['image'].name}" in licence


def test_image_paths_are_checked(tmp_path):
    (tmp_path / "sub").mkdir()
    img = tmp_path / "sub" / "a.png"
    img.write_bytes((vm.VLM_DATA / "images" / "horse.png").read_bytes())
    for bad, msg in [("../a.png", "inside"), ("/etc/passwd", "inside"), ("missing.png", "does not exist"),
                     (3, "relative")]:
        f = tmp_path / "sub" / "d.jsonl"
        f.write_text(json.dumps({"text": "x", "image": bad}) + "\n")
        with pytest.raises(CalibrationDataError, match=msg):
            read_records(f)
    f.write_text(json.dumps({"text": "a horse", "image": "a.png"}) + "\n")
    assert read_records(f)[0]["image"] == img.resolve()
    tok = vm.tokenizer([])
    with pytest.raises(CalibrationDataError, match="no image processor"):
        load_samples(f, tok, 4, 16, processor=None)


def test_vlm_loads_with_its_processor_and_image_samples(model_dirs):
    model, tok, proc = _load(model_dirs["qwen3_vl_moe"], False)
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration" and proc is not None
    groups = find_expert_groups(model)
    # the language model's experts only; the vision tower has none
    assert [g.path for g in groups] == [f"model.language_model.layers.{i}.mlp.experts" for i in (0, 1)]
    samples = load_samples(CALIB, tok, 4, 32, processor=proc)
    assert isinstance(samples, SampleSet) and len(samples) == 4
    item = samples[0]
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "labels"} <= set(item)
    image_pos = torch.isin(item["input_ids"], torch.tensor(sorted(image_token_ids(proc))))
    assert int(image_pos.sum()) > 0 and bool((item["labels"][image_pos] == IGNORE_INDEX).all())
    assert num_targets(samples) > 0 and len(samples[1:3]) == 2
    # with a "prompt", only the answer after it takes loss
    ex = encode_example(proc, "apples 12", vm.VLM_DATA / "images" / "bar_fruit.png", prompt="What does it show?")
    kept = tok.decode(ex["input_ids"][0][ex["labels"][0] != IGNORE_INDEX])
    assert kept.startswith("apples 12") and "show" not in kept
    # text-only data for a VLM stays token windows
    text = load_samples(None, tok, 2, 32, processor=proc)
    assert isinstance(text, torch.Tensor) and text.shape == (2, 32)
    assert mean_token_loss(model, text) > 0


def test_native_deepseek_vl2_loads_without_remote_code_and_experts_get_hessians(model_dirs):
    """The native DeepSeek-VL2 resolves with remote code off, calibrates on image+text samples made by its own
    processor (tiles, image mask), and every MoE layer's experts get a non-zero Hutchinson score (its routed
    experts run with autograd; the published code runs them under torch.no_grad() in eval mode)."""
    model, tok, proc = _load(model_dirs["deepseek_vl2"], False)
    assert type(model).__name__ == "DeepseekVLV2ForCausalLM" and type(proc).__name__ == "DeepseekVLV2Processor"
    groups = find_expert_groups(model)
    assert [g.path for g in groups] == [f"language.model.layers.{i}.mlp.experts" for i in (1, 2)]
    samples = load_samples(CALIB, tok, 3, 24, processor=proc)
    item = samples[0]
    assert {"images", "images_seq_mask", "images_spatial_crop", "labels"} <= set(item)
    assert int(item["images_seq_mask"].sum()) > 0 and bool((item["labels"][item["images_seq_mask"]] == -100).all())
    stats = calibrate(model, groups, samples, collect_hessians=False)
    res = compute_sensitivity("hutchinson", SensitivityContext(model, groups, stats, samples, probes=2,
                                                               min_probes=2, tol=10.0))
    assert all(any(abs(v) > 0 for v in scores) for scores in res.scores.values())


# ---- the MoE blocks route like the originals (dense per-token reference) -----------------------------------------
def _reference_moe(x, gate_w, experts, top_k, renorm, scale):
    """Dense per-token reference: softmax router, top-k, optional renormalisation, weighted sum of experts."""
    scores = torch.softmax(x.float() @ gate_w.float().t(), dim=-1)
    w, idx = torch.topk(scores, top_k, dim=-1)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    w = w * scale
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(top_k):
            out[t] += w[t, k].to(x.dtype) * experts[int(idx[t, k])](x[t: t + 1])[0]
    return out


def test_moe_blocks_route_like_the_originals(model_dirs):
    ds, _, _ = _load(model_dirs["deepseek_vl2"], False)
    x = torch.randn(2, 5, ds.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(0))
    layers = ds.language.model.layers
    assert not hasattr(layers[0].mlp, "experts")  # dense first layer (first_k_dense_replace = 1)
    moe = layers[1].mlp
    assert len(moe.experts) == 16 and moe.gate.top_k == 4
    flat = x.reshape(-1, x.shape[-1])
    ref = _reference_moe(flat, moe.gate.weight, moe.experts, 4, False, 1.0) + moe.shared_experts(flat)
    with torch.no_grad():
        got = moe(x).reshape(-1, x.shape[-1])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)

    import transformers

    mo, _, _ = _load(model_dirs["molmoe"], False)
    block = mo.model.transformer.blocks[0].mlp
    cfg = transformers.OlmoeConfig(hidden_size=mo.config.d_model, intermediate_size=mo.config.mlp_hidden_size // 2,
                                   num_experts=16, num_experts_per_tok=4, norm_topk_prob=False)
    olmoe = transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        olmoe.gate.weight.copy_(block.gate.weight)
        for e, ex in enumerate(block.experts):
            olmoe.experts.gate_up_proj[e].copy_(torch.cat([ex.gate_proj.weight, ex.up_proj.weight]))
            olmoe.experts.down_proj[e].copy_(ex.down_proj.weight)
        normed = block.ff_norm(x)
        torch.testing.assert_close(block(x)[0], olmoe(normed), rtol=1e-5, atol=1e-6)


# ---- the whole pipeline ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BUILDERS))
def test_pipeline_quantizes_vlm_and_keeps_vision_exact(model_dirs, tmp_path, name):
    trust = BUILDERS[name][1]
    src = model_dirs[name]
    cfg = QuantizeConfig(model=str(src), budget=Budget(avg_bits=2.5), group_size=16, calib_samples=6, seq_len=32,
                         probes=2, sensitivity="hutchinson", quantizer="gptq", calib_file=str(CALIB),
                         eval_file=str(EVAL), eval_samples=4, trust_remote_code=trust)
    result = engine.run(cfg, tmp_path)
    report, bitmap = result.report, result.bitmap
    assert report["modality"] == "image+text"
    cov = report["calibration"]  # every expert saw data: routed tokens, or all-token fallback statistics
    assert cov["experts"] - cov["experts_with_tokens"] <= cov["fallback_experts"]
    ppl = report["perplexity"]
    assert ppl["eval_tokens"] > 0 and ppl["fp_perplexity"] > 1 and ppl["quantized_perplexity"] > 1
    sizes = report["sizes"]
    assert sizes["non_expert_by_component"]["vision"] > 0
    assert sum(sizes["non_expert_by_component"].values()) == sizes["non_expert_bytes"]
    assert bitmap["total_bytes"] == bitmap["expert_bytes"] + sizes["non_expert_bytes"]
    original = load_model(src, trust_remote_code=trust)
    groups = find_expert_groups(original)
    assert [x["module"] for x in bitmap["layers"]] == [g.path for g in groups]
    assert not any(is_vision_name(g.path) for g in groups)
    assert {b for layer in bitmap["layers"] for b in (e["bits"] for e in layer["experts"])} <= {2, 3, 4}

    assert (tmp_path / "processor_config.json").is_file()
    q = load_quantized(tmp_path, trust_remote_code=trust)
    a, b = vision_state(original), vision_state(q)
    assert a and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the reloaded artifact computes what the pipeline measured
    proc = load_processor(tmp_path, trust_remote_code=trust)
    tok = load_tokenizer(tmp_path, trust_remote_code=trust)
    ev = load_samples(EVAL, tok, 4, 32, processor=proc)
    assert mean_token_loss(q, ev) == pytest.approx(float(torch.tensor(ppl["quantized_perplexity"]).log()),
                                                   rel=1e-4)
    answer = generate_answer(q, proc, vm.VLM_DATA / "images" / "rocket.png", "What is in the picture?",
                             max_new_tokens=4)
    assert isinstance(answer, str) and answer.strip()


# ---- other MoE VLMs transformers ships -------------------------------------------------------------------------
def _glm4v_moe():
    import transformers

    text = {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "n_routed_experts": 4,
            "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "head_dim": 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                "partial_rotary_factor": 0.5}}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "patch_size": 8,
              "out_hidden_size": 32, "spatial_merge_size": 2, "temporal_patch_size": 2, "image_size": 32}
    return transformers.Glm4vMoeConfig(text_config=text, vision_config=vision, image_token_id=250, video_token_id=251,
                                       image_start_token_id=252, image_end_token_id=253)


def _aria():
    import transformers

    text = {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "moe_num_experts": 4,
            "moe_topk": 2, "moe_num_shared_experts": 1, "head_dim": 8, "pad_token_id": 0}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    return transformers.AriaConfig(text_config=text, vision_config=vision, projector_patch_to_query_dict={"16": 4},
                                   image_token_index=250)


@pytest.mark.parametrize("make", [_glm4v_moe, _aria], ids=["glm4v_moe", "aria"])
def test_other_moe_vlms_load_with_the_image_text_class(make):
    """GLM-4V-MoE and Aria: the image-text class is chosen, only the language model's experts are found, the vision
    side counts as full-precision bytes, and the text path runs (their image paths are not exercised here)."""
    from mopeq_core.multimodal import auto_model_class, component_bytes, is_vlm_config

    cfg = make()
    assert is_vlm_config(cfg) and auto_model_class(cfg).__name__ == "AutoModelForImageTextToText"
    torch.manual_seed(0)
    model = auto_model_class(cfg).from_config(cfg, attn_implementation="eager", experts_implementation="eager").eval()
    groups = find_expert_groups(model)
    assert groups and all(g.path.startswith("model.language_model.layers.") for g in groups)
    parts = component_bytes(model, groups)
    assert parts["vision"] > 0 and parts["router"] > 0
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, groups, ids, collect_hessians=False)
    assert stats.coverage()["experts"] == sum(g.num_experts for g in groups)
