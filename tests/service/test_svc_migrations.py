"""Alembic migrations: upgrade, downgrade and upgrade again on SQLite and PostgreSQL; the migrated schema matches
the models exactly."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from svc_util import PG_ADMIN_URL, _pg_admin

from app.db.migrate import downgrade, upgrade
from app.db.models import Base

TABLES = {"api_keys", "jobs", "job_events", "expert_allocations", "artifacts", "idempotency_keys", "workers"}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    name = f"mopeq_mig_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    upgrade(db_url)
    eng = create_engine(db_url)
    try:
        assert TABLES <= set(inspect(eng).get_table_names())
        with eng.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diffs == [], f"models and migrations disagree: {diffs}"
        downgrade(db_url, "base")
        assert not (TABLES & set(inspect(eng).get_table_names()))
        upgrade(db_url)
        assert TABLES <= set(inspect(eng).get_table_names())
    finally:
        eng.dispose()
