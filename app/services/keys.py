from __future__ import annotations

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
