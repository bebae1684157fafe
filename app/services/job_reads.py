"""The read behind ``GET /v1/jobs/{id}``, the service's hottest route: one ``JobReader``, chosen at start-up for the
database, that answers a job's JSON bytes. The ownership rule is ``jobs.get_owned``'s: another key's job is a 404.

- One SELECT of the columns ``job_out`` reads (``job_view.VIEW_COLUMNS``) plus the owner, JSON columns as their
  stored text, so the row as the driver returns it is a tuple of plain values.
- That raw row is the key of a small cache of rendered bodies: ``job_out`` is a function of the row alone, so an
  unchanged row is answered with the bytes rendered before, and any write (status, progress, result) makes a new
  key. Only a changed row pays for conversion, ``JobOut`` and JSON.
- The driver: SQLite through one sqlite3 connection kept for it (a read by primary key in WAL mode is never
  blocked by a writer and costs less than a thread hop); PostgreSQL through psycopg's async pool (no ORM, no
  thread). The service runs on these two only."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import JSON, Engine, Text, bindparam, cast, inspect, select
from sqlalchemy.exc import InvalidRequestError

from app.db.models import Job
from app.services.errors import database_unavailable, not_found
from app.services.job_view import VIEW_COLUMNS, job_out
from app.services.jobs import Principal

_COLUMNS = [Job.__table__.c[name] for name in (*VIEW_COLUMNS, "owner_key_id")]
_OWNER = len(_COLUMNS) - 1
_IS_JSON = [isinstance(c.type, JSON) for c in _COLUMNS]
_SELECT = select(*(cast(c, Text) if j else c for c, j in zip(_COLUMNS, _IS_JSON, strict=True))).where(
    Job.__table__.c.id == bindparam("job_id"))
_NEW_JOB = inspect(Job).class_manager.new_instance
MAX_ID = 64

Fetch = Callable[[str], Awaitable[tuple[Any, ...] | None]]


def _processor(type_: Any, dialect: Any) -> Callable[[Any], Any] | None:
    """SQLAlchemy's conversion of a column's driver value (None: used as is)."""
    try:
        return type_.dialect_impl(dialect).result_processor(dialect, None)
    except (TypeError, InvalidRequestError):  # psycopg's numerics want the column's type code: it returns floats
        return None


class JobReader:
    """``await reader.body(who, job_id)``: the JSON of the job ``who`` may see, or a 404 ``ServiceError``."""

    CACHE_SIZE = 2048

    def __init__(self, engine: Engine, fetch: Fetch):
        dialect = engine.dialect
        processors = [_processor(c.type, dialect) for c in _COLUMNS]
        self._convert = [json.loads if j else p for p, j in zip(processors, _IS_JSON, strict=True)]
        self._fetch = fetch
        self._unavailable = dialect.loaded_dbapi.OperationalError  # the driver's own: no SQLAlchemy wrapper here
        self._rendered: dict[tuple[Any, ...], bytes] = {}

    async def body(self, who: Principal, job_id: str) -> bytes:
        raw = None
        if len(job_id) <= MAX_ID and "\x00" not in job_id:  # no job has such an id (PostgreSQL refuses NUL)
            try:
                raw = await self._fetch(job_id)
            except self._unavailable as exc:
                raise database_unavailable() from exc
        if raw is None or (raw[_OWNER] != who.key_id and not who.is_admin):
            raise not_found()
        body = self._rendered.get(raw)
        if body is None:
            body = self.render(raw)
            if len(self._rendered) >= self.CACHE_SIZE:
                self._rendered.clear()  # rows change as jobs run: old ones are simply dropped
            self._rendered[raw] = body
        return body

    def render(self, raw: tuple[Any, ...]) -> bytes:
        # As the ORM's loader does: a new instance whose attribute dict is filled directly (the change-tracking
        # setters would cost more than the query). Only the columns job_out reads are loaded.
        job = _NEW_JOB()
        job.__dict__.update(
            (c.key, v if f is None or v is None else f(v))
            for c, f, v in zip(_COLUMNS, self._convert, raw, strict=True))
        return job_out(job).model_dump_json().encode()


def _sql(engine: Engine) -> str:
    return str(_SELECT.compile(dialect=engine.dialect))


class _SqliteFetch:
    """One sqlite3 connection (from the engine's pool, so its pragmas are applied), kept for these reads and used
    under a lock; autocommit reads in WAL mode see every committed write."""

    def __init__(self, engine: Engine):
        self._engine, self._sql, self._conn, self._lock = engine, _sql(engine), None, threading.Lock()

    async def __call__(self, job_id: str) -> tuple[Any, ...] | None:
        with self._lock:
            if self._conn is None:
                self._conn = self._engine.raw_connection()
            return self._conn.driver_connection.execute(self._sql, (job_id,)).fetchone()


class _PostgresFetch:
    """psycopg's async connection pool, one per event loop (an async connection belongs to the loop that opened
    it: the server runs one loop, FastAPI's TestClient one per client)."""

    POOL_SIZE = 10
    WAIT_S = 5.0  # the longest a read waits for a connection (the database down: then a 503)

    def __init__(self, engine: Engine):
        self._sql = _sql(engine)
        url = engine.url.set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._pools: dict[asyncio.AbstractEventLoop, Any] = {}

    async def _pool(self) -> Any:
        from psycopg_pool import AsyncConnectionPool

        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            # autocommit: a read by primary key needs no transaction (no BEGIN/ROLLBACK round trips); a fixed
            # maximum: under load requests wait for a pooled connection instead of opening one apiece
            pool = AsyncConnectionPool(self._conninfo, min_size=1, max_size=self.POOL_SIZE, open=False,
                                       kwargs={"autocommit": True}, timeout=self.WAIT_S)
            self._pools = {lp: p for lp, p in self._pools.items() if not lp.is_closed()} | {loop: pool}
            await pool.open()
        return pool

    async def __call__(self, job_id: str) -> tuple[Any, ...] | None:
        from psycopg import OperationalError

        pool = await self._pool()
        # No ping per checkout (a round trip per request): a connection the server dropped (a restart) fails its
        # query, leaves the pool, and the read is tried once more on another one.
        for attempt in (1, 2):
            try:
                async with pool.connection() as conn:
                    cur = await conn.execute(self._sql, {"job_id": job_id}, prepare=True)
                    return await cur.fetchone()
            except OperationalError:
                if attempt == 2:
                    raise
        return None


def job_reader(engine: Engine) -> JobReader:
    """The reader for this engine's database."""
    fetches = {"sqlite": _SqliteFetch, "postgresql": _PostgresFetch}
    if engine.dialect.name not in fetches:
        raise ValueError(f"MOPEQ_DATABASE_URL: the service runs on SQLite or PostgreSQL, not {engine.dialect.name}")
    return JobReader(engine, fetches[engine.dialect.name](engine))
