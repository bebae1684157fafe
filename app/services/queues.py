"""Queues by GPU memory. The operator lists the classes of workers it runs, ``MOPEQ_QUEUES="cpu:16,gpu-24g:24,
gpu-80g:80,gpu-141g:141"`` (GB of device memory each); at submit a job goes to the smallest queue whose memory covers
what its estimate needs, and a job that fits none is refused with the figure. A worker serves one queue
(``python -m worker --queue gpu-80g``; ``auto`` picks the largest class its GPU holds)."""

from __future__ import annotations

from typing import Any

from app.core.config import Settings
from app.core.queue_classes import GB, HEADROOM, QueueClass, parse_queues  # noqa: F401 (re-exported)
from app.services.errors import ServiceError


def configured(settings: Settings) -> list[QueueClass]:
    return parse_queues(settings.QUEUES)


def queue_names(settings: Settings) -> list[str]:
    """Every queue this deployment publishes to (for /metrics): the configured classes, else the one queue."""
    names = [q.name for q in configured(settings)]
    return names or [settings.QUEUE]


def memory_needed(est: Any, plan: Any) -> int:
    """Device memory a job needs, from metadata only (the engine streams the model one layer at a time):
    the non-expert weights at their stored dtype, the largest MoE layer's experts twice in fp32 (the weights and the
    quantized or probed copy), the calibration activations (``plan.activation_bytes``) and, for GPTQ, the largest
    layer's Hessians (one layer's are held at a time; ``plan.hessian_bytes`` counts every layer's), plus 20%."""
    layer = max((la.experts * sum(o * i for o, i in la.shapes) for la in est.layers), default=0) * 4
    hessians = (max((la.experts * sum(i * i for _o, i in la.shapes) for la in est.layers), default=0) * 4
                if plan.hessian_bytes else 0)
    return int((est.non_expert_bytes + 2 * layer + plan.activation_bytes + hessians) * HEADROOM)


def pick(settings: Settings, need_bytes: int) -> str:
    """The queue a job needing ``need_bytes`` goes to; a 422 naming the figure when it fits no configured queue."""
    classes = configured(settings)
    if not classes:
        return settings.QUEUE
    for q in classes:
        if need_bytes <= q.bytes:
            return q.name
    biggest = classes[-1]
    raise ServiceError(422, "no_queue_fits",
                       f"this job needs about {need_bytes / GB:.3g} GB of device memory ({need_bytes:,} bytes: "
                       f"non-expert weights, the largest MoE layer in fp32 twice, calibration memory, +20%); the "
                       f"largest queue, '{biggest.name}', has {biggest.gb:g} GB (MOPEQ_QUEUES). Lower "
                       "calibration.samples or seq_len, or ask the operator for a larger class",
                       extra={"memory_needed_bytes": need_bytes, "memory_needed_gb": round(need_bytes / GB, 6)})


def for_device(settings: Settings, total_bytes: int | None) -> str:
    """``--queue auto``: the largest configured class whose memory the device holds (the smallest class without a
    GPU); MOPEQ_QUEUE's own default when no classes are configured."""
    classes = configured(settings)
    if not classes:
        return "gpu" if settings.QUEUE == "auto" else settings.QUEUE
    if not total_bytes:
        return classes[0].name
    fits = [q for q in classes if q.bytes <= total_bytes]
    return (fits[-1] if fits else classes[0]).name
