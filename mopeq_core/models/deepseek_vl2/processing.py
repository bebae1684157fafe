"""DeepSeek-VL2's image tiling and prompt format as a transformers processor (image processor + tokenizer + chat
template), following the published processor (``processing_deepseek_vl_v2.py``, ``conversation.py``).

Image: the candidate resolution that keeps the most of the image (least waste on ties) is chosen; the image is
letterboxed (``ImageOps.pad``, filled with the mean colour) once to ``image_size`` (global view) and once to the
chosen resolution, which is cut into ``image_size`` tiles (local views). Every ``<image>`` in the text becomes
``h·(w+1) + 1 + (th·h)·(tw·w+1)`` image tokens with ``h = w = ceil(image_size / patch_size / downsample_ratio)``:
the layout the model fills with the global view, the view separator and the stitched local tiles. With more than
two images in one text the published processor skips the local tiling (one local tile per image); so does this one.

Prompt format ("deepseek" conversation): ``<|User|>: {question}\\n\\n<|Assistant|>: {answer}<eos>``, the image
placeholder ``<image>`` inside the user turn, BOS first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

GROUNDING_TOKENS = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"]
CHAT_TOKENS = ["<|User|>", "<|Assistant|>"]
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set text = m['content'] -%}{%- else -%}{%- set text = namespace(s='') -%}"
    "{%- for c in m['content'] -%}{%- if c['type'] == 'image' -%}{%- set text.s = text.s + '<image>\\n' -%}"
    "{%- elif c['type'] == 'text' -%}{%- set text.s = text.s + c['text'] -%}{%- endif -%}{%- endfor -%}"
    "{%- set text = text.s -%}{%- endif -%}"
    "{%- if m['role'] == 'system' -%}{{ text | trim }}{{ '\\n\\n' }}"
    "{%- elif m['role'] == 'user' -%}<|User|>: {{ text | trim }}{{ '\\n\\n' }}"
    "{%- else -%}<|Assistant|>: {{ text | trim }}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|Assistant|>:{%- endif -%}")


def select_best_resolution(image_size: tuple[int, int], candidates) -> tuple[int, int]:
    """The (width, height) among ``candidates`` that shows most of the image, the least padded one on ties."""
    w0, h0 = image_size
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in candidates:
        scale = min(w / w0, h / h0)
        eff = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(w), int(h)), eff, waste
    return best


class DeepseekVL2ImageProcessor(BaseImageProcessor):
    model_input_names = ["images", "images_spatial_crop"]

    def __init__(self, candidate_resolutions=((384, 384),), patch_size=14, downsample_ratio=2,
                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), normalize=True, **kwargs):
        super().__init__(**kwargs)
        self.candidate_resolutions = [list(r) for r in candidate_resolutions]
        self.image_size = int(self.candidate_resolutions[0][0])
        self.patch_size = patch_size
        self.downsample_ratio = downsample_ratio
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.normalize = normalize

    @property
    def side_tokens(self) -> int:
        """Image tokens per side of one tile after the projector's downsampling."""
        return math.ceil((self.image_size // self.patch_size) / self.downsample_ratio)

    def num_image_tokens(self, n_wide: int, n_high: int) -> int:
        h = w = self.side_tokens
        return h * (w + 1) + 1 + (n_high * h) * (n_wide * w + 1)

    def _to_tensor(self, image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float()
        x = x.div(255)
        if self.normalize:
            mean = torch.tensor(self.image_mean).view(3, 1, 1)
            std = torch.tensor(self.image_std).view(3, 1, 1)
            x = x.sub(mean).div(std)
        return x

    def tile(self, image, cropping: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
        """(global view then local tiles [1 + tw·th, 3, S, S], (tiles wide tw, tiles high th)) for one PIL image."""
        from PIL import ImageOps

        s = self.image_size
        w, h = select_best_resolution(image.size, self.candidate_resolutions) if cropping else (s, s)
        fill = tuple(int(m * 255) for m in self.image_mean)
        views = [self._to_tensor(ImageOps.pad(image, (s, s), color=fill))]
        local = ImageOps.pad(image, (w, h), color=fill)
        for top in range(0, h, s):
            for left in range(0, w, s):
                views.append(self._to_tensor(local.crop((left, top, left + s, top + s))))
        return torch.stack(views), (w // s, h // s)

    def preprocess(self, images, return_tensors=None, cropping: bool | None = None, **kwargs) -> BatchFeature:
        """``images`` [max_tiles of the images, 3, S, S] (stacked in order) and ``images_spatial_crop`` [n, 2]."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        cropping = len(images) <= 2 if cropping is None else cropping
        tiles, crops = [], []
        for im in images:
            t, crop = self.tile(im, cropping)
            tiles.append(t)
            crops.append(list(crop))
        return BatchFeature({"images": torch.cat(tiles), "images_spatial_crop": torch.tensor(crops)},
                            tensor_type=return_tensors)


_IMAGE_KEYS = ("candidate_resolutions", "patch_size", "downsample_ratio", "image_mean", "image_std", "normalize")


def _published_processor_config(path: Path) -> dict | None:
    """The published flat processor config of a local checkpoint directory, or None (ours, or none at all).
    Candidate resolutions come from config.json when the processor config does not list them."""
    try:
        proc = json.loads((path / "processor_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(proc, dict) or "image_processor" in proc or "patch_size" not in proc:
        return None
    if not proc.get("candidate_resolutions"):
        try:
            proc["candidate_resolutions"] = json.loads((path / "config.json").read_text())["candidate_resolutions"]
        except (OSError, ValueError, KeyError):
            pass
    return proc


class DeepseekVLV2Processor(ProcessorMixin):
    """``processor(text=[...], images=[...])``: ``input_ids``, ``attention_mask`` (left padding), ``images``
    [B, max_tiles, 3, S, S], ``images_seq_mask`` [B, L] and ``images_spatial_crop`` [B, max_images, 2]: the
    keyword arguments of :class:`DeepseekVLV2ForCausalLM`. Images are taken in order by the texts' ``<image>``
    placeholders."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token="<image>", **kwargs):
        self.image_token = image_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        if tokenizer is not None:
            # the published processor's special tokens, added in its order (Hub tokenizers already have them)
            vocab = tokenizer.get_vocab()
            for group in ([image_token], GROUNDING_TOKENS, CHAT_TOKENS):
                missing = [t for t in group if t not in vocab]
                if missing:
                    tokenizer.add_special_tokens({"additional_special_tokens": missing})
            self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def _encode(self, text: str, images: list, cropping: bool):
        tok, ip = self.tokenizer, self.image_processor
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(images):
            raise ValueError(f"{len(parts) - 1} {self.image_token} placeholders for {len(images)} images")
        ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
        is_image = [False] * len(ids)
        tiles, crops = [], []
        for i, part in enumerate(parts):
            piece = tok.encode(part, add_special_tokens=False)
            ids += piece
            is_image += [False] * len(piece)
            if i < len(images):
                t, (tw, th) = ip.tile(images[i], cropping)
                tiles.append(t)
                crops.append([tw, th])
                n = ip.num_image_tokens(tw, th)
                ids += [self.image_token_id] * n
                is_image += [True] * n
        return ids, is_image, tiles, crops

    def __call__(self, text=None, images=None, return_tensors="pt", **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        images = list(images or [])
        if images and isinstance(images[0], (list, tuple)):  # one list per text
            per_text = [list(x) for x in images]
        else:
            per_text, k = [], 0
            for t in texts:
                n = t.count(self.image_token)
                per_text.append(images[k: k + n])
                k += n
            if k != len(images):
                raise ValueError(f"{len(images)} images for {k} {self.image_token} placeholders")
        rows = [self._encode(t, ims, len(ims) <= 2) for t, ims in zip(texts, per_text)]
        width = max(len(r[0]) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r[0])) + r[0] for r in rows])
        mask = torch.tensor([[0] * (width - len(r[0])) + [1] * len(r[0]) for r in rows])
        out = {"input_ids": ids, "attention_mask": mask}
        if any(r[2] for r in rows):
            s = self.image_processor.image_size
            max_tiles = max(sum(t.shape[0] for t in r[2]) for r in rows)
            max_images = max(len(r[3]) for r in rows)
            imgs = torch.zeros(len(rows), max_tiles, 3, s, s)
            crops = torch.zeros(len(rows), max_images, 2, dtype=torch.long)
            for b, r in enumerate(rows):
                if r[2]:
                    t = torch.cat(r[2])
                    imgs[b, : t.shape[0]] = t
                    crops[b, : len(r[3])] = torch.tensor(r[3])
            out["images"] = imgs
            out["images_seq_mask"] = torch.tensor([[False] * (width - len(r[1])) + r[1] for r in rows])
            out["images_spatial_crop"] = crops
        return BatchFeature(out, tensor_type=return_tensors)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Also reads the Hub checkpoints' processor_config.json, which the published code writes flat (its
        ``candidate_resolutions``, ``patch_size``, ... at the top level, no ``image_processor`` section)."""
        path = Path(pretrained_model_name_or_path)
        flat = _published_processor_config(path)
        if flat is None:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        from transformers import AutoTokenizer

        tok_kwargs = {k: kwargs[k] for k in ("revision", "token", "trust_remote_code") if k in kwargs}
        tokenizer = AutoTokenizer.from_pretrained(path, **tok_kwargs)
        ip = DeepseekVL2ImageProcessor(**{k: flat[k] for k in _IMAGE_KEYS if flat.get(k) is not None})
        return cls(image_processor=ip, tokenizer=tokenizer, image_token=flat.get("image_token", "<image>"))

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop"]

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
