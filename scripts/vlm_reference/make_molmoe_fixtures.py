"""Runs the public MolmoE code on a tiny random config and stores what tests/test_molmoe.py checks the native model
against: the state dict, the inputs (with and without an image), the real logits and the experts each layer routed
each token to. Tensors only; the real code never enters the project.

    python scripts/vlm_reference/make_molmoe_fixtures.py --real /tmp/molmo_ref \
        --out tests/fixtures/vlm_reference/molmoe

``--real`` is a folder with the real ``config_molmoe.py``, ``modeling_molmoe.py``, ``image_preprocessing_molmo.py``,
``preprocessing_molmo.py`` and the checkpoint's ``config.json`` (see the README written next to the fixtures for
where they came from). The few runtime patches the code needs here are in ``_patch`` and listed in that README.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO / "models" / "mopeq-tiny-moe"
IMAGE = REPO / "data" / "vlm" / "images" / "chelsea.png"
EXTRA = ["<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>"]

# Tiny, but every path of MolmoE-1B's forward runs: 7x7 patches per crop (odd: the 2x2 pooling pads), overlap
# margins, several crops, two ViT layers concatenated, q/k norms, 8 experts top-3 (no renormalisation).
VISION = {"image_default_input_size": [98, 98], "image_patch_size": 14, "image_pos_patch_size": 14,
          "image_emb_dim": 16, "image_num_heads": 2, "image_num_key_value_heads": 2, "image_head_dim": 8,
          "image_mlp_dim": 32, "image_num_layers": 3, "image_num_pos": 50}
LM = {"d_model": 32, "n_heads": 4, "n_layers": 2, "mlp_hidden_size": 48, "moe_num_experts": 8, "moe_top_k": 3,
      "vit_layers": [-1, -3], "max_position_embeddings": 512, "max_sequence_length": 512}
IMAGE_KWARGS = {"max_crops": 2, "overlap_margins": [2, 1], "base_image_input_size": [98, 98],
                "image_token_length_w": 4, "image_token_length_h": 4, "image_patch_size": 14}
LOGIT_TAIL = 12
PROMPTS = ["What is in the picture?", "Describe this image."]


def _import_real(folder: Path):
    pkg = Path(tempfile.mkdtemp()) / "molmo_real"
    pkg.mkdir()
    for f in ("config_molmoe.py", "modeling_molmoe.py", "image_preprocessing_molmo.py", "preprocessing_molmo.py"):
        shutil.copy2(folder / f, pkg / f)
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(pkg.parent))
    return tuple(importlib.import_module(f"molmo_real.{m}") for m in
                 ("config_molmoe", "modeling_molmoe", "image_preprocessing_molmo", "preprocessing_molmo"))


def _patch(cm, mm, pm, vision: dict) -> list[str]:
    """Runtime patches for transformers 5 / a non-336px config. Each keeps MolmoE-1B's own computation."""
    notes = []
    # 1. MolmoConfig.image_num_patch is hard-coded to 336/14; read the vision config instead (24x24 at 336px).
    def image_num_patch(self):
        v = self.vision_backbone
        v = v if isinstance(v, dict) else v.__dict__
        h, w = v["image_default_input_size"]
        return h // v["image_patch_size"], w // v["image_patch_size"]
    cm.MolmoConfig.image_num_patch = property(image_num_patch)
    notes.append("MolmoConfig.image_num_patch: computed from vision_backbone (the code hard-codes 336px/14)")
    # 2. MolmoPretrainedVisionBackbone sizes pad_embed from a default VisionBackboneConfig() (1024 wide); give it
    #    the model's vision config.
    orig = mm.VisionBackboneConfig
    mm.VisionBackboneConfig = lambda *a, **k: orig(*a, **(k or vision))
    notes.append("VisionBackboneConfig() with no arguments returns the model's vision config (pad_embed width)")
    # 3. The processor declares GPT2 tokenizer classes; the test tokenizer is a transformers-5 TokenizersBackend.
    pm.MolmoProcessor.tokenizer_class = "AutoTokenizer"
    notes.append("MolmoProcessor.tokenizer_class = AutoTokenizer (the test tokenizer is not a GPT2Tokenizer)")
    return notes


def _routing_hooks(model, store: list):
    handles = []
    for i, block in enumerate(model.model.transformer.blocks):
        def hook(mod, args, out, i=i, k=block.mlp.top_k):
            store.append((i, torch.topk(torch.softmax(out.float(), dim=-1), k, dim=-1).indices))
        handles.append(block.mlp.gate.register_forward_hook(hook))
    return handles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "vlm_reference" / "molmoe")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import transformers

    cm, mm, im, pm = _import_real(args.real)
    notes = _patch(cm, mm, pm, VISION)

    tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    base = len(tok)
    tok.add_special_tokens({"additional_special_tokens": EXTRA})
    real_cfg = json.loads((args.real / "config.json").read_text())
    cfg_dict = {k: v for k, v in real_cfg.items() if k not in ("auto_map", "architectures", "transformers_version")}
    cfg_dict.update(LM, vocab_size=base, embedding_size=base, additional_vocab_size=8, init_device="cpu",
                    vision_backbone={**real_cfg["vision_backbone"], **VISION}, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = cm.MolmoConfig(**cfg_dict)
    model = mm.MolmoForCausalLM(config).eval()
    # Random weights (the real constructor leaves embeddings at zero), rounded to bfloat16 so the fixture can
    # store them at half size and both models run on exactly the same float32 values.
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("norm.weight", "ln_f.weight", "pre_ln.weight")):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)
            p.copy_(p.to(torch.bfloat16).float())

    proc = pm.MolmoProcessor(im.MolmoImageProcessor(**IMAGE_KWARGS), tok)
    image = Image.open(IMAGE).convert("RGB").resize((90, 100))  # not square: two overlapping crops, padding
    raw = np.array(image)
    with_image = proc.process(text=PROMPTS[0], images=[image], **IMAGE_KWARGS)
    text_only = proc.process(text=PROMPTS[1], **IMAGE_KWARGS)

    tensors = {f"state.{k}": v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    tensors["raw_image"] = torch.from_numpy(raw.copy())
    for case, inputs in (("image", with_image), ("text", text_only)):
        batch = {k: v.unsqueeze(0) for k, v in inputs.items()}
        routed: list = []
        handles = _routing_hooks(model, routed)
        final = []
        handles.append(model.model.transformer.ln_f.register_forward_hook(lambda m, a, o: final.append(o)))
        with torch.no_grad():
            out = model(**batch, use_cache=False)
        for h in handles:
            h.remove()
        for k, v in inputs.items():
            tensors[f"{case}.{k}"] = v.contiguous()
        # Every position's final hidden state (after ln_f, what lm_head reads) and the logits of the last
        # LOGIT_TAIL positions: the text after the image tokens, which attends to all of them (keeps it < 2 MB).
        tensors[f"{case}.hidden"] = final[0][0].contiguous()
        tensors[f"{case}.logits"] = out.logits[0, -LOGIT_TAIL:].contiguous()
        for layer, idx in routed:
            tensors[f"{case}.routing.{layer}"] = idx.to(torch.int16).contiguous()
    # a padded text batch: the second row is left-padded (attention_mask 0), ids cover the added vocabulary
    ids = torch.randint(3, base + 5, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    routed = []
    handles = _routing_hooks(model, routed)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in handles:
        h.remove()
    tensors.update({"batch.input_ids": ids, "batch.attention_mask": mask, "batch.logits": out.logits.contiguous()})
    for layer, idx in routed:
        tensors[f"batch.routing.{layer}"] = idx.to(torch.int16).contiguous()

    # MolmoE-1B's own preprocessing (336 px crops, margins 4/4, up to 12 crops) on the full-size image: the images
    # are kept as per-patch sums and sums of squares (float64) to stay small; tokens, indices and masks exactly.
    # The image is raw_image tiled 5 x 8 (500 x 720 px), rebuilt the same way by the test: 2 x 3 crops + global.
    big = Image.fromarray(np.tile(raw, (5, 8, 1)))
    full = pm.MolmoProcessor(im.MolmoImageProcessor(), tok).process(text=PROMPTS[0], images=[big])
    crops = full["images"].double()
    tensors.update({"full.input_ids": full["input_ids"], "full.image_input_idx": full["image_input_idx"],
                    "full.image_masks": full["image_masks"], "full.images_sum": crops.sum(-1),
                    "full.images_sumsq": (crops ** 2).sum(-1)})

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / "molmoe_reference.safetensors"))
    meta = {"config": cfg_dict,
            "image_kwargs": IMAGE_KWARGS, "prompts": PROMPTS, "extra_tokens": EXTRA, "patches": notes,
            "transformers": transformers.__version__, "torch": torch.__version__}
    (args.out / "molmoe_reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.out}: {sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
