"""Vision-language MoE models: which Auto class loads them, their processor, image+text samples, and which weights
belong to the vision side.

- ``auto_model_class(config)``: ``AutoModelForImageTextToText`` for VLMs (Qwen3-VL-MoE, GLM-4V-MoE, Aria, Llama 4,
  remote-code models whose ``auto_map`` names an image-text class), ``AutoModelForCausalLM`` otherwise.
- ``load_processor(path)``: the model's processor (image processor + tokenizer + chat template), or None for a
  text-only model.
- ``build_sample_set(processor, records, seq_len)``: one model-input dict per (image, text) record, prepared by the
  processor (chat template with the image placeholder when the processor has one), with ``labels`` that take the
  loss on the text after the image only (never on image placeholder tokens, nor on a ``"prompt"`` when given).
- ``vision_state(model)`` / ``component_bytes(model, groups)``: the vision tower and projector weights (kept at full
  precision; only the language model's routed experts are quantized) and a byte breakdown for the report.
- ``generate_answer(model, processor, image, question)``: ask the model about an image.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CalibrationDataError
from .samples import IGNORE_INDEX, SampleSet

log = logging.getLogger(__name__)

VLM_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq")
# A parameter whose dotted name has one of these components belongs to the vision side (tower or projector).
_VISION_PART = re.compile(r"^(visual|vision|vision_tower|vision_model|vision_backbone|vision_encoder|vit|image_vit|"
                          r"multi_modal_projector|mm_projector|projector|aligner|image_projector|image_pooling_2d|"
                          r"image_newline|view_seperator|view_separator|vision_embed|patch_embed|merger)$")
_ROUTER_PART = re.compile(r"^(gate|router)$")


# ---- model class ---------------------------------------------------------------------------------------------
def is_vlm_config(config) -> bool:
    """True when the checkpoint is a vision-language model (load it with the image-text Auto class)."""
    auto_map = getattr(config, "auto_map", None) or {}
    if isinstance(auto_map, dict) and any(k in auto_map for k in VLM_AUTO_CLASSES):
        return True
    if auto_map:
        return False
    from transformers.models.auto import modeling_auto as ma

    mt = getattr(config, "model_type", None)
    # names: transformers' own models; the mappings also hold classes registered at run time (mopeq_core.models)
    vlm = mt in ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or type(config) in ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    causal = mt in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or type(config) in ma.MODEL_FOR_CAUSAL_LM_MAPPING
    # Llama 4's composite config maps to both; its vision_config says which one holds the whole checkpoint.
    return vlm and (not causal or getattr(config, "vision_config", None) is not None)


def auto_model_class(config):
    import transformers

    if is_vlm_config(config):
        auto_map = getattr(config, "auto_map", None) or {}
        for name in VLM_AUTO_CLASSES:
            if name in auto_map:
                return getattr(transformers, name)
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


# ---- processor -----------------------------------------------------------------------------------------------
def load_processor(path: str | Path, *, trust_remote_code: bool = False):
    """The model's processor when it has an image processor, else None (text-only models)."""
    from transformers import AutoProcessor

    from .models import trust_for

    path = Path(path)
    trust_remote_code = trust_for(path, trust_remote_code)
    if not any((path / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        return None
    try:
        proc = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("could not load the processor of %s (%s); image+text data cannot be used", path, exc)
        return None
    if getattr(proc, "image_processor", None) is None:
        return None
    tok = getattr(proc, "tokenizer", None)
    if tok is not None and tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return proc


def image_token_ids(processor) -> set[int]:
    """Ids of image/video placeholder and delimiter tokens (they take no loss)."""
    ids: set[int] = set()
    for attr in dir(processor):
        if re.fullmatch(r"(image|video|vision|img|boi|eoi)_?\w*token_ids?", attr):
            try:
                v = getattr(processor, attr)
            except Exception as exc:  # noqa: BLE001 - some processors raise on unset optional attributes
                log.debug("processor attribute %s: %s", attr, exc)
                continue
            if isinstance(v, int) and v >= 0:
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v if isinstance(x, int) and x >= 0)
    tok = getattr(processor, "tokenizer", None)
    token = getattr(processor, "image_token", None)
    if tok is not None and isinstance(token, str):
        tid = tok.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid >= 0 and tid != tok.unk_token_id:
            ids.add(tid)
    return ids


def _messages(text: str | None, has_image: bool, prompt: str | None) -> list[dict]:
    user = ([{"type": "image"}] if has_image else []) + ([{"type": "text", "text": prompt}] if prompt else [])
    if prompt is None and text is not None:
        user.append({"type": "text", "text": text})
    msgs = [{"role": "user", "content": user}]
    if prompt is not None and text is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    return msgs


def format_prompt(processor, text: str | None, *, has_image: bool, prompt: str | None = None,
                  add_generation_prompt: bool = False) -> str:
    """The model's text for one example: its chat template with an image entry when it has one, else the
    processor's image placeholder followed by the text."""
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(_messages(text, has_image, prompt), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    token = getattr(processor, "image_token", None)
    if has_image and not isinstance(token, str):
        raise CalibrationDataError(f"{type(processor).__name__} has neither a chat template nor an image token; "
                                   "cannot place the image in the text")
    parts = ([token] if has_image else []) + [t for t in (prompt, text) if t]
    return "\n".join(parts)


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise CalibrationDataError(f"{path} is not a readable image ({exc})") from exc


def _clip_text(tokenizer, text: str, max_tokens: int | None) -> str:
    if not max_tokens:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def encode_example(processor, text: str, image=None, *, prompt: str | None = None,
                   max_text_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Model inputs for one (image, text) example plus ``labels``: the loss is taken on the text after the image
    (after the ``prompt`` when one is given), never on image placeholder or delimiter tokens."""
    if isinstance(image, (str, Path)):
        image = _open_image(Path(image))
    tok = processor.tokenizer
    text = _clip_text(tok, text, max_text_tokens)
    full = format_prompt(processor, text, has_image=image is not None, prompt=prompt)
    images = [image] if image is not None else None
    enc = processor(text=[full], images=images, return_tensors="pt")
    out = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    ids = out["input_ids"]
    labels = ids.clone()
    special = image_token_ids(processor)
    if special:
        is_img = torch.isin(ids, torch.tensor(sorted(special)))
        labels[is_img] = IGNORE_INDEX
        pos = torch.nonzero(is_img[0]).flatten()
        if pos.numel():
            labels[0, : int(pos[-1]) + 1] = IGNORE_INDEX
    if prompt is not None:
        prefix = format_prompt(processor, None, has_image=image is not None, prompt=prompt,
                               add_generation_prompt=True)
        n_prefix = processor(text=[prefix], images=images, return_tensors="pt")["input_ids"].shape[-1]
        labels[0, :n_prefix] = IGNORE_INDEX
    if "attention_mask" in out:
        labels[out["attention_mask"] == 0] = IGNORE_INDEX
    out["labels"] = labels
    return out


def build_sample_set(processor, records: list[dict[str, Any]], seq_len: int) -> SampleSet:
    """A SampleSet from ``data.read_records`` rows (text cut to ``seq_len`` tokens)."""
    if not records:
        raise CalibrationDataError("the image+text data has no records")
    items, meta = [], []
    for r in records:
        item = encode_example(processor, r["text"], r.get("image"), prompt=r.get("prompt"),
                              max_text_tokens=seq_len)
        if int((item["labels"][:, 1:] != IGNORE_INDEX).sum()) == 0:
            raise CalibrationDataError(f"the record for {r.get('image')} leaves no text token to predict")
        items.append(item)
        meta.append({"image": str(r["image"]) if r.get("image") else None})
    return SampleSet(items, meta)


# ---- weights of the vision side ------------------------------------------------------------------------------
def is_vision_name(name: str) -> bool:
    return any(_VISION_PART.match(part) for part in name.split("."))


def vision_state(model) -> dict[str, torch.Tensor]:
    """The vision tower and projector tensors of ``model`` (detached, on CPU)."""
    return {n: t.detach().cpu() for n, t in model.state_dict().items() if is_vision_name(n)}


def component_bytes(model, groups, elem_bytes: int | None = None) -> dict[str, int]:
    """Bytes of the full-precision parts, by component: vision tower + projector, routers, other language-model
    weights (attention, norms, embeddings, dense and shared MLPs). Routed experts are left out (they are what the
    bit map sizes). ``elem_bytes``: bytes per floating element at the checkpoint dtype (default: as held)."""
    from .artifact import iter_non_expert_tensors

    out = {"vision": 0, "router": 0, "language": 0}
    for name, t in iter_non_expert_tensors(model, groups):
        n = t.numel() * (elem_bytes if (elem_bytes and t.is_floating_point()) else t.element_size())
        parts = name.split(".")
        if is_vision_name(name):
            out["vision"] += n
        elif any(_ROUTER_PART.match(p) for p in parts[-3:-1]) and not name.endswith("_proj.weight"):
            out["router"] += n
        else:
            out["language"] += n
    return out


# ---- asking the model ----------------------------------------------------------------------------------------
@torch.no_grad()
def generate_answer(model, processor, image, question: str, *, max_new_tokens: int = 16) -> str:
    """Greedy answer of ``model`` to ``question`` about ``image`` (a PIL image or a path)."""
    if isinstance(image, (str, Path)):
        image = _open_image(Path(image))
    text = format_prompt(processor, None, has_image=True, prompt=question, add_generation_prompt=True)
    enc = processor(text=[text], images=[image], return_tensors="pt")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
              for k, v in enc.items() if isinstance(v, torch.Tensor)}
    tok = processor.tokenizer
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)
