from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

from cachetools import TTLCache
from sqlalchemy.orm import Session, sessionmaker

from app.core.security import Keyring, new_api_key
from app.db.models import ApiKey


def create_key(factory: sessionmaker[Session], keyring: Keyring, *, name: str, scope: str = "user",
               rate_limit_per_minute: int | None = None, max_concurrent_jobs: int | None = None) -> tuple[ApiKey, str]:
    """Creates a key; returns the row and the key itself (shown once: only its HMAC is stored)."""
    if scope not in ("admin", "user"):
        raise ValueError("scope must be admin or user")
    key_id, secret = new_api_key()
    row = ApiKey(id=key_id, name=name, key_hash=keyring.hash_key(secret), scope=scope,
                 rate_limit_per_minute=rate_limit_per_minute, max_concurrent_jobs=max_concurrent_jobs)
    with factory() as db, db.begin():
        db.add(row)
    return row, secret


class PrincipalCache:
    """Verified API keys this process remembers for ``ttl_s`` seconds, keyed by the key's HMAC (the key itself is
    never kept): authentication then costs one HMAC instead of a database read per request. Only successful checks
    are remembered. Revoking a key through this process forgets it at once (``forget``); a revocation made elsewhere
    (another API process, the admin CLI) takes effect here within ``ttl_s``. Submitting a job re-checks the key in
    the database anyway (``limits.admit``)."""

    def __init__(self, ttl_s: float, maxsize: int = 10_000):
        self._cache: TTLCache[str, Any] | None = TTLCache(maxsize=maxsize, ttl=ttl_s) if ttl_s > 0 else None
        self._lock = threading.Lock()  # TTLCache is not thread-safe; sync routes run in a thread pool
        self._verifying: dict[str, tuple[asyncio.Lock, int]] = {}  # digest -> (lock, waiters), on the event loop

    def get(self, digest: str) -> Any:
        if self._cache is None:  # MOPEQ_AUTH_CACHE_TTL_S=0: every request reads the key row
            return None
        with self._lock:
            return self._cache.get(digest)

    def put(self, digest: str, principal: Any) -> None:
        if self._cache is None:
            return
        with self._lock:
            self._cache[digest] = principal

    @contextlib.asynccontextmanager
    async def verifying(self, digest: str) -> AsyncIterator[None]:
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

    def forget(self, key_id: str) -> None:
        if self._cache is None:
            return
        with self._lock:
            for digest in [d for d, p in self._cache.items() if p.key_id == key_id]:
                self._cache.pop(digest, None)
