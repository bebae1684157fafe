"""Perplexity / mean token loss of a causal LM on fixed-length samples."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def mean_token_loss(model, samples: torch.Tensor, *, batch_size: int = 8, device=None,
                    should_stop=None) -> float:
    """Mean next-token cross-entropy over every predicted token of every sample (float64 accumulation)."""
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, samples.shape[0], batch_size):
        if should_stop is not None:
            should_stop()
        batch = samples[i: i + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        target = batch[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 reduction="sum")
        total += float(loss.double())
        count += target.numel()
    return total / max(count, 1)


def perplexity(model, samples: torch.Tensor, **kw) -> float:
    return math.exp(mean_token_loss(model, samples, **kw))
