"""Examples that are not plain token windows (image+text data of vision-language models): :class:`SampleSet`.

Its own module so that ``mopeq_core.data`` (which builds sample sets through ``mopeq_core.multimodal``) and
``mopeq_core.multimodal`` (which makes them) both import it without importing each other."""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100  # label value of positions that take no loss (image placeholders, the prompt)


class SampleSet:
    """Examples that are not plain token windows: each item holds one forward pass's model inputs (``input_ids``
    [1, L], ``attention_mask``, ``pixel_values``, ``image_grid_thw``, ... whatever the processor returns) plus
    ``labels`` [1, L] with IGNORE_INDEX where no loss is taken. Items differ in length, so each is its own batch:
    nothing is padded and no padding token ever reaches a router or the calibration statistics.

    ``len()`` counts examples and slicing returns a SampleSet, like the rows of a token-window tensor.
    """

    def __init__(self, items: list[dict[str, torch.Tensor]], meta: list[dict[str, Any]] | None = None):
        self.items = list(items)
        self.meta = list(meta) if meta is not None else [{} for _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return SampleSet(self.items[idx], self.meta[idx])
        return self.items[idx]

    def __repr__(self) -> str:
        return f"SampleSet({len(self)} examples, {self.numel()} tokens, {self.num_targets()} loss targets)"

    @property
    def shape(self) -> tuple[int, int]:
        """(examples, longest sequence), for code that reads ``samples.shape[0]``."""
        return len(self), max((int(it["input_ids"].shape[-1]) for it in self.items), default=0)

    def numel(self) -> int:
        """Positions run through the model (image placeholder tokens included: they pass the MoE layers too)."""
        return sum(int(it["input_ids"].numel()) for it in self.items)

    def num_targets(self) -> int:
        return sum(_targets(it) for it in self.items)

    def to(self, device) -> SampleSet:
        return SampleSet([{k: v.to(device) for k, v in it.items()} for it in self.items], self.meta)


def _targets(batch: dict[str, torch.Tensor]) -> int:
    labels = batch.get("labels", batch["input_ids"])
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
