"""MolmoE's image processor and processor: overlapping crops plus a global view, 2×2-pooled patch tokens laid out
row by row with ``<im_col>`` ends, and the ``images`` / ``image_input_idx`` / ``image_masks`` the model reads.

Same outputs as the public ``image_preprocessing_molmo.py`` / ``preprocessing_molmo.py`` (checked against them on
fixtures, tests/test_molmoe.py): the image is resized (torchvision bilinear, antialiased, in float32) and padded to a
tiling of ``crop_window`` patches plus the margins, cut into ``base_image_input_size`` crops that overlap by the
margins, and preceded by the whole image resized to one crop. Every crop's 2×2-pooled tokens that are not margin
map to one ``<im_patch>`` token (``image_input_idx``), -100 otherwise. ``image_masks`` holds the share of real
pixels per patch; as in the original, its row for the global crop is the -1 appended last. The prompt is
``" User: {text} Assistant:"``, with all image tokens after the BOS (EOS for OLMo) and before the text.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.processing_utils import ProcessorMixin

IM_START, IM_END, IM_PATCH, IM_COL, IMAGE_PROMPT = "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>"
EXTRA_TOKENS = (IM_START, IM_END, IM_PATCH, IM_COL, IMAGE_PROMPT)

# " User: ... Assistant:" as the real processor's "role" message format (with always_start_with_space).
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set text = m['content'] -%}"
    "{%- else -%}{%- set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join(' ') -%}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}{{ ' User: ' + text + ' Assistant:' }}{%- else -%}{{ ' ' + text }}{%- endif -%}"
    "{%- endfor -%}")


def _resize_and_pad(image: np.ndarray, size, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """uint8 HWC -> normalised float32 [h, w, 3] with the aspect ratio kept and the rest zero-padded (centred), and
    the mask of real pixels. Scales in float32 like the training code."""
    dh, dw = size
    h, w = image.shape[:2]
    scale = min(np.float32(dh) / np.float32(h), np.float32(dw) / np.float32(w))
    sh, sw = int(np.float32(h) * scale), int(np.float32(w) * scale)
    t = TF.convert_image_dtype(torch.from_numpy(image).permute(2, 0, 1))
    t = TF.resize(t, [sh, sw], InterpolationMode.BILINEAR, antialias=True).clip(0.0, 1.0)
    arr = t.permute(1, 2, 0).numpy()
    top, left = (dh - sh) // 2, (dw - sw) // 2
    pad = [[top, dh - sh - top], [left, dw - sw - left]]
    mask = np.pad(np.ones((sh, sw), dtype=bool), pad)
    arr = np.pad(arr, pad + [[0, 0]])
    arr = (arr - np.asarray(mean, np.float32)[None, None]) / np.asarray(std, np.float32)[None, None]
    return arr.astype(np.float32), mask


def select_tiling(h: float, w: float, window: int, max_crops: int) -> np.ndarray:
    """The (rows, cols) grid of at most ``max_crops`` windows that needs the least upscaling of an [h, w] image,
    or the least downscaling when every grid is smaller; ties go to fewer crops, then fewer rows."""
    tilings = sorted(((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if i * j <= max_crops),
                     key=lambda x: (x[0] * x[1], x[0]))
    cand = np.array(tilings, dtype=np.int32)
    need = np.min((cand * window).astype(np.float32) / np.array([h, w], dtype=np.float32), axis=-1)
    if np.all(need < 1):
        return cand[np.argmax(need)]
    return cand[np.argmin(np.where(need < 1.0, 10e9, need))]


def _patchify(x: np.ndarray, p: int) -> np.ndarray:
    """[n, H, W, C] -> [n, (H/p)*(W/p), p*p*C]: patches in row-major order, pixels (row, column, channel) inside."""
    n, hh, ww, c = x.shape
    return x.reshape(n, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, (hh // p) * (ww // p), -1)


class MolmoImageProcessor(BaseImageProcessor):
    model_input_names = ["images", "image_input_idx", "image_masks"]

    def __init__(self, max_crops: int = 12, overlap_margins=(4, 4), base_image_input_size=(336, 336),
                 image_token_length_w: int = 12, image_token_length_h: int = 12, image_patch_size: int = 14,
                 image_padding_mask: bool = True, do_normalize: bool = True, image_mean=None, image_std=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.max_crops, self.overlap_margins = max_crops, list(overlap_margins)
        self.base_image_input_size = list(base_image_input_size)
        self.image_token_length_w, self.image_token_length_h = image_token_length_w, image_token_length_h
        self.image_patch_size, self.image_padding_mask, self.do_normalize = image_patch_size, image_padding_mask, \
            do_normalize
        self.image_mean = list(image_mean) if image_mean is not None else list(OPENAI_CLIP_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(OPENAI_CLIP_STD)

    def crops_and_tokens(self, image: np.ndarray, ids: dict[str, int]):
        """One image -> (crops [n, patches, p*p*3], its token ids, image_input_idx [n, tokens], masks [n, patches])."""
        p = self.image_patch_size
        crop_size = self.base_image_input_size[0]
        crop_patches_h = self.base_image_input_size[0] // p
        crop_patches_w = self.base_image_input_size[1] // p
        th, tw = self.image_token_length_h, self.image_token_length_w
        left, right = self.overlap_margins
        if left % 2 or (crop_patches_h + 1) // 2 != th or (crop_patches_w + 1) // 2 != tw:
            raise ValueError("MolmoImageProcessor: margins must be even and token lengths half the crop patches")
        margin_px = p * (left + right)
        window_patches = crop_patches_h - (left + right)
        window = window_patches * p
        h, w = image.shape[:2]
        rows, cols = (int(v) for v in select_tiling(h - margin_px, w - margin_px, window, self.max_crops))
        src, pix = _resize_and_pad(image, [rows * window + margin_px, cols * window + margin_px], self.image_mean,
                                   self.image_std)
        # Per crop: the pooled-token grid [th, tw] holding each kept token's running number (-1: margin).
        crops, masks, order = [], [], []
        counter = 0
        for i in range(rows):
            y0 = i * window
            ch = crop_patches_h - (left + right) + (left if i == 0 else 0) + (right if i == rows - 1 else 0)
            oy = 0 if i == 0 else left // 2
            for j in range(cols):
                x0 = j * window
                cw = crop_patches_w - (left + right) + (left if j == 0 else 0) + (right if j == cols - 1 else 0)
                ox = 0 if j == 0 else left // 2
                ph, pw = (ch + 1) // 2, (cw + 1) // 2
                grid = np.full((th, tw), -1, dtype=np.int64)
                grid[oy:oy + ph, ox:ox + pw] = np.arange(counter, counter + ph * pw).reshape(ph, pw)
                counter += ph * pw
                order.append(grid)
                crops.append(src[y0:y0 + crop_size, x0:x0 + crop_size])
                masks.append(pix[y0:y0 + crop_size, x0:x0 + crop_size])
        crops = _patchify(np.stack(crops), p)
        masks = _patchify(np.stack(masks)[..., None], p).astype(np.float32).mean(-1)
        order = np.stack(order).reshape(-1)
        # Number the kept tokens in reading order of the whole image (row of crops, token row, crop, token column).
        valid = order >= 0
        reading = np.transpose(order.reshape(rows, cols, th, tw), (0, 2, 1, 3)).reshape(-1)
        order[valid] = reading[reading >= 0]
        # Tokens: the global crop's grid, then the high-resolution grid, each row ending in <im_col>.
        gh = rows * window_patches + left + right
        gw = cols * window_patches + left + right
        def grid_tokens(n_rows, n_cols):
            row = [ids[IM_PATCH]] * n_cols + [ids[IM_COL]]
            return [ids[IM_START]] + row * n_rows + [ids[IM_END]]
        tokens = np.array(grid_tokens(th, tw) + grid_tokens((gh + 1) // 2, (gw + 1) // 2), dtype=np.int64)
        glob, _ = _resize_and_pad(image, self.base_image_input_size, self.image_mean, self.image_std)
        crops = np.concatenate([_patchify(glob[None], p), crops], 0)
        per_image = th * tw
        order = np.concatenate([np.arange(per_image), np.where(order >= 0, order + per_image, -1)])
        masks = np.pad(masks, [[0, 1], [0, 0]], constant_values=-1)  # sic: the global crop's row goes last
        # image_input_idx: for each (crop, token slot), the position of an <im_patch> token, -100 for margins. As in
        # the original (build_image_input_idx), the k-th kept slot takes the position of the slot numbered k.
        positions = np.nonzero(tokens == ids[IM_PATCH])[0]
        valid = order >= 0
        numbers = order[valid]
        inverse = np.empty_like(numbers)
        inverse[numbers] = np.arange(numbers.size)
        idx = np.full(order.shape, -100, dtype=np.int64)
        idx[valid] = positions[inverse]
        return crops.astype(np.float32), tokens, idx.reshape(-1, per_image), masks.astype(np.float32)

    def preprocess(self, images, **kwargs):
        raise NotImplementedError("MolmoImageProcessor needs the token ids: call MolmoProcessor")


class MolmoProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if chat_template is None:
            chat_template = CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def _ids(self) -> dict[str, int]:
        ids = {t: self.tokenizer.convert_tokens_to_ids(t) for t in EXTRA_TOKENS}
        if any(v is None or v == self.tokenizer.unk_token_id for v in ids.values()):
            raise ValueError(f"the tokenizer lacks Molmo's image tokens {EXTRA_TOKENS}")
        return ids

    # ids the calibration masks out of the loss (multimodal.image_token_ids finds them by name)
    image_patch_token_id = property(lambda self: self._ids()[IM_PATCH])
    image_col_token_id = property(lambda self: self._ids()[IM_COL])
    image_start_token_id = property(lambda self: self._ids()[IM_START])
    image_end_token_id = property(lambda self: self._ids()[IM_END])

    def _bos(self) -> int:
        # OLMo's tokenizer has no BOS: EOS separates; `or` as the original (an id 0 BOS also falls back to EOS)
        return self.tokenizer.bos_token_id or self.tokenizer.eos_token_id

    def encode_one(self, text: str, image=None) -> dict[str, torch.Tensor]:
        """One example, ``text`` already formatted: 1-D input_ids (BOS, image tokens, text) and, with an image,
        images / image_input_idx / image_masks."""
        tokens = np.asarray(self.tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
        out = {}
        if image is not None:
            if isinstance(image, Image.Image):
                image = np.array(ImageOps.exif_transpose(image.convert("RGB")))
            image = np.asarray(image).astype(np.uint8)
            crops, img_tokens, idx, masks = self.image_processor.crops_and_tokens(image, self._ids())
            tokens = np.concatenate([img_tokens, tokens])
            out = {"images": torch.from_numpy(crops), "image_input_idx": torch.from_numpy(np.where(idx < 0, idx,
                                                                                                    idx + 1)),
                   "image_masks": torch.from_numpy(masks)}
        out["input_ids"] = torch.from_numpy(np.concatenate([[self._bos()], tokens]).astype(np.int64))
        return out

    def process(self, text: str, images=None) -> dict[str, torch.Tensor]:
        """The original processor's entry point: ``text`` is the user message, wrapped as ``" User: ... Assistant:"``."""
        if isinstance(images, (list, tuple)):
            if len(images) > 1:
                raise ValueError("MolmoProcessor: one image per example")
            images = images[0] if images else None
        return self.encode_one(" User: " + text + " Assistant:", images)

    def __call__(self, images=None, text=None, return_tensors="pt", **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [""])
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if images is not None and len(images) != len(texts):
            raise ValueError(f"MolmoProcessor: {len(images)} images for {len(texts)} texts (one image per text)")
        rows = [self.encode_one(t, images[i] if images is not None else None) for i, t in enumerate(texts)]
        if len({r["input_ids"].shape[0] for r in rows}) > 1 or (images is not None and
                                                                 len({r["images"].shape for r in rows}) > 1):
            raise ValueError("MolmoProcessor: examples of different lengths; process them one at a time")
        out = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        return BatchFeature(out, tensor_type=None)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
