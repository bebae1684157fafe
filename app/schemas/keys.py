from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field

from app.schemas.jobs import Strict


class KeyCreate(Strict):
    name: str = Field(min_length=1, max_length=200)
    scope: Literal["admin", "user"] = "user"
    rate_limit_per_minute: int | None = Field(None, ge=1, le=1_000_000)
    max_concurrent_jobs: int | None = Field(None, ge=1, le=100_000)


class KeyOut(BaseModel):
    id: str
    name: str
    scope: str
    rate_limit_per_minute: int | None
    max_concurrent_jobs: int | None
    created_at: dt.datetime
    revoked_at: dt.datetime | None


class KeyCreated(KeyOut):
    api_key: str = Field(description="The key itself; shown once, stored only as an HMAC")
