"""schemathesis hooks for the job-body fuzz run (SCHEMATHESIS_HOOKS): a fresh Idempotency-Key per request, as a
client makes one per new job. Generated keys repeat across cases, and the same key with another body is a 422 by
design (idempotency_mismatch), which says nothing about the body. Keys that break the header's schema are left as
they are, so negative cases stay negative."""

from __future__ import annotations

import re
import uuid
from typing import Any

import schemathesis

_VALID = re.compile(r"[ -~]{1,200}")


@schemathesis.hook
def map_headers(context: Any, headers: dict[str, Any] | None) -> dict[str, Any] | None:
    key = (headers or {}).get("Idempotency-Key")
    if isinstance(key, str) and _VALID.fullmatch(key):
        headers["Idempotency-Key"] = str(uuid.uuid4())  # type: ignore[index]
    return headers
