"""The read of one job for ``GET /v1/jobs/{id}`` without an ORM session: one Core SELECT of the row (its compiled
form cached by SQLAlchemy), then a detached ``Job`` built from it, which ``job_out`` renders. A third of the ORM
path's CPU (docs/BENCHMARKS.md). The ownership rule is ``jobs.get_owned``'s: another key's job is a 404."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.models import Job
from app.services.errors import not_found
from app.services.jobs import Principal

_MAPPER = inspect(Job)
_KEYS = [a.key for a in _MAPPER.column_attrs]
_SELECT = select(*(a.columns[0] for a in _MAPPER.column_attrs)).where(Job.__table__.c.id == bindparam("job_id"))


def _job(row: Any) -> Job:
    # As the ORM's loader does: a new instance whose attribute dict is filled directly (Job(**values) would send
    # every one of its ~50 columns through the change-tracking setters, costing more than the query).
    job = _MAPPER.class_manager.new_instance()
    job.__dict__.update(zip(_KEYS, row, strict=True))
    return job


def _owned(row: Any, who: Principal) -> Job:
    job = None if row is None else _job(row)
    if job is None or (job.owner_key_id != who.key_id and not who.is_admin):
        raise not_found()
    return job


def read_owned(conn: Connection, who: Principal, job_id: str) -> Job:
    row = conn.execute(_SELECT, {"job_id": job_id}).first() if len(job_id) <= 64 else None
    return _owned(row, who)


async def read_owned_async(engine: AsyncEngine, who: Principal, job_id: str) -> Job:
    row = None
    if len(job_id) <= 64:
        async with engine.connect() as conn:
            row = (await conn.execute(_SELECT, {"job_id": job_id})).first()
    return _owned(row, who)
