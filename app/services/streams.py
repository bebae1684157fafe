"""Open event streams per API key (MOPEQ_SSE_MAX_STREAMS_PER_KEY): each stream holds a slot from its start until its
response has been sent.

With Redis configured (``Settings.redis_url``) the slots are shared by every API process: a sorted set per key holds
one lease per open stream (member: the slot's random id, score: when the lease runs out), taken by one atomic Lua
script that first drops run-out leases, counts, and adds. An open stream renews its lease every ``LEASE_S / 3``; a
stream of a process that died without releasing its slot frees it within ``LEASE_S``. Without Redis (the embedded
default), or while Redis cannot be reached, the slots are counted in this process."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("mopeq.api")
LEASE_S = 30.0

# KEYS[1] the key's set; ARGV: now, lease expiry, limit, slot id, set TTL (s)
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


@dataclass
class Slot:
    """A held slot; ``keep()`` renews its lease (cheap to call on every poll)."""

    slots: StreamSlots
    key_id: str
    slot_id: str | None  # None: counted in this process
    poll: float
    renewed: float = 0.0

    async def keep(self) -> None:
        if self.slot_id is not None and time.monotonic() - self.renewed > LEASE_S / 3:
            self.renewed = time.monotonic()
            await self.slots._renew(self)


class StreamSlots:
    def __init__(self, redis_url: str | None = None, key_prefix: str = ""):
        self.redis_url, self._prefix = redis_url, f"{key_prefix}mopeq:streams:"
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _redis(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or loop is not self._loop:  # an asyncio client belongs to its event loop
            import redis.asyncio as aioredis

            self._loop = loop
            self._client = aioredis.from_url(self.redis_url, socket_connect_timeout=1, socket_timeout=1)
        return self._client

    async def acquire(self, key_id: str, limit: int, poll: float) -> Slot | None:
        if self.redis_url is not None:
            slot_id, now = secrets.token_hex(8), time.time()
            try:
                ok = await self._redis().eval(_ACQUIRE, 1, self._prefix + key_id, now, now + LEASE_S, limit,
                                              slot_id, int(LEASE_S * 2))
                return Slot(self, key_id, slot_id, poll, time.monotonic()) if ok else None
            except Exception as exc:  # noqa: BLE001 - Redis down: count in this process
                log.warning("stream slots: Redis unavailable (%s); counting in this process", type(exc).__name__)
        with self._lock:
            if self._open[key_id] >= limit:
                return None
            self._open[key_id] += 1
        return Slot(self, key_id, None, poll)

    async def _renew(self, slot: Slot) -> None:
        try:
            await self._redis().zadd(self._prefix + slot.key_id, {slot.slot_id: time.time() + LEASE_S}, xx=True)
        except Exception as exc:  # noqa: BLE001 - the lease runs out on its own; the stream goes on
            log.warning("stream slots: could not renew a lease (%s)", type(exc).__name__)

    async def release(self, slot: Slot) -> None:
        if slot.slot_id is not None:
            try:
                await self._redis().zrem(self._prefix + slot.key_id, slot.slot_id)
            except Exception as exc:  # noqa: BLE001 - the lease runs out on its own
                log.warning("stream slots: could not release a lease (%s)", type(exc).__name__)
            return
        with self._lock:
            self._open[slot.key_id] -= 1
            if self._open[slot.key_id] <= 0:
                del self._open[slot.key_id]
