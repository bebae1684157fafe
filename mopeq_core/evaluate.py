"""Perplexity / mean token loss of a causal LM on fixed-length samples (or on image+text SampleSets)."""

from __future__ import annotations

import math

import torch


def split_batch(batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs, labels) of a batch: a token tensor (labels = the tokens) or a model-input dict whose
    ``labels`` (IGNORE_INDEX where no loss is taken) default to its ``input_ids``."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}, batch
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, batch.get("labels", batch["input_ids"])


@torch.no_grad()
def mean_token_loss(model, samples, *, batch_size: int = 8, device=None, should_stop=None) -> float:
    """Mean next-token cross-entropy over every predicted token of every sample (float64 accumulation).

    ``samples``: int64 token windows [n, seq_len], or a ``data.SampleSet`` (image+text examples; positions whose
    label is IGNORE_INDEX, such as image placeholders, are not counted)."""
    from .data import IGNORE_INDEX, iter_batches

    param = next(model.parameters())
    device = device or param.device
    total, count = 0.0, 0
    for batch in iter_batches(samples, batch_size, device, dtype=param.dtype):
        if should_stop is not None:
            should_stop()
        inputs, labels = split_batch(batch)
        logits = model(**inputs).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 reduction="sum", ignore_index=IGNORE_INDEX)
        total += float(loss.double())
        count += int((target != IGNORE_INDEX).sum())
    return total / max(count, 1)


def perplexity(model, samples, **kw) -> float:
    return math.exp(mean_token_loss(model, samples, **kw))
