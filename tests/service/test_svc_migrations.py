"""Alembic migrations: upgrade, downgrade and upgrade again on SQLite and PostgreSQL; the migrated schema matches
the models exactly; 0002 (watches and webhooks) upgrades a 0001 database with data in it and downgrades back to
exactly the 0001 tables; 0006 turns the knob columns of rows written by 0005's code into settings
documents and back."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from svc_util import PG_ADMIN_URL, _pg_admin, seed_key

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
            seed_key(conn)
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


# ---- 0006: the knob columns become one settings document, and back -------------------------------------------------
OLD_COLUMNS = ("budget_avg_bits, budget_gb, bits, sensitivity, allocator, scope, granularity, quantizer, group_size, "
               "symmetric, probes, calib_file, calib_samples, seq_len, eval_file, eval_samples, format, "
               "trust_remote_code, options")
# rows as 0005's code wrote them (app/services/jobs.py before issue 12)
OLD_ROWS = {
    "j-full": (2.5, None, [2, 3, 4], "hutchinson", "knapsack", "model", "expert", "gptq", 64, True, 8,
               "/srv/models/calib.txt", 16, 128, "/srv/models/eval.jsonl", 8, "mopeq", False,
               {"act_order": True, "low_memory": False, "seed": 7, "cost": "weight", "sequential": False,
                "eval_suites": ["lm-eval:arc_easy"], "eval_suite_limit": 5,
                "calibration_estimate": {"calib_tokens": 2048}}),
    "j-bare": (None, 1.5, [2, 4], "frequency", "tiers", "layer", "layer", "rtn", 32, False, 1, None, 4, 32, None,
               64, "gguf", True, {}),
}
DOCS = {
    "j-full": {"version": 1, "budget": {"avg_bits": 2.5, "gb": None}, "bits": [2, 3, 4], "sensitivity": "hutchinson",
               "allocator": "knapsack", "scope": "model", "granularity": "expert", "quantizer": "gptq",
               "cost": "weight", "sequential": False, "group_size": 64, "symmetric": True, "act_order": True,
               "probes": 8, "probe_tol": 0.02, "calib_file": "/srv/models/calib.txt", "calib_samples": 16,
               "seq_len": 128, "calib_all_experts": False, "eval_file": "/srv/models/eval.jsonl",
               "eval_samples": 8, "eval_suites": ["lm-eval:arc_easy"], "eval_suite_limit": 5, "low_memory": False,
               "format": "mopeq", "trust_remote_code": False, "seed": 7},
    "j-bare": {"version": 1, "budget": {"avg_bits": None, "gb": 1.5}, "bits": [2, 4], "sensitivity": "frequency",
               "allocator": "tiers", "scope": "layer", "granularity": "layer", "quantizer": "rtn", "cost": "output",
               "sequential": True, "group_size": 32, "symmetric": False, "act_order": False, "probes": 1,
               "probe_tol": 0.02, "calib_file": None, "calib_samples": 4, "seq_len": 32, "calib_all_experts": False,
               "eval_file": None, "eval_samples": 64, "eval_suites": [], "eval_suite_limit": None,
               "low_memory": False, "format": "gguf", "trust_remote_code": True, "seed": 0},
}


QUOTED = ", ".join(f'"{c.strip()}"' for c in OLD_COLUMNS.split(","))  # "symmetric" is reserved in PostgreSQL


def _json(v):
    return json.loads(v) if isinstance(v, str) else v


def _docs(eng) -> dict[str, dict]:
    with eng.connect() as conn:
        return {i: _json(s) for i, s in conn.execute(text("SELECT id, settings FROM jobs ORDER BY id"))}


def test_0006_converts_settings_both_ways(db_url: str) -> None:
    from app.services import job_settings

    upgrade(db_url, "0005")
    eng = create_engine(db_url)
    try:
        with eng.begin() as conn:
            seed_key(conn)
            for job_id, row in OLD_ROWS.items():
                values = dict(zip([c.strip() for c in OLD_COLUMNS.split(",")], row, strict=True))
                values.update(bits=json.dumps(values["bits"]), options=json.dumps(values["options"]))
                names = ", ".join(f":{k}" for k in values)
                conn.execute(text(
                    f"INSERT INTO jobs (id, owner_key_id, status, progress, model, model_source, {QUOTED}, "
                    "push_private, push_requested, cancel_requested, attempts, recoveries, created_at, updated_at, "
                    f"timings) VALUES (:id, 'k1', 'failed', 0.5, 'org/m', 'hub', {names}, false, false, false, 1, 0, "
                    "'2026-01-01 00:00:00', '2026-01-01 00:00:00', '{}')"), {"id": job_id, **values})
        upgrade(db_url)
        cols = {c["name"] for c in inspect(eng).get_columns("jobs")}
        assert {"settings", "retry_of"} <= cols and not cols & {"group_size", "options", "bits", "budget_gb"}
        assert _docs(eng) == DOCS
        # what the worker makes of them
        cfg = job_settings.to_config(DOCS["j-full"], model="org/m", revision="abc")
        assert (cfg.bits, cfg.group_size, cfg.cost, cfg.eval_suites, cfg.budget.avg_bits) == \
            ((2, 3, 4), 64, "weight", ("lm-eval:arc_easy",), 2.5)

        downgrade(db_url, "0005")
        with eng.connect() as conn:
            back = {r[0]: r[1:] for r in conn.execute(text(f"SELECT id, {QUOTED} FROM jobs ORDER BY id"))}
        for job_id, row in OLD_ROWS.items():
            got = list(back[job_id])
            got[2], got[-1] = _json(got[2]), _json(got[-1])
            got[9], got[17] = bool(got[9]), bool(got[17])
            old_options = {k: v for k, v in row[-1].items() if k != "calibration_estimate"}
            assert got[:-1] == list(row[:-1]), job_id
            # the options bag comes back complete (the engine's defaults where the old row had none);
            # calibration_estimate (a submit-time note nothing read) does not
            assert got[-1] == {**{k: DOCS[job_id][k] for k in got[-1]}, **old_options}
            assert set(got[-1]) == {"cost", "sequential", "act_order", "probe_tol", "calib_all_experts",
                                    "eval_suites", "eval_suite_limit", "low_memory", "seed"}
        upgrade(db_url)
        assert _docs(eng) == DOCS
    finally:
        eng.dispose()


def test_0006b_adds_the_quota_column_to_existing_keys_and_downgrades(db_url: str) -> None:
    upgrade(db_url, "0006")
    eng = create_engine(db_url)
    try:
        with eng.begin() as conn:
            seed_key(conn)
        upgrade(db_url, "0006b")
        with eng.begin() as conn:
            row = conn.execute(text("SELECT name, storage_quota_bytes FROM api_keys WHERE id = 'k1'")).one()
            assert tuple(row) == ("old", None)  # existing keys: no quota
            conn.execute(text("UPDATE api_keys SET storage_quota_bytes = 5000000000000 WHERE id = 'k1'"))  # > 2**32
            assert conn.execute(text("SELECT storage_quota_bytes FROM api_keys")).scalar_one() == 5_000_000_000_000
        downgrade(db_url, "0006")
        assert "storage_quota_bytes" not in {c["name"] for c in inspect(eng).get_columns("api_keys")}
        with eng.connect() as conn:
            assert conn.execute(text("SELECT name FROM api_keys WHERE id = 'k1'")).scalar_one() == "old"
    finally:
        eng.dispose()
