"""Queue classes by GPU memory, parsed from ``MOPEQ_QUEUES`` (``"cpu:16,gpu-80g:80"``). Pure parsing, so that the
settings can validate the list; routing lives in ``app.services.queues``."""

from __future__ import annotations

import re
from dataclasses import dataclass

GB = 1e9
HEADROOM = 1.2  # allocator fragmentation, CUDA context, temporaries of the stage in flight
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class QueueClass:
    name: str
    gb: float

    @property
    def bytes(self) -> int:
        return int(self.gb * GB)


def parse_queues(spec: str) -> list[QueueClass]:
    """``"cpu:16,gpu-80g:80"`` -> queue classes, smallest first. Raises ValueError on a malformed list."""
    out: list[QueueClass] = []
    for part in (p.strip() for p in (spec or "").split(",")):
        if not part:
            continue
        name, sep, gb = part.rpartition(":")
        try:
            size = float(gb)
        except ValueError:
            size = -1.0
        if not sep or not _NAME.fullmatch(name) or not size > 0:
            raise ValueError(f"MOPEQ_QUEUES entry {part!r} is not NAME:GB (e.g. gpu-80g:80)")
        if any(q.name == name for q in out):
            raise ValueError(f"MOPEQ_QUEUES names queue {name!r} twice")
        out.append(QueueClass(name, size))
    return sorted(out, key=lambda q: q.gb)
