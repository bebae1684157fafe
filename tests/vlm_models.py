"""Tiny vision-language MoE models for the tests, each saved with a processor like a Hub checkpoint.

- ``build_qwen3_vl_moe``: transformers' own Qwen3-VL-MoE (vision tower with deepstack merger + MoE text model), random
  weights, with a real ``Qwen3VLProcessor`` (Qwen2-VL image processor, the shipped tokenizer plus Qwen's vision
  tokens, a Qwen-style chat template).
- ``build_deepseek_vl2``: MoPEQ's native DeepSeek-VL2 (``mopeq_core.models.deepseek_vl2``, checked against the
  real code by tests/test_deepseek_vl2.py) with its own processor (tiling, conversation template).
- ``build_molmoe``: the native MolmoE (``mopeq_core.models.molmoe``, checked against the real code by
  tests/test_molmoe.py, no remote code) with its own processor.

All use the tokenizer of the shipped ``models/mopeq-tiny-moe`` with added special tokens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "models" / "mopeq-tiny-moe"
VLM_DATA = REPO / "data" / "vlm"

QWEN_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

def tokenizer(extra: list[str]):
    tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


def build_qwen3_vl_moe(root: Path, *, seed: int = 0) -> Path:
    """Tiny Qwen3-VL-MoE: 2 text layers × 4 experts (top-2), 2 vision blocks, patch 8, merge 2."""
    tok = tokenizer(QWEN_TOKENS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_TOKENS}
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "num_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 1024, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.1, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                "mrope_interleaved": True}}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "patch_size": 8,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 32,
              "num_position_embeddings": 64, "deepstack_visual_indexes": [1], "initializer_range": 0.1}
    cfg = transformers.Qwen3VLMoeConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    ip = transformers.Qwen2VLImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2,
                                            min_pixels=32 * 32, max_pixels=48 * 48)
    vp = transformers.Qwen3VLVideoProcessor(patch_size=8, merge_size=2, temporal_patch_size=2)
    proc = transformers.Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                         chat_template=QWEN_TEMPLATE)
    out = root / "qwen3_vl_moe"
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def build_deepseek_vl2(root: Path, *, seed: int = 0, **language_overrides) -> Path:
    """The native DeepSeek-VL2 (mopeq_core.models.deepseek_vl2) scaled down, saved with its processor like a Hub
    checkpoint (model_type "deepseek_vl_v2", no auto_map): SigLIP ViT (32 px tiles, patch 8, 2 blocks), downsampling
    projector, tiling over 4 candidate resolutions; MLA language model with YaRN, 3 layers (the first dense),
    16 routed experts top-4 (softmax, greedy: VL2-small's router) and 2 shared experts."""
    from mopeq_core.models import register_all
    from mopeq_core.models.deepseek_vl2.configuration import DeepseekVLV2Config
    from mopeq_core.models.deepseek_vl2.modeling import DeepseekVLV2ForCausalLM
    from mopeq_core.models.deepseek_vl2.processing import DeepseekVL2ImageProcessor, DeepseekVLV2Processor

    register_all()
    candidates = [[32, 32], [32, 64], [64, 32], [64, 64]]
    ip = DeepseekVL2ImageProcessor(candidate_resolutions=candidates, patch_size=8, downsample_ratio=2)
    proc = DeepseekVLV2Processor(image_processor=ip, tokenizer=tokenizer([]))
    tok = proc.tokenizer
    lang = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 16,
            "n_shared_experts": 2, "num_experts_per_tok": 4, "first_k_dense_replace": 1, "topk_method": "greedy",
            "scoring_func": "softmax", "norm_topk_prob": False, "use_mla": True, "q_lora_rank": None,
            "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
            "max_position_embeddings": 512, "initializer_range": 0.1, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, **language_overrides}
    cfg = DeepseekVLV2Config(
        language_config=lang, candidate_resolutions=candidates, image_token_id=proc.image_token_id,
        vision_config={"image_size": 32, "patch_size": 8, "width": 24, "layers": 2, "heads": 2, "mlp_ratio": 2},
        projector_config={"input_dim": 24, "n_embed": 32, "downsample_ratio": 2})
    torch.manual_seed(seed)
    model = DeepseekVLV2ForCausalLM(cfg).eval()
    out = root / "deepseek_vl2"
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def build_molmoe(root: Path, *, seed: int = 0) -> Path:
    """Native MolmoE (mopeq_core.models.molmoe) scaled down: 2 blocks × 16 experts top-4 (MolmoE-1B: 16 × 64,
    top-8), a 3-block ViT on 98px crops of 7×7 patches with two layers concatenated, 2×2 attention pooling and the
    SwiGLU connector; its real processor (overlapping crops + global view, up to 2 crops)."""
    from mopeq_core.models import register_all
    from mopeq_core.models.molmoe.configuration_molmoe import MolmoConfig
    from mopeq_core.models.molmoe.modeling_molmoe import MolmoForCausalLM
    from mopeq_core.models.molmoe.processing_molmoe import EXTRA_TOKENS, MolmoImageProcessor, MolmoProcessor

    register_all()
    base = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok = tokenizer(list(EXTRA_TOKENS))
    vision = {"image_default_input_size": [98, 98], "image_patch_size": 14, "image_emb_dim": 16,
              "image_num_heads": 2, "image_num_key_value_heads": 2, "image_head_dim": 8, "image_mlp_dim": 32,
              "image_num_layers": 3, "image_num_pos": 50}
    cfg = MolmoConfig(d_model=32, n_heads=4, n_layers=2, mlp_hidden_size=64, vocab_size=len(base),
                      embedding_size=len(base), additional_vocab_size=8, moe_num_experts=16, moe_top_k=4,
                      vit_layers=[-1, -3], vision_backbone=vision, max_position_embeddings=1024,
                      initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = MolmoForCausalLM(cfg).eval()
    ip = MolmoImageProcessor(max_crops=2, overlap_margins=[2, 1], base_image_input_size=[98, 98],
                             image_token_length_w=4, image_token_length_h=4, image_patch_size=14)
    out = root / "molmoe"
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    MolmoProcessor(ip, tok).save_pretrained(out)
    return out
