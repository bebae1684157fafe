"""Calibration and evaluation data: .txt or .jsonl (one {"text": ...} per line), cut into fixed-length samples.

For vision-language models a .jsonl line may also carry ``"image"`` (a path relative to the .jsonl file) beside
``"text"``; such files become a :class:`SampleSet` of per-example model inputs prepared by the model's processor
(see ``mopeq_core.multimodal``). Text-only data stays an int64 tensor [n, seq_len] of token windows. The helpers
``iter_batches`` / ``num_tokens`` / ``num_targets`` accept either kind, so the stages do not care which they get.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import CalibrationDataError
from .formats import has_image_lines
from .samples import IGNORE_INDEX, SampleSet, _targets  # noqa: F401  (IGNORE_INDEX, SampleSet: public here too)

DEFAULT_CALIB = Path(__file__).parent / "data" / "calib_default.txt"


def read_texts(path: str | Path | None) -> list[str]:
    """The texts of a .txt file (one text) or a .jsonl file (the "text" field of each line)."""
    p = Path(path) if path else DEFAULT_CALIB
    if not p.is_file():
        raise CalibrationDataError(f"data file {p} does not exist")
    if p.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationDataError(f"{p}:{n} is not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise CalibrationDataError(f'{p}:{n} has no string "text" field')
            texts.append(row["text"])
    elif p.suffix in (".txt", ".md", ""):
        texts = [p.read_text(encoding="utf-8", errors="replace")]
    else:
        raise CalibrationDataError(f"{p}: use a .txt file or a .jsonl file with a \"text\" field per line")
    if not any(t.strip() for t in texts):
        raise CalibrationDataError(f"{p} holds no text")
    return texts


def token_samples(tokenizer, texts: list[str], n_samples: int, seq_len: int, *, offset: int = 0) -> torch.Tensor:
    """Concatenate the texts (separated by EOS) and cut ``n_samples`` windows of ``seq_len`` tokens.

    Windows start at ``offset`` tokens; if the text is short they are spread evenly (with overlap) over it.
    Returns int64 [n, seq_len]; n may be smaller than asked when the text has fewer tokens than one window each.
    """
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for t in texts:
        # The whole text is tokenized at once and cut into windows afterwards, so the tokenizer's
        # "longer than model_max_length" warning does not apply; verbose=False keeps it quiet.
        ids.extend(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
        ids.extend(sep)
    ids = ids[offset:]
    if len(ids) < seq_len + 1:
        raise CalibrationDataError(
            f"the data has {len(ids)} tokens, fewer than one sample of --seq-len {seq_len}; give more text")
    all_ids = torch.tensor(ids, dtype=torch.long)
    available = len(ids) // seq_len
    if available >= n_samples:
        return all_ids[: n_samples * seq_len].view(n_samples, seq_len)
    starts = torch.linspace(0, len(ids) - seq_len, n_samples).long().unique()
    return torch.stack([all_ids[s: s + seq_len] for s in starts.tolist()])


def iter_batches(samples, batch_size: int, device=None, dtype: torch.dtype | None = None
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Model-input dicts for ``samples``: ``{"input_ids": rows}`` slices of a token-window tensor, or the items of
    a SampleSet one at a time. ``labels`` (when present) must be popped before calling the model; floating tensors
    (pixel values) are cast to ``dtype`` when given."""
    if isinstance(samples, torch.Tensor):
        for i in range(0, samples.shape[0], batch_size):
            batch = samples[i: i + batch_size]
            yield {"input_ids": batch if device is None else batch.to(device)}
        return
    for item in samples.items:
        out = {}
        for k, v in item.items():
            if device is not None:
                v = v.to(device)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            out[k] = v
        yield out


def num_tokens(samples) -> int:
    """Positions the model runs over (token windows: every token; a SampleSet: every position incl. images)."""
    return int(samples.numel())


def num_targets(samples) -> int:
    """Next-token predictions that count in the loss (token windows: n × (seq_len − 1))."""
    if isinstance(samples, torch.Tensor):
        return int(samples[:, 1:].numel())
    if isinstance(samples, dict):
        return _targets(samples)
    return samples.num_targets()


def read_records(path: str | Path | None) -> list[dict[str, Any]]:
    """The lines of a .jsonl file as {"text": str, "image": Path | None} (image resolved against the file's
    folder and required to stay inside it); a .txt file is one text record without an image."""
    p = Path(path) if path else DEFAULT_CALIB
    if p.suffix != ".jsonl":
        return [{"text": t, "image": None} for t in read_texts(p)]
    texts = read_texts(p)  # validates JSON and the "text" fields
    base = p.parent.resolve()
    records = []
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    for n, (line, text) in enumerate(zip(lines, texts), 1):
        row = json.loads(line)
        image = row.get("image")
        if image is not None:
            if not isinstance(image, str) or not image.strip():
                raise CalibrationDataError(f'{p}:{n} "image" must be a path relative to the .jsonl file')
            img = (base / image).resolve()
            # Paths stay inside the data folder: a job must not read arbitrary files of the worker.
            if Path(image).is_absolute() or (img != base and base not in img.parents):
                raise CalibrationDataError(f'{p}:{n} "image" {image!r} must be a relative path inside {base}')
            if not img.is_file():
                raise CalibrationDataError(f"{p}:{n} image {image!r} does not exist (paths are relative to {p})")
            image = img
        prompt = row.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise CalibrationDataError(f'{p}:{n} "prompt" must be a string')
        records.append({"text": text, "image": image, "prompt": prompt})
    return records


def load_samples(path: str | Path | None, tokenizer, n_samples: int, seq_len: int, *, processor=None,
                 offset: int = 0):
    """Calibration/evaluation samples from ``path`` (None: the built-in calibration text).

    Text-only data: ``token_samples`` windows (int64 [n, seq_len]), as before. A .jsonl with ``"image"`` lines: a
    SampleSet of the first ``n_samples`` records prepared by ``processor`` (lines without an image become
    text-only examples), each text cut to ``seq_len`` tokens. Raises CalibrationDataError when the data has images
    and the model has no image processor.
    """
    if not has_image_lines(path):
        return token_samples(tokenizer, read_texts(path), n_samples, seq_len, offset=offset)
    if processor is None:
        raise CalibrationDataError(
            f"{path} has \"image\" lines but the model has no image processor (a text-only model, or a VLM "
            "without preprocessor/processor config files); give text-only data")
    from .multimodal import build_sample_set

    records = read_records(path)[offset:]
    return build_sample_set(processor, records[:n_samples], seq_len)
