from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field

from app.schemas.jobs import Strict

QUOTA_FIELD = Field(None, ge=0, le=10**18, description="Most artifact bytes this key's jobs may hold: stored files "
                                                      "plus the estimated output of its queued and running jobs. A "
                                                      "submit past it is a 422 storage_quota_exceeded. null: no quota")


class KeyCreate(Strict):
    name: str = Field(min_length=1, max_length=200)
    scope: Literal["admin", "user"] = "user"
    rate_limit_per_minute: int | None = Field(None, ge=1, le=1_000_000)
    max_concurrent_jobs: int | None = Field(None, ge=1, le=100_000)
    storage_quota_bytes: int | None = QUOTA_FIELD


class KeyUpdate(Strict):
    """The key's settings an admin can change after creation (null: no quota)."""

    storage_quota_bytes: int | None = QUOTA_FIELD


class KeyOut(BaseModel):
    id: str
    name: str
    scope: str
    rate_limit_per_minute: int | None
    max_concurrent_jobs: int | None
    storage_quota_bytes: int | None = Field(None, description="null: no quota")
    created_at: dt.datetime
    revoked_at: dt.datetime | None


class KeyCreated(KeyOut):
    api_key: str = Field(description="The key itself; shown once, stored only as an HMAC")
