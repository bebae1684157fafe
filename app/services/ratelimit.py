"""Per-key request rate limit: a moving window of one minute, counted by the ``limits`` library.

Embedded default (no Redis): the window lives in this process's memory. With Redis configured
(``MOPEQ_REDIS_URL``, or a ``redis://`` broker) it lives in Redis, so every API process counts against one limit per
key (docs/SCALING.md). While Redis cannot be reached each process falls back to its own in-memory window (logged),
so an outage of Redis degrades the limit to per-process instead of refusing every request."""

from __future__ import annotations

import logging
import math
import time
from functools import lru_cache
from typing import Any

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

log = logging.getLogger("mopeq.api")
NAMESPACE = "mopeq-rate"


@lru_cache(maxsize=1024)
def _per_minute(limit: int) -> RateLimitItem:
    return RateLimitItemPerMinute(limit, namespace=NAMESPACE)


def _wait_s(reset_time: float) -> int:
    return max(1, math.ceil(reset_time - time.time()))


class RateLimiter:
    def __init__(self, redis_url: str | None = None, key_prefix: str = ""):
        self.redis_url = redis_url
        self._key_prefix = f"{key_prefix}mopeq"
        self._local = MovingWindowRateLimiter(MemoryStorage())
        self._shared: Any = None  # limits.aio's limiter on Redis, made in the serving event loop on first use
        self._warned = 0.0

    @property
    def shared(self) -> bool:
        return self.redis_url is not None

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
        item = _per_minute(limit)
        if self.redis_url is not None:
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
        if self._local.hit(item, key):
            return None
        return _wait_s(self._local.get_window_stats(item, key).reset_time)
