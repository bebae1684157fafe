"""Alembic migrations: upgrade, downgrade and upgrade again on SQLite and PostgreSQL; the migrated schema matches
the models exactly; 0002 (watches and webhooks) upgrades a 0001 database with data in it and downgrades back to
exactly the 0001 tables."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from svc_util import PG_ADMIN_URL, _pg_admin

from app.db.migrate import downgrade, upgrade
from app.db.models import Base

TABLES_0001 = {"api_keys", "jobs", "job_events", "expert_allocations", "artifacts", "idempotency_keys", "workers"}
TABLES_0002 = {"watches", "watch_triggers", "job_webhooks", "webhook_messages", "webhook_deliveries"}
TABLES = TABLES_0001 | TABLES_0002


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


def test_0002_keeps_existing_rows_and_downgrades_to_0001(db_url: str) -> None:
    upgrade(db_url, "0001")
    eng = create_engine(db_url)
    try:
        assert not (TABLES_0002 & set(inspect(eng).get_table_names()))
        with eng.begin() as conn:
            conn.execute(text("INSERT INTO api_keys (id, name, key_hash, scope, created_at) "
                              "VALUES ('k1', 'old', 'h', 'user', '2026-01-01 00:00:00')"))
        upgrade(db_url, "0002")
        assert TABLES <= set(inspect(eng).get_table_names())
        with eng.begin() as conn:
            assert conn.execute(text("SELECT name FROM api_keys WHERE id = 'k1'")).scalar_one() == "old"
            conn.execute(text("INSERT INTO watches (id, owner_key_id, repo, template, push_private, created_at) "
                              "VALUES ('w1', 'k1', 'org/m', '{}', true, '2026-01-02 00:00:00')"))
        downgrade(db_url, "0001")
        names = set(inspect(eng).get_table_names())
        assert TABLES_0001 <= names and not (TABLES_0002 & names)
        with eng.connect() as conn:
            assert conn.execute(text("SELECT name FROM api_keys WHERE id = 'k1'")).scalar_one() == "old"
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0001"
    finally:
        eng.dispose()
