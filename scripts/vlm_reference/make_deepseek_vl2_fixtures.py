"""Run the REAL DeepSeek-VL2 code on tiny random configs and store its inputs and outputs as test fixtures.

    python scripts/vlm_reference/make_deepseek_vl2_fixtures.py /path/to/DeepSeek-VL2 [--out DIR]

The path is a checkout of the public deepseek-ai/DeepSeek-VL2 repository. Its ``deepseek_vl2/models`` files are
copied to a temporary package and patched there, minimally, to run on transformers 5 (the patches live only here,
never in the product):

- imports removed upstream: ``_prepare_4d_causal_attention_mask`` (replaced by the same additive causal/padding
  mask), ``LlamaFlashAttention2``, ``is_torch_fx_available``, ``is_flash_attn_2_available`` (-> False);
- ``attrdict`` (imported, unused) dropped; ``xformers.ops.memory_efficient_attention`` in SigLIP replaced by the same
  softmax attention on the [B, N, heads, d] layout;
- ``LlamaAttention`` (the MHA path, ``use_mla: false``) got a new signature in transformers 5: an adapter builds
  transformers 5's own ``LlamaAttention`` + ``LlamaRotaryEmbedding`` from the DeepSeek config and calls it with the
  old arguments;
- ``rope_scaling`` is a transformers 5 property that standardises ``None`` into a dict (``KeyError 'type'`` in MLA):
  the DeepSeek config keeps it under another attribute name;
- the forward is called with ``use_cache=False`` (``DynamicCache.from_legacy_cache`` is gone);
- the model is built directly, not through ``from_pretrained``, so its RoPE buffers are computed in ``__init__``.

Every parameter is then overwritten with seeded random values (the published init leaves
``e_score_correction_bias`` uninitialised). Saved per variant under ``tests/fixtures/vlm_reference/deepseek_vl2/``:
``<name>.safetensors`` (``state.*``: the state dict; ``input.*``: the forward's inputs; ``logits``; ``routing.N``:
the routed expert indices [tokens, top_k] of MoE layer N, from the real ``MoEGate``) and ``<name>.json`` (the
config.json the real model was built from).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "vlm_reference" / "deepseek_vl2"
TOKENIZER = REPO / "models" / "mopeq-tiny-moe"
IMAGES = REPO / "data" / "vlm" / "images"

SHIMS = '''
import math
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as _ml


def _prepare_4d_causal_attention_mask(attention_mask, input_shape, inputs_embeds, past_key_values_length):
    b, s = input_shape
    total = past_key_values_length + s
    dtype, device = inputs_embeds.dtype, inputs_embeds.device
    q = torch.arange(past_key_values_length, total, device=device)[:, None]
    k = torch.arange(total, device=device)[None, :]
    blocked = (k > q)[None, None].expand(b, 1, s, total)
    if attention_mask is not None:
        blocked = blocked | (attention_mask[:, None, None, :] == 0)
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)


def memory_efficient_attention(q, k, v, p=0.0):
    # xformers layout [B, N, heads, d]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    w = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    return (w @ v).transpose(1, 2)


class LlamaAttention(_ml.LlamaAttention):
    """transformers 5's LlamaAttention, called with transformers 4.38's arguments."""

    def __init__(self, config, layer_idx=None):
        lc = LlamaConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                         num_key_value_heads=config.num_key_value_heads, attention_bias=config.attention_bias,
                         attention_dropout=config.attention_dropout, rope_theta=config.rope_theta,
                         max_position_embeddings=config.max_position_embeddings,
                         head_dim=config.hidden_size // config.num_attention_heads)
        lc._attn_implementation = "eager"
        super().__init__(lc, layer_idx)
        object.__setattr__(self, "_rotary", _ml.LlamaRotaryEmbedding(lc))

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, **kwargs):
        cos_sin = self._rotary(hidden_states, position_ids)
        out, weights = super().forward(hidden_states, cos_sin, attention_mask)
        return out, weights, past_key_value


LlamaFlashAttention2 = None
'''

PATCHES = {
    "modeling_deepseek.py": [
        ("from transformers.modeling_attn_mask_utils import _prepare_4d_causal_attention_mask",
         "from ._shims import _prepare_4d_causal_attention_mask"),
        ("from transformers.models.llama.modeling_llama import (\n    LlamaAttention,\n    LlamaFlashAttention2\n)",
         "from ._shims import LlamaAttention, LlamaFlashAttention2"),
        ("from transformers.utils.import_utils import is_torch_fx_available",
         "is_torch_fx_available = lambda: False"),
        ("    is_flash_attn_2_available,\n", ""),
        ("from .configuration_deepseek import DeepseekV2Config",
         "from .configuration_deepseek import DeepseekV2Config\nis_flash_attn_2_available = lambda: False"),
        ("self.config.rope_scaling", "self.config.dsv2_rope_scaling"),
    ],
    "configuration_deepseek.py": [("self.rope_scaling = rope_scaling", "self.dsv2_rope_scaling = rope_scaling")],
    "modeling_deepseek_vl_v2.py": [("from attrdict import AttrDict\n", "")],
    "siglip_vit.py": [
        ("from transformers.modeling_utils import is_flash_attn_2_available",
         "is_flash_attn_2_available = lambda: False"),
        ("        from xformers.ops import memory_efficient_attention\n",
         "        from ._shims import memory_efficient_attention\n"),
    ],
}


def import_real(real: Path, tmp: Path):
    pkg = tmp / "dsvl2_real"
    pkg.mkdir()
    src = real / "deepseek_vl2" / "models"
    for name in ("configuration_deepseek.py", "modeling_deepseek.py", "siglip_vit.py", "modeling_deepseek_vl_v2.py",
                 "conversation.py", "processing_deepseek_vl_v2.py"):
        text = (src / name).read_text()
        for old, new in PATCHES.get(name, []):
            if old not in text:
                raise SystemExit(f"{name}: patch target not found: {old[:60]!r}")
            text = text.replace(old, new)
        (pkg / name).write_text(text)
    (pkg / "_shims.py").write_text(SHIMS)
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp))
    return (importlib.import_module("dsvl2_real.modeling_deepseek_vl_v2"),
            importlib.import_module("dsvl2_real.processing_deepseek_vl_v2"))


VISION = {"image_size": 32, "patch_size": 8, "width": 24, "layers": 2, "heads": 2, "mlp_ratio": 2,
          "model_name": "siglip_tiny_test"}
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
BASE = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
        "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8, "n_shared_experts": 2,
        "num_experts_per_tok": 2, "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2,
        "rms_norm_eps": 1e-6, "hidden_act": "silu"}
VARIANTS = {
    # VL2-tiny's shape: MHA, softmax + greedy routing, first layer dense, no renormalisation
    "mha_greedy": dict(BASE, num_hidden_layers=3, use_mla=False, first_k_dense_replace=1, topk_method="greedy",
                       scoring_func="softmax", norm_topk_prob=False, kv_lora_rank=None, q_lora_rank=None,
                       qk_rope_head_dim=0, qk_nope_head_dim=0, v_head_dim=0),
    # VL2-small's shape: MLA without q compression, YaRN, group-limited greedy, MoE every 2nd layer
    "mla_group_limited": dict(BASE, num_hidden_layers=4, use_mla=True, first_k_dense_replace=0, moe_layer_freq=2,
                              topk_method="group_limited_greedy", n_group=4, topk_group=2, scoring_func="softmax",
                              norm_topk_prob=True, routed_scaling_factor=2.0, kv_lora_rank=16, q_lora_rank=None,
                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, rope_scaling=YARN),
    # VL2-base's shape, with images: MLA with q compression, sigmoid + noaux_tc with correction bias
    "mla_noaux_vision": dict(BASE, hidden_size=16, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=3,
                             intermediate_size=32, use_mla=True, first_k_dense_replace=1, topk_method="noaux_tc",
                             n_group=2, topk_group=1, scoring_func="sigmoid", norm_topk_prob=True,
                             routed_scaling_factor=2.5, kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4,
                             qk_nope_head_dim=8, v_head_dim=8, rope_scaling=YARN),
}
CANDIDATES = [[32, 32], [32, 64], [64, 32], [64, 64], [96, 32]]
PROMPT = "<image>\n<image>\nWhat do the two pictures show?"


def vl_config(lang: dict, vocab: int) -> dict:
    return {"model_type": "deepseek_vl_v2", "tile_tag": "2D", "global_view_pos": "head",
            "candidate_resolutions": CANDIDATES, "vision_config": dict(VISION, model_type="vision"),
            "projector_config": {"model_type": "mlp_projector", "projector_type": "downsample_mlp_gelu",
                                 "input_dim": VISION["width"], "n_embed": lang["hidden_size"], "depth": 2,
                                 "mlp_ratio": 1, "downsample_ratio": 2},
            "language_config": dict(lang, vocab_size=vocab, model_type="deepseek_v2")}


def randomise(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "norm" in (name.split(".")[-2] if "." in name else ""):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() < 2 else p.shape[-1] ** -0.5))


def real_processor(proc_mod, tok):
    proc = proc_mod.DeepseekVLV2Processor(tokenizer=tok, candidate_resolutions=CANDIDATES,
                                          patch_size=VISION["patch_size"], downsample_ratio=2)
    return proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("real", type=Path, help="checkout of github.com/deepseek-ai/DeepSeek-VL2")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--commit", default=None, help="commit of the checkout (default: git rev-parse HEAD there)")
    args = ap.parse_args()
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.run(["git", "-C", str(args.real), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    tmp = Path(tempfile.mkdtemp(prefix="dsvl2-real-"))
    try:
        vl, proc_mod = import_real(args.real.resolve(), tmp)
        args.out.mkdir(parents=True, exist_ok=True)
        for seed, (name, lang) in enumerate(VARIANTS.items()):
            inputs: dict[str, torch.Tensor] = {}
            with_images = "vision" in name
            if with_images:
                tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
                proc = real_processor(proc_mod, tok)
                images = [Image.open(IMAGES / n).convert("RGB") for n in ("doc_invoice.png", "horse.png")]
                conv = [{"role": "<|User|>", "content": PROMPT}, {"role": "<|Assistant|>", "content": ""}]
                enc = proc(conversations=conv, images=images, force_batchify=True, system_prompt="")
                for k in ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop"):
                    inputs[k] = enc[k]
                vocab = len(tok)
                inputs["image_token_id"] = torch.tensor(proc.image_token_id)
                meta = {"prompt": enc.sft_format[0], "images": ["doc_invoice.png", "horse.png"]}
            else:
                g = torch.Generator().manual_seed(100 + seed)
                inputs["input_ids"] = torch.randint(3, 128, (2, 12), generator=g)
                inputs["attention_mask"] = torch.ones(2, 12, dtype=torch.long)
                vocab, meta = 128, {}
            cfg_dict = vl_config(lang, vocab)
            cfg = vl.DeepseekVLV2Config(**cfg_dict)
            cfg.language_config._attn_implementation = "eager"
            torch.manual_seed(seed)
            model = vl.DeepseekVLV2ForCausalLM(cfg).eval()
            randomise(model, seed)
            routing: dict[int, torch.Tensor] = {}
            hooks = []
            for i, layer in enumerate(model.language.model.layers):
                if hasattr(layer.mlp, "gate"):
                    hooks.append(layer.mlp.gate.register_forward_hook(
                        lambda m, a, out, i=i: routing.__setitem__(i, out[0].detach().clone())))
            with torch.no_grad():
                kw = {k: v for k, v in inputs.items() if k != "image_token_id"}
                logits = model(**kw, use_cache=False).logits
            for h in hooks:
                h.remove()
            tensors = {f"state.{k}": v.contiguous() for k, v in model.state_dict().items()}
            tensors.update({f"input.{k}": v.contiguous() for k, v in inputs.items()})
            tensors["logits"] = logits.contiguous()
            tensors.update({f"routing.{i}": r.contiguous() for i, r in routing.items()})
            save_file(tensors, str(args.out / f"{name}.safetensors"))
            meta = {"config": cfg_dict, "real_commit": commit, **meta}
            (args.out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
            print(name, "logits", tuple(logits.shape), "moe layers", sorted(routing),
                  "bytes", (args.out / f"{name}.safetensors").stat().st_size)
        print("real code commit:", commit)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
