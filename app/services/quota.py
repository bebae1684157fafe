"""Per-key storage quota (``api_keys.storage_quota_bytes``, set by an admin; NULL = no quota).

A submit is refused with 422 ``storage_quota_exceeded`` when the key's stored artifact bytes, plus the estimated
output of its jobs still queued or running, plus this job's estimated output exceed the quota. It runs in the
admission transaction, after ``limits.admit`` has taken the key's lock, so concurrent submits cannot overshoot it
together. Deleting finished jobs (``DELETE /v1/jobs/{id}``) frees their bytes."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import TERMINAL, ApiKey, Artifact, Job
from app.services.errors import ServiceError


@dataclass
class StorageUse:
    stored_bytes: int  # artifact files of the key's jobs
    reserved_bytes: int  # estimated output of the key's queued and running jobs

    @property
    def total(self) -> int:
        return self.stored_bytes + self.reserved_bytes


def storage_use(db: Session, key_id: str) -> StorageUse:
    stored = db.scalar(select(func.coalesce(func.sum(Artifact.bytes), 0)).join(Job, Job.id == Artifact.job_id)
                       .where(Job.owner_key_id == key_id, Artifact.kind == "file")) or 0
    reserved = db.scalar(select(func.coalesce(func.sum(Job.est_output_bytes), 0))
                         .where(Job.owner_key_id == key_id, Job.status.not_in(TERMINAL))) or 0
    return StorageUse(int(stored), int(reserved))


def check_storage(db: Session, key_id: str, est_output_bytes: int) -> None:
    quota = db.scalar(select(ApiKey.storage_quota_bytes).where(ApiKey.id == key_id))
    if quota is None:
        return
    use = storage_use(db, key_id)
    if use.total + est_output_bytes > quota:
        raise ServiceError(
            422, "storage_quota_exceeded",
            f"this job's estimated output ({est_output_bytes:,} bytes) plus this key's stored artifacts "
            f"({use.stored_bytes:,} bytes) and the estimated output of its unfinished jobs ({use.reserved_bytes:,} "
            f"bytes) exceed the key's storage quota of {quota:,} bytes (storage_quota_bytes); delete finished jobs "
            "(DELETE /v1/jobs/{id}), use fewer or lower bits, or ask an admin for a larger quota",
            extra={"quota": {"storage_quota_bytes": quota, "stored_bytes": use.stored_bytes,
                             "reserved_bytes": use.reserved_bytes, "requested_bytes": est_output_bytes}})
