"""Per-key request rate limit (sliding window of one minute), kept in the API process's memory.

With several API replicas each enforces the limit on its own share; put a proxy limit in front for a global one."""

from __future__ import annotations

import math
import threading
import time
from collections import deque


class RateLimiter:
    def __init__(self, window_s: float = 60.0):
        self.window = window_s
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, limit: int) -> int | None:
        """Records a request; returns None when allowed, else the seconds to wait (for Retry-After)."""
        now = time.monotonic()
        with self._lock:
            q = self._hits.setdefault(key, deque())
            while q and now - q[0] >= self.window:
                q.popleft()
            if len(q) >= limit:
                return max(1, math.ceil(self.window - (now - q[0])))
            q.append(now)
            if len(self._hits) > 100_000:  # drop idle keys
                for k in [k for k, v in self._hits.items() if not v or now - v[-1] >= self.window][:50_000]:
                    self._hits.pop(k, None)
            return None
