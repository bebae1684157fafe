"""Per-key request rate limit: a moving window of one minute.

With Redis configured (``MOPEQ_REDIS_URL``, or a ``redis://`` broker) the window lives in Redis, counted by the
``limits`` library's moving-window strategy (one atomic Lua script per request), so every API process counts against
one limit per key (docs/SCALING.md). Without Redis (the embedded default) it lives in this process's memory, in
``LocalWindow``: ``limits``' own MemoryStorage starts a timer thread to expire entries whenever the last one has
finished (every 10 ms under load), which cost more than the rest of a ``GET /v1/jobs/{id}`` (docs/BENCHMARKS.md).
While Redis cannot be reached each process falls back to its local window (logged), so an outage of Redis degrades
the limit to per-process instead of refusing every request."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from functools import lru_cache
from typing import Any

from limits import RateLimitItem, RateLimitItemPerMinute

log = logging.getLogger("mopeq.api")
NAMESPACE = "mopeq-rate"


@lru_cache(maxsize=1024)
def _per_minute(limit: int) -> RateLimitItem:
    return RateLimitItemPerMinute(limit, namespace=NAMESPACE)


def _wait_s(reset_time: float) -> int:
    return max(1, math.ceil(reset_time - time.time()))


class LocalWindow:
    """A sliding window of ``window_s`` per key in this process (a deque of hit times per key)."""

    def __init__(self, window_s: float = 60.0):
        self.window = window_s
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, limit: int) -> int | None:
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


class RateLimiter:
    def __init__(self, redis_url: str | None = None, key_prefix: str = ""):
        self.redis_url = redis_url
        self._key_prefix = f"{key_prefix}mopeq"
        self._local = LocalWindow()
        self._shared: Any = None  # limits.aio's limiter on Redis, made in the serving event loop on first use
        self._warned = 0.0

    def _redis(self) -> Any:
        if self._shared is None:
            from limits.aio.storage import RedisStorage
            from limits.aio.strategies import MovingWindowRateLimiter as AsyncMovingWindow

            uri = "async+" + self.redis_url.removeprefix("async+")
            storage = RedisStorage(uri, implementation="redispy", key_prefix=self._key_prefix,
                                   socket_connect_timeout=1, socket_timeout=1)
            self._shared = AsyncMovingWindow(storage)
        return self._shared

    async def hit(self, key: str, limit: int) -> int | None:
        """Records a request; returns None when allowed, else the seconds to wait (for Retry-After)."""
        if self.redis_url is not None:
            item = _per_minute(limit)
            try:
                limiter = self._redis()
                if await limiter.hit(item, key):
                    return None
                return _wait_s((await limiter.get_window_stats(item, key)).reset_time)
            except Exception as exc:  # noqa: BLE001 - Redis down: count in this process until it is back
                if time.monotonic() - self._warned > 30:
                    self._warned = time.monotonic()
                    log.warning("rate limit: Redis unavailable (%s); counting in this process until it is back",
                                type(exc).__name__)
        return self._local.hit(key, limit)
