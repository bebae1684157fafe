"""Open event streams per API key, in this API process (MOPEQ_SSE_MAX_STREAMS_PER_KEY): each stream holds a slot
from its start until its response has been sent."""

from __future__ import annotations

import threading
from collections import Counter


class StreamSlots:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()

    def acquire(self, key_id: str, limit: int) -> bool:
        with self._lock:
            if self._open[key_id] >= limit:
                return False
            self._open[key_id] += 1
            return True

    def release(self, key_id: str) -> None:
        with self._lock:
            self._open[key_id] -= 1
            if self._open[key_id] <= 0:
                del self._open[key_id]

