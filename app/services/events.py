"""Job events: the rows behind GET /v1/jobs/{id}/events (their ids are the SSE event ids)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.security import redact
from app.db.models import JobEvent


def add_event(db: Session, job_id: str, kind: str, *, status: str | None = None, stage: str | None = None,
              progress: float | None = None, message: str | None = None) -> JobEvent:
    ev = JobEvent(job_id=job_id, kind=kind, status=status, stage=stage, progress=progress,
                  message=redact(message) if message else message)
    db.add(ev)
    return ev


def events_after(db: Session, job_id: str, after: int, limit: int = 500) -> list[JobEvent]:
    return list(db.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                           .order_by(JobEvent.id).limit(limit)))
