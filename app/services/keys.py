from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from cachetools import TTLCache
from sqlalchemy.orm import Session, sessionmaker

from app.core.security import Keyring, new_api_key
from app.db.models import ApiKey


def create_key(factory: sessionmaker[Session], keyring: Keyring, *, name: str, scope: str = "user",
               rate_limit_per_minute: int | None = None, max_concurrent_jobs: int | None = None,
               storage_quota_bytes: int | None = None) -> tuple[ApiKey, str]:
    """Creates a key; returns the row and the key itself (shown once: only its HMAC is stored)."""
    if scope not in ("admin", "user"):
        raise ValueError("scope must be admin or user")
    key_id, secret = new_api_key()
    row = ApiKey(id=key_id, name=name, key_hash=keyring.hash_key(secret), scope=scope,
                 rate_limit_per_minute=rate_limit_per_minute, max_concurrent_jobs=max_concurrent_jobs,
                 storage_quota_bytes=storage_quota_bytes)
    with factory() as db, db.begin():
        db.add(row)
    return row, secret


def set_storage_quota(factory: sessionmaker[Session], key_id: str, quota: int | None) -> ApiKey | None:
    """Set (None: remove) a key's storage quota; returns the row, or None when there is no such key."""
    with factory() as db, db.begin():
        row = db.get(ApiKey, key_id)
        if row is not None:
            row.storage_quota_bytes = quota
    return row


class PrincipalCache:
    """Verified API keys this process remembers for at most ``ttl_s`` seconds, keyed by the key's HMAC (the key
    itself is never kept): authentication then costs one HMAC instead of a database read per request. Only
    successful checks are remembered. An entry older than half the TTL is re-checked in the background while it
    keeps answering, so a busy key never waits for the database; a key not cached is checked at once, one check per
    key at a time (no stampede). Revoking a key through this process forgets it at once (``forget``); a revocation
    made elsewhere (another API process, the admin CLI) takes effect here within ``ttl_s``. Submitting a job
    re-checks the key in the database anyway (``limits.admit``). ``ttl_s`` 0: every request checks."""

    def __init__(self, ttl_s: float, maxsize: int = 10_000):
        self.ttl = ttl_s
        self._cache: TTLCache[str, tuple[Any, float]] | None = (
            TTLCache(maxsize=maxsize, ttl=ttl_s) if ttl_s > 0 else None)
        self._lock = threading.Lock()  # TTLCache is not thread-safe; sync routes run in a thread pool
        self._epoch = 0  # bumped by forget(): a check that began before it must not re-add what it removed
        # on the event loop only:
        self._verifying: dict[str, tuple[asyncio.Lock, int]] = {}  # digest -> (lock, waiters)
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def principal(self, digest: str, check: Callable[[], Any]) -> Any:
        """The principal of the key whose HMAC is ``digest``; ``check`` (blocking: run in a thread) reads it from
        the database or raises."""
        if self._cache is None:
            return await anyio.to_thread.run_sync(check)
        hit = self._get(digest)
        if hit is not None:
            who, verified_at = hit
            if time.monotonic() - verified_at > self.ttl / 2 and digest not in self._refreshing:
                self._refreshing.add(digest)
                task = asyncio.get_running_loop().create_task(self._refresh(digest, check))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return who
        async with self._one_check(digest):
            hit = self._get(digest)
            if hit is not None:
                return hit[0]
            epoch = self._epoch
            who = await anyio.to_thread.run_sync(check)
            self._put(digest, who, epoch)
            return who

    def forget(self, key_id: str) -> None:
        if self._cache is None:
            return
        with self._lock:
            self._epoch += 1
            for digest in [d for d, (p, _) in self._cache.items() if p.key_id == key_id]:
                self._cache.pop(digest, None)

    def _get(self, digest: str) -> tuple[Any, float] | None:
        with self._lock:
            return self._cache.get(digest)

    def _put(self, digest: str, principal: Any, epoch: int) -> None:
        with self._lock:
            if epoch == self._epoch:
                self._cache[digest] = (principal, time.monotonic())

    async def _refresh(self, digest: str, check: Callable[[], Any]) -> None:
        epoch = self._epoch
        try:
            who = await anyio.to_thread.run_sync(check)
        except Exception:  # noqa: BLE001 - revoked, or the database failed: the next request checks for itself
            with self._lock:
                self._cache.pop(digest, None)
        else:
            self._put(digest, who, epoch)
        finally:
            self._refreshing.discard(digest)

    @contextlib.asynccontextmanager
    async def _one_check(self, digest: str) -> AsyncIterator[None]:
        """Held while one request checks ``digest`` in the database; the others wait, then find it cached."""
        lock, waiters = self._verifying.get(digest) or (asyncio.Lock(), 0)
        self._verifying[digest] = (lock, waiters + 1)
        try:
            async with lock:
                yield
        finally:
            lock, waiters = self._verifying[digest]
            if waiters <= 1:
                del self._verifying[digest]
            else:
                self._verifying[digest] = (lock, waiters - 1)
