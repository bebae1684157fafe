"""Native MolmoE-1B against the public MolmoE code: fixtures made by scripts/vlm_reference/make_molmoe_fixtures.py
(the real modeling/processing code on a tiny random config; see tests/fixtures/vlm_reference/molmoe/README.md).
Our model loads the real state dict key for key and gives the same final hidden states and logits (1e-5, float32)
and the same routed experts; our processor gives the same model inputs. Plus: the Auto classes resolve the
checkpoint's model_type without remote code, save/load keeps the logits, cached generation equals uncached, and
the real-size config has MolmoE-1B's published parameter count."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

from mopeq_core.models import register_all
from mopeq_core.models.molmoe.configuration_molmoe import MolmoConfig
from mopeq_core.models.molmoe.modeling_molmoe import MolmoForCausalLM
from mopeq_core.models.molmoe.processing_molmoe import MolmoImageProcessor, MolmoProcessor

FIX = Path(__file__).parent / "fixtures" / "vlm_reference" / "molmoe"
REAL_CONFIG = Path(__file__).parent / "fixtures" / "real_configs" / "molmoe-1b" / "config.json"
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "models" / "mopeq-tiny-moe"


@pytest.fixture(scope="module")
def ref():
    meta = json.loads((FIX / "molmoe_reference.json").read_text())
    return meta, load_file(str(FIX / "molmoe_reference.safetensors"))


@pytest.fixture(scope="module")
def model(ref):
    meta, t = ref
    m = MolmoForCausalLM(MolmoConfig(**meta["config"])).eval()
    state = {k[len("state."):]: v.float() for k, v in t.items() if k.startswith("state.")}
    result = m.load_state_dict(state, strict=True)  # key for key: nothing missing, nothing unexpected
    assert not result.missing_keys and not result.unexpected_keys
    assert set(m.state_dict()) == set(state)
    return m


def _processor(meta):
    tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.add_special_tokens({"additional_special_tokens": meta["extra_tokens"]})
    return MolmoProcessor(MolmoImageProcessor(**meta["image_kwargs"]), tok)


def _run(model, batch):
    routed, final = [], []
    hooks = [b.mlp.gate.register_forward_hook(
        lambda mod, a, out, k=b.mlp.top_k: routed.append(torch.topk(out.float().softmax(-1), k, dim=-1).indices))
        for b in model.model.transformer.blocks]
    hooks.append(model.model.transformer.ln_f.register_forward_hook(lambda m, a, o: final.append(o)))
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    for h in hooks:
        h.remove()
    return logits, final[0], routed


@pytest.mark.parametrize("case", ["image", "text"])
def test_logits_and_routing_match_the_real_code(model, ref, case):
    meta, t = ref
    batch = {k: t[f"{case}.{k}"].unsqueeze(0) for k in ("input_ids", "images", "image_input_idx", "image_masks")
             if f"{case}.{k}" in t}
    logits, hidden, routed = _run(model, batch)
    torch.testing.assert_close(hidden[0], t[f"{case}.hidden"], rtol=0, atol=1e-5)
    tail = t[f"{case}.logits"]
    torch.testing.assert_close(logits[0, -tail.shape[0]:], tail, rtol=0, atol=1e-5)
    assert len(routed) == model.config.n_layers
    for layer, idx in enumerate(routed):
        assert torch.equal(idx.to(torch.int16), t[f"{case}.routing.{layer}"])
    if case == "image":  # the image changes every later position: the check is not passing for text alone
        no_image = model(input_ids=batch["input_ids"]).logits[0, -tail.shape[0]:]
        assert (no_image - tail).abs().max() > 1e-2


def test_padded_batch_matches_the_real_code(model, ref):
    _, t = ref
    batch = {"input_ids": t["batch.input_ids"], "attention_mask": t["batch.attention_mask"]}
    logits, _, routed = _run(model, batch)
    torch.testing.assert_close(logits, t["batch.logits"], rtol=0, atol=1e-5)
    for layer, idx in enumerate(routed):
        assert torch.equal(idx.to(torch.int16), t[f"batch.routing.{layer}"])
    # bfloat16: the padded row's all-masked attention rows must not turn into NaN
    bf = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        out = bf(**batch).logits.float()
    assert torch.isfinite(out).all() and (out - t["batch.logits"]).abs().max() < 0.5


def test_processor_matches_the_real_processor(ref):
    meta, t = ref
    proc = _processor(meta)
    image = Image.fromarray(t["raw_image"].numpy())
    got = proc.process(meta["prompts"][0], images=[image])
    assert set(got) == {"input_ids", "images", "image_input_idx", "image_masks"}
    for k in got:
        assert got[k].shape == t[f"image.{k}"].shape, k
        assert torch.equal(got[k].to(t[f"image.{k}"].dtype), t[f"image.{k}"]), k
    text = proc.process(meta["prompts"][1])
    assert torch.equal(text["input_ids"].to(t["text.input_ids"].dtype), t["text.input_ids"])
    # the batched call used by calibration: the chat template gives the same prompt text
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": meta["prompts"][0]}]}]
    prompt = proc.apply_chat_template(msgs, tokenize=False)
    assert prompt == " User: " + meta["prompts"][0] + " Assistant:"
    enc = proc(text=[prompt], images=[image], return_tensors="pt")
    assert torch.equal(enc["input_ids"][0].to(torch.int32), t["image.input_ids"].to(torch.int32))
    assert torch.equal(enc["images"][0], t["image.images"])


def test_processor_at_molmoe_1b_settings_matches_the_real_processor(ref):
    """The real preprocessing at MolmoE-1B's own settings (336 px crops, margins 4/4, up to 12 crops)."""
    meta, t = ref
    tok = _processor(meta).tokenizer
    big = Image.fromarray(np.tile(t["raw_image"].numpy(), (5, 8, 1)))  # as the fixture script
    got = MolmoProcessor(MolmoImageProcessor(), tok).process(meta["prompts"][0], images=[big])
    assert got["images"].shape[0] == 7  # the global view and 2 x 3 overlapping crops
    assert torch.equal(got["input_ids"], t["full.input_ids"])
    assert torch.equal(got["image_input_idx"].to(torch.int32), t["full.image_input_idx"])
    assert torch.equal(got["image_masks"], t["full.image_masks"])
    crops = got["images"].double()
    assert torch.equal(crops.sum(-1), t["full.images_sum"]) and torch.equal((crops ** 2).sum(-1), t["full.images_sumsq"])


def test_auto_classes_save_load_and_cached_generation(model, ref, tmp_path):
    meta, t = ref
    register_all()
    model.save_pretrained(tmp_path)
    _processor(meta).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "molmo"
    # a checkpoint as on the Hub names remote code in auto_map; the native classes still win
    cfg["auto_map"] = {"AutoConfig": "config_molmoe.MolmoConfig",
                       "AutoModelForCausalLM": "modeling_molmoe.MolmoForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from mopeq_core.loading import load_model
    from mopeq_core.multimodal import load_processor

    again = load_model(tmp_path)  # trust_remote_code=False
    assert type(again) is MolmoForCausalLM
    # even where remote code is allowed it is not run (the auto_map's files do not even exist here)
    assert type(load_model(tmp_path, trust_remote_code=True)) is MolmoForCausalLM
    batch = {k: t[f"image.{k}"].unsqueeze(0) for k in ("input_ids", "images", "image_input_idx", "image_masks")}
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    proc = load_processor(tmp_path)
    assert type(proc) is MolmoProcessor and type(proc.image_processor) is MolmoImageProcessor
    # greedy generation with the KV cache equals recomputing the whole sequence each step
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = batch["input_ids"]
    for _ in range(6):
        with torch.no_grad():
            nxt = model(**{**batch, "input_ids": seq}, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


@pytest.fixture(scope="module")
def real_size():
    """MolmoE-1B built from its config.json on the meta device (no memory)."""
    raw = json.loads(REAL_CONFIG.read_text())
    with torch.device("meta"):
        return raw, MolmoForCausalLM(MolmoConfig(**{k: v for k, v in raw.items() if k != "auto_map"}))


def test_real_size_config_has_the_published_parameter_count(real_size):
    """MolmoE-1B: 7.2B parameters in total, 1.5B active (Molmo paper / model card)."""
    _, m = real_size
    cfg = m.config
    total = sum(p.numel() for p in m.parameters())
    assert abs(total - 7.2e9) / 7.2e9 < 0.01, total
    expert = sum(p.numel() for n, p in m.named_parameters() if ".mlp.experts." in n)
    active = total - expert + expert * cfg.moe_top_k // cfg.moe_num_experts
    assert cfg.moe_num_experts == 64 and cfg.moe_top_k == 8
    assert 1.4e9 < active < 1.7e9, active


def test_mopeq_estimate_on_the_real_size_config(real_size):
    """`mopeq estimate --local` on MolmoE-1B's config.json alone (auto_map included, no remote code allowed): the
    native model built on the meta device, 16 MoE layers × 64 experts, 7.2B parameters within 1 %."""
    from mopeq_core.meta_checkpoint import estimate_local

    raw, m = real_size
    assert "auto_map" in raw and [p.name for p in REAL_CONFIG.parent.iterdir()] == ["config.json"]
    est = estimate_local(REAL_CONFIG.parent)
    assert est.model_type == "molmo" and est.moe_layers == 16 and est.experts_per_layer == [64] * 16
    assert est.total_params == sum(p.numel() for p in m.parameters())
    assert abs(est.total_params - 7.2e9) / 7.2e9 < 0.01, est.total_params
    assert est.expert_params == 16 * 64 * 3 * 2048 * 1024
