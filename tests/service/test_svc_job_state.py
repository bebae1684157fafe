"""The job state machine (app/services/job_state.py): every (from, to) pair of statuses against a real SQLite and a
real PostgreSQL database (allowed ones move the row and write their event in one transaction, terminal ones wipe
the token; refused ones change nothing), and a scan of app/ and worker/ that finds no other writer of Job.status."""

from __future__ import annotations

import ast
import itertools
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select
from svc_util import PG_ADMIN_URL, REPO, _pg_admin, planted_settings

from app.db.migrate import upgrade
from app.db.models import JOB_STATUSES, ApiKey, Job, JobEvent
from app.db.session import make_engine, make_sessionmaker
from app.services import job_state

# Spelled out here, independently of job_state.TRANSITIONS: what the service does today (DESIGN, issue 12).
EXPECTED = {("queued", "running"), ("queued", "cancelled"), ("queued", "failed"), ("running", "running"),
            ("running", "queued"), ("running", "succeeded"), ("running", "failed"), ("running", "cancelled")}
TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def factory(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    if request.param == "sqlite":
        url, name = f"sqlite:///{tmp_path_factory.mktemp('state') / 's.db'}", None
    else:
        name = f"mopeq_state_{uuid.uuid4().hex[:12]}"
        with _pg_admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    upgrade(url)
    engine = make_engine(url)
    f = make_sessionmaker(engine)
    with f() as db, db.begin():
        db.add(ApiKey(id="k", name="k", key_hash="h", scope="user"))
    yield f
    engine.dispose()
    if name:
        with _pg_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _job(factory, status: str) -> str:
    with factory() as db, db.begin():
        job = Job(owner_key_id="k", model="m", settings=planted_settings(), timings={}, status=status,
                  hf_token_enc="gAAAA-secret")
        db.add(job)
        db.flush()
        return job.id


def _row(factory, job_id: str) -> tuple[Job, list[JobEvent]]:
    with factory() as db:
        job = db.get(Job, job_id)
        events = list(db.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
        db.expunge_all()
        return job, events


def test_the_table_is_what_the_service_does() -> None:
    assert set(job_state.TRANSITIONS) == EXPECTED


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(JOB_STATUSES, repeat=2)))
def test_every_pair(factory, src: str, dst: str) -> None:
    job_id = _job(factory, src)
    if (src, dst) in EXPECTED:
        with factory() as db, db.begin():
            assert job_state.transition(db, job_id, dst, expect=src, message=f"{src} to {dst}", error_code="x")
        job, events = _row(factory, job_id)
        assert job.status == dst and job.error_code == "x"
        assert [(e.kind, e.status, e.message) for e in events] == [("status", dst, f"{src} to {dst}")]
        assert (job.hf_token_enc is None) == (dst in TERMINAL)
        assert (job.finished_at is not None) == (dst in TERMINAL)
    else:
        with factory() as db, db.begin(), pytest.raises(job_state.IllegalTransition):
            job_state.transition(db, job_id, dst, expect=src)
        job, events = _row(factory, job_id)
        assert (job.status, job.hf_token_enc, job.finished_at, events) == (src, "gAAAA-secret", None, [])


def test_a_job_no_longer_in_the_expected_state_is_left_alone(factory) -> None:
    job_id = _job(factory, "cancelled")  # e.g. the user cancelled it while the worker was finishing it
    with factory() as db, db.begin():
        assert not job_state.transition(db, job_id, "succeeded", expect="running")
    job, events = _row(factory, job_id)
    assert (job.status, events) == ("cancelled", [])


def test_an_extra_condition_is_part_of_the_update(factory) -> None:
    job_id = _job(factory, "running")
    with factory() as db, db.begin():
        assert not job_state.transition(db, job_id, "failed", expect="running", where=(Job.worker_id == "other",))
    assert _row(factory, job_id)[0].status == "running"


def test_status_and_event_roll_back_together(factory) -> None:
    job_id = _job(factory, "queued")
    with pytest.raises(RuntimeError), factory() as db, db.begin():
        assert job_state.transition(db, job_id, "cancelled", expect="queued", message="then the caller fails")
        raise RuntimeError("boom")
    job, events = _row(factory, job_id)
    assert (job.status, job.hf_token_enc, events) == ("queued", "gAAAA-secret", [])


def test_new_job_is_queued_with_its_event(factory) -> None:
    with factory() as db, db.begin():
        job = job_state.new_job(db, Job(owner_key_id="k", model="m", settings=planted_settings(), timings={}))
        job_id = job.id
    job, events = _row(factory, job_id)
    assert job.status == "queued" and [(e.kind, e.status) for e in events] == [("status", "queued")]
    with factory() as db:
        assert db.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id)) == 1


# ---- no other writer -------------------------------------------------------------------------------------------------
OWNER = REPO / "app" / "services" / "job_state.py"


def status_writers(source: str) -> list[int]:
    """Lines that write Job.status: ``status=`` in ``update(Job)...values(...)``, ``Job(...)`` or a ``*_update``
    helper, a ``"status"``
    key in a dict literal that names a job status, an assignment to ``job.status``, raw SQL that sets it."""
    hits: list[int] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func_src = ast.unparse(node.func)
            kws = {k.arg for k in node.keywords}
            if "status" in kws and (func_src == "Job" or func_src.endswith("_update")
                                    or (func_src.endswith(".values") and "Job" in func_src)):
                hits.append(node.lineno)
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if isinstance(k, ast.Constant) and k.value == "status" and isinstance(v, ast.Constant) \
                        and v.value in JOB_STATUSES:
                    hits.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr == "status" and "job" in ast.unparse(t.value).lower():
                    hits.append(node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "jobs set" in \
                " ".join(node.value.lower().split()) and "status" in node.value.lower():
            hits.append(node.lineno)
    return sorted(hits)


def test_the_scanner_finds_writers() -> None:
    bad = """
update(Job).where(Job.id == i).values(status="failed")
db.execute(update(Job).values(stage="x", status=to))
Job(owner_key_id="k", status="succeeded")
self._update({"kind": "status"}, status=status)
taken = {"status": "running", "worker_id": w}
job.status = "cancelled"
text("UPDATE jobs SET status = 'failed'")
"""
    assert status_writers(bad) == [2, 3, 4, 5, 6, 7, 8]
    fine = """
update(Worker).values(stopped_at=now)
HubHookOut(status="ignored")
out.status = "queued"
select(Job).where(Job.status == "running")
"""
    assert status_writers(fine) == []


def test_nothing_but_the_state_machine_writes_job_status() -> None:
    found = {}
    for path in sorted([*(REPO / "app").rglob("*.py"), *(REPO / "worker").rglob("*.py")]):
        if path == OWNER:
            continue
        lines = status_writers(path.read_text())
        if lines:
            found[str(path.relative_to(REPO))] = lines
    assert found == {}, f"Job.status written outside {OWNER.relative_to(REPO)}: {found}"
    assert status_writers(OWNER.read_text()), "the owner itself must be seen writing it"

