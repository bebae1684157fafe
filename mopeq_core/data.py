"""Calibration and evaluation text: .txt or .jsonl (one {"text": ...} per line), cut into fixed-length samples."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import CalibrationDataError

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
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
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


def split_holdout(samples: torch.Tensor, holdout_fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, holdout): the last share of calibration samples is kept back to choose between candidate bit maps."""
    n = samples.shape[0]
    k = max(1, int(round(n * holdout_fraction))) if n > 1 else 0
    if k == 0:
        return samples, samples
    return samples[: n - k], samples[n - k:]
