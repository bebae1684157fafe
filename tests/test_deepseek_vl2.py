"""Native DeepSeek-VL2 against the real code: fixtures made by scripts/vlm_reference/make_deepseek_vl2_fixtures.py
(the published deepseek-ai/DeepSeek-VL2 model run on tiny random configs; see the fixtures' README). Our model loads
each fixture's state dict key for key and reproduces its logits (float32, 1e-5) and its expert routing; our
processor reproduces the real processor's tokens, image tiles and image mask. Also: real-size configs, registration,
and what save/load keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mopeq_core.models import register_all
from mopeq_core.models.deepseek_vl2.configuration import DeepseekVLV2Config
from mopeq_core.models.deepseek_vl2.modeling import DeepseekVL2MoEGate, DeepseekVLV2ForCausalLM
from mopeq_core.models.deepseek_vl2.processing import (
    DeepseekVL2ImageProcessor,
    DeepseekVLV2Processor,
    select_best_resolution,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "vlm_reference" / "deepseek_vl2"
REAL_CONFIGS = REPO / "tests" / "fixtures" / "real_configs"
VARIANTS = ["mha_greedy", "mla_group_limited", "mla_noaux_vision"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    register_all()
    yield
    torch.set_num_threads(n)


def _fixture(name):
    t = load_file(str(FIXTURES / f"{name}.safetensors"))
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    pick = {p: {k[len(p) + 1:]: v for k, v in t.items() if k.startswith(p + ".")} for p in ("state", "input", "routing")}
    return meta, pick["state"], pick["input"], t["logits"], {int(k): v for k, v in pick["routing"].items()}


def _model(meta, state):
    cfg = DeepseekVLV2Config(**meta["config"])
    model = DeepseekVLV2ForCausalLM(cfg).eval()
    res = model.load_state_dict(state, strict=False)
    return model, res


def _run_with_routing(model, inputs):
    routing, hooks = {}, []
    for i, layer in enumerate(model.language.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if isinstance(gate, DeepseekVL2MoEGate):
            hooks.append(gate.register_forward_hook(lambda m, a, out, i=i: routing.__setitem__(i, out[0])))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, routing


@pytest.mark.parametrize("name", VARIANTS)
def test_matches_the_real_code(name):
    meta, state, inputs, real_logits, real_routing = _fixture(name)
    assert meta["real_commit"] and meta["real_commit"] != "unknown"
    model, res = _model(meta, state)
    assert not res.missing_keys and not res.unexpected_keys  # key for key
    inputs.pop("image_token_id", None)
    logits, routing = _run_with_routing(model, inputs)
    torch.testing.assert_close(logits, real_logits, rtol=0, atol=1e-5)
    assert sorted(routing) == sorted(real_routing) and routing
    for i, idx in routing.items():  # the same experts for every token (top-k order is unspecified: sorted=False)
        assert torch.equal(idx.sort(-1).values, real_routing[i].sort(-1).values), f"layer {i}"
    if "vision" in name:  # the image path ran: image positions carry features, not token embeddings
        assert int(inputs["images_spatial_crop"].sum()) > 0 and int(inputs["images_seq_mask"].sum()) > 0


def test_routing_and_layout_variants_are_covered():
    langs = {n: _fixture(n)[0]["config"]["language_config"] for n in VARIANTS}
    assert {c["use_mla"] for c in langs.values()} == {True, False}
    assert {c["topk_method"] for c in langs.values()} == {"greedy", "group_limited_greedy", "noaux_tc"}
    assert {c["scoring_func"] for c in langs.values()} == {"softmax", "sigmoid"}
    assert any(c.get("moe_layer_freq", 1) == 2 for c in langs.values())
    assert any(c.get("q_lora_rank") for c in langs.values()) and any(c.get("rope_scaling") for c in langs.values())


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(REPO / "models" / "mopeq-tiny-moe"))


def _processor(meta):
    cfg = meta["config"]
    ip = DeepseekVL2ImageProcessor(candidate_resolutions=cfg["candidate_resolutions"],
                                   patch_size=cfg["vision_config"]["patch_size"],
                                   downsample_ratio=cfg["projector_config"]["downsample_ratio"])
    return DeepseekVLV2Processor(image_processor=ip, tokenizer=_tokenizer())


def test_processor_matches_the_real_processor():
    from PIL import Image

    meta, _, inputs, _, _ = _fixture("mla_noaux_vision")
    proc = _processor(meta)
    assert proc.image_token_id == int(inputs["image_token_id"])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": "What do the two pictures show?"}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == meta["prompt"]
    # the published "deepseek" conversation: system + sep "\n\n", user turns end in sep, answers in sep2 (EOS)
    conv = [{"role": "system", "content": "Be brief."}, msgs[0],
            {"role": "assistant", "content": [{"type": "text", "text": "Two pictures."}]}]
    eos = proc.tokenizer.eos_token
    assert proc.apply_chat_template(conv, tokenize=False) == f"Be brief.\n\n{text[:-len('<|Assistant|>:')]}" \
        f"<|Assistant|>: Two pictures.{eos}"
    images = [Image.open(REPO / "data" / "vlm" / "images" / n).convert("RGB") for n in meta["images"]]
    enc = proc(text=[text], images=images)
    assert torch.equal(enc["input_ids"], inputs["input_ids"])
    assert torch.equal(enc["images_seq_mask"], inputs["images_seq_mask"])
    assert torch.equal(enc["images_spatial_crop"], inputs["images_spatial_crop"])
    torch.testing.assert_close(enc["images"], inputs["images"], rtol=0, atol=0)
    assert torch.equal(enc["attention_mask"].bool(), inputs["attention_mask"].bool())


def test_best_resolution_and_token_count():
    cands = [[384, 384], [384, 768], [768, 384], [768, 768], [1152, 384]]
    assert select_best_resolution((1000, 300), cands) == (1152, 384)
    assert select_best_resolution((300, 700), cands) == (384, 768)
    assert select_best_resolution((100, 100), cands) == (384, 384)  # same coverage: the least padding wins
    ip = DeepseekVL2ImageProcessor(candidate_resolutions=cands, patch_size=14, downsample_ratio=2)
    # VL2 at 384 px: 27×27 patches -> 14×14 tokens per tile; global 14·15, separator, 2 tiles wide 14·29
    assert ip.num_image_tokens(2, 1) == 14 * 15 + 1 + 14 * 29


def test_save_and_reload_keeps_logits_and_buffers_free(tmp_path):
    """The rotary tables are computed in the forward (transformers 5 materialises modules on meta in
    from_pretrained and would leave non-persistent buffers uninitialised): reload gives the same logits."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    meta, state, inputs, real_logits, _ = _fixture("mla_group_limited")
    model, _ = _model(meta, state)
    assert not list(model.buffers())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "deepseek_vl_v2" and "auto_map" not in saved
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert type(cfg) is DeepseekVLV2Config and cfg.get_text_config().hidden_size == 32
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        again = auto.from_pretrained(tmp_path).eval()
        assert type(again) is DeepseekVLV2ForCausalLM
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=inputs["input_ids"]).logits, real_logits, rtol=0, atol=1e-5)


def test_generate_with_cache_equals_full_recompute():
    meta, state, inputs, _, _ = _fixture("mla_noaux_vision")
    model, _ = _model(meta, state)
    inputs.pop("image_token_id")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        seq = inputs["input_ids"]
        for _ in range(4):  # greedy decoding without a cache: the whole sequence each step
            n = seq.shape[1] - inputs["input_ids"].shape[1]
            mask = torch.cat([inputs["images_seq_mask"], torch.zeros(1, n, dtype=torch.bool)], dim=1)
            logits = model(input_ids=seq, images=inputs["images"], images_seq_mask=mask,
                           images_spatial_crop=inputs["images_spatial_crop"]).logits
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_routed_experts_get_gradients_in_eval_mode():
    meta, state, inputs, _, _ = _fixture("mha_greedy")
    model, _ = _model(meta, state)
    moe = model.language.model.layers[1].mlp
    loss = model(input_ids=inputs["input_ids"]).logits.square().mean()
    grads = torch.autograd.grad(loss, [e.down_proj.weight for e in moe.experts], allow_unused=True)
    assert model.training is False and sum(g is not None and bool(g.abs().sum() > 0) for g in grads) >= 2


def test_streamed_engine_gives_the_resident_bit_map(tmp_path):
    """The layer-streaming path (meta skeleton, layers read from the safetensors one at a time) works on the native
    model (its language config, not the top level, holds hidden_size) and gives the resident run's bit map."""
    import vlm_models as vm

    from mopeq_core import engine
    from mopeq_core.config import Budget, QuantizeConfig

    src = vm.build_deepseek_vl2(tmp_path / "src")
    maps = []
    for low in (False, True):
        cfg = QuantizeConfig(model=str(src), budget=Budget(avg_bits=2.5), group_size=16, calib_samples=3,
                             seq_len=24, probes=2, sensitivity="hutchinson", quantizer="rtn",
                             calib_file=str(vm.VLM_DATA / "calib.jsonl"), eval_file=None, low_memory=low)
        res = engine.run(cfg, tmp_path / f"out{int(low)}")
        maps.append([[e["bits"] for e in layer["experts"]] for layer in res.bitmap["layers"]])
        assert res.report["modality"] == "image+text"
    assert maps[0] == maps[1] and len(maps[0]) == 2


@pytest.mark.parametrize("name,published,moe_layers", [("deepseek-vl2-tiny", 3.37e9, 11),
                                                       ("deepseek-vl2-small", 16.1e9, 26),
                                                       ("deepseek-vl2", 27.5e9, 29)])
def test_real_size_configs_match_the_published_parameter_counts(name, published, moe_layers):
    """`mopeq estimate --local` on the config-only directories (the model built on the meta device): totals within
    1 % of the DeepSeek-VL2 README's ("3.37B-MoE in total", "16.1B-MoE", "27.5-MoE"), the routed experts counted
    as experts (64 / 64 / 72 per MoE layer), the vision tower and everything else as non-expert."""
    from transformers import AutoConfig

    from mopeq_core.meta_checkpoint import estimate_local

    raw = json.loads((REAL_CONFIGS / name / "config.json").read_text())
    lang = raw["language_config"]
    est = estimate_local(REAL_CONFIGS / name)
    assert abs(est.total_params - published) / published < 0.01, est.total_params
    assert est.moe_layers == moe_layers and est.num_experts == moe_layers * lang["n_routed_experts"]
    assert est.expert_params == moe_layers * lang["n_routed_experts"] * 3 * lang["hidden_size"] * \
        lang["moe_intermediate_size"]
    # the language config keeps what the checkpoint says; the top level has no hidden_size of its own
    cfg = AutoConfig.from_pretrained(REAL_CONFIGS / name)
    assert type(cfg) is DeepseekVLV2Config and cfg.language_config.model_type == "deepseek_vl_v2_language"
    assert "hidden_size" not in raw and cfg.get_text_config().hidden_size == lang["hidden_size"]


def test_sensitivity_reaches_experts_behind_a_no_grad_dispatch():
    """Remote-code MoE blocks like the published DeepSeek-VL2 run their experts under @torch.no_grad() in eval
    mode (moe_infer); sensitivity._GradThroughExperts still gets their curvature. Shown on the native model with its
    MoE blocks switched to such a dispatch (same computation)."""
    from mopeq_core.calibrate import calibrate
    from mopeq_core.models.deepseek_vl2.modeling import DeepseekVL2MoE
    from mopeq_core.moe import find_expert_groups
    from mopeq_core.sensitivity import SensitivityContext, compute_sensitivity

    class NoGradDispatchMoE(DeepseekVL2MoE):
        def forward(self, hidden_states):
            shape = hidden_states.shape
            idx, weight = self.gate(hidden_states)
            y = self.moe_infer(hidden_states.reshape(-1, shape[-1]), idx, weight).view(shape)
            return y + self.shared_experts(hidden_states)

        @torch.no_grad()
        def moe_infer(self, x, idx, weight):
            out = torch.stack([torch.stack([self.experts[int(e)](x[t]) for e in idx[t]]) for t in range(len(x))])
            return (out * weight.unsqueeze(-1).to(out.dtype)).sum(1)

    meta, state, inputs, _, _ = _fixture("mha_greedy")
    model, _ = _model(meta, state)
    for layer in model.language.model.layers:
        if isinstance(layer.mlp, DeepseekVL2MoE):
            layer.mlp.__class__ = NoGradDispatchMoE
    w = model.language.model.layers[1].mlp.experts[0].down_proj.weight
    out = model(input_ids=inputs["input_ids"]).logits.sum()
    assert torch.autograd.grad(out, w, allow_unused=True)[0] is None  # the dispatch hides the experts
    groups = find_expert_groups(model)
    samples = inputs["input_ids"]
    stats = calibrate(model, groups, samples, collect_hessians=False)
    res = compute_sensitivity("hutchinson", SensitivityContext(model, groups, stats, samples, probes=2,
                                                               min_probes=2, tol=10.0))
    assert all(any(abs(v) > 0 for v in scores) for scores in res.scores.values())


def test_processor_reads_the_published_flat_processor_config(tmp_path):
    """Hub checkpoints carry the published code's processor_config.json (flat keys, written by its
    DeepseekVLV2Processor) and the tokenizer; AutoProcessor builds our processor from them."""
    import vlm_models as vm
    from transformers import AutoProcessor

    from mopeq_core.multimodal import load_processor

    meta, _, inputs, _, _ = _fixture("mla_noaux_vision")
    cfg = meta["config"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    flat = {"add_special_token": False, "candidate_resolutions": cfg["candidate_resolutions"],
            "downsample_ratio": 2, "ignore_id": -100, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "image_token": "<image>", "mask_prompt": False, "normalize": True, "pad_token": "<｜▁pad▁｜>",
            "patch_size": cfg["vision_config"]["patch_size"], "processor_class": "DeepseekVLV2Processor",
            "sft_format": "deepseek"}
    (tmp_path / "processor_config.json").write_text(json.dumps(flat))
    vm.tokenizer([]).save_pretrained(tmp_path)
    for proc in (AutoProcessor.from_pretrained(tmp_path), load_processor(tmp_path)):
        assert type(proc) is DeepseekVLV2Processor
        assert proc.image_processor.candidate_resolutions == cfg["candidate_resolutions"]
        assert proc.image_token_id == int(inputs["image_token_id"])


def test_left_padded_batch_generates_what_each_row_generates_alone():
    """Batch generation with left padding: the padding is masked (in the prompt and in the cache), so each row
    continues as it would alone."""
    meta, state, inputs, _, _ = _fixture("mla_group_limited")
    model, _ = _model(meta, state)
    ids = inputs["input_ids"]
    short = ids[1:, 4:]
    batch = torch.cat([ids[:1], torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    with torch.no_grad():
        out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        alone = [model.generate(input_ids=x, max_new_tokens=3, do_sample=False, pad_token_id=0)
                 for x in (ids[:1], short)]
    assert torch.equal(out[0, -3:], alone[0][0, -3:]) and torch.equal(out[1, -3:], alone[1][0, -3:])
