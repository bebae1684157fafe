"""The read of one job for ``GET /v1/jobs/{id}`` without an ORM session: one SELECT of the row, then a detached
``Job`` built from it, which ``job_out`` renders. The ownership rule is ``jobs.get_owned``'s: another key's job is a
404.

- PostgreSQL: the Core SELECT on the async engine (psycopg's async driver).
- SQLite: the same SELECT compiled once and run on one sqlite3 connection kept for it, each value converted by
  SQLAlchemy's own result processor of its column type: no pool checkout, reset, execution context or result
  object per request. Reads in autocommit mode see every committed write (WAL)."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, inspect, select
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


class SqliteReads:
    """``read_owned`` for SQLite on a connection of its own (see the module doc); thread-safe."""

    def __init__(self, engine: Engine):
        dialect = engine.dialect
        self._sql = str(_SELECT.compile(dialect=dialect))
        self._convert = [c.type.dialect_impl(dialect).result_processor(dialect, None)
                         for c in (a.columns[0] for a in _MAPPER.column_attrs)]
        self._engine, self._conn, self._lock = engine, None, threading.Lock()

    def read_owned(self, who: Principal, job_id: str) -> Job:
        row = None
        if len(job_id) <= 64:
            with self._lock:
                if self._conn is None:  # a pooled connection (the engine's pragmas applied), kept for good
                    self._conn = self._engine.raw_connection()
                raw = self._conn.driver_connection.execute(self._sql, (job_id,)).fetchone()
            if raw is not None:
                row = [v if f is None else f(v) for f, v in zip(self._convert, raw, strict=True)]
        return _owned(row, who)
