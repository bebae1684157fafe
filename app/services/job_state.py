"""The job state machine: the only writer of ``Job.status``.

Every status change is one conditional UPDATE (``WHERE status IN expected``, plus whatever ownership condition the
caller adds) written in the caller's transaction together with its ``job_events`` row; reaching a terminal state
wipes the encrypted Hub token and stamps ``finished_at``. The API and the worker both call ``transition``; a grep
test (tests/service/test_svc_job_state.py) finds no other writer. Torch-free: the API imports it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.db.models import JOB_STATUSES, TERMINAL, Job, utcnow
from app.services.events import add_event

# (from, to) -> what does it in the code today
TRANSITIONS: dict[tuple[str, str], str] = {
    ("queued", "running"): "a worker claims the job",
    ("queued", "cancelled"): "the user cancels it before it started",
    ("queued", "failed"): "the broker gave up after MOPEQ_TRANSIENT_RETRIES transient errors",
    ("running", "running"): "a worker re-claims it: its own stale claim, or a dead worker's job (a recovery)",
    ("running", "queued"): "released: worker shutdown, a transient error, or the sweep re-queues a dead worker's job",
    ("running", "succeeded"): "the run and its push finished",
    ("running", "failed"): "an error, the job timeout, the watchdog, or too many recoveries",
    ("running", "cancelled"): "the worker saw the cancel flag, or the sweep found its worker dead",
}


class IllegalTransition(ValueError):
    """A code path asked for a (from, to) pair the state machine does not have: a bug, never user input."""


def allowed(src: str, dst: str) -> bool:
    return (src, dst) in TRANSITIONS


def new_job(db: Session, job: Job, message: str = "job queued") -> Job:
    """Insert a new job as ``queued`` with its first status event (the one way a status is born)."""
    job.status = "queued"
    job.progress = 0.0
    db.add(job)
    db.flush()
    add_event(db, job.id, "status", status="queued", progress=0.0, message=message)
    return job


def transition(db: Session, job_id: str, to: str, *, expect: str | Iterable[str], where: Iterable[Any] = (),
               message: str | None = None, event_stage: str | None = None, **values: Any) -> bool:
    """Move the job from one of ``expect`` to ``to`` if it is still there (and ``where`` holds); True when it moved.

    Runs in the caller's transaction: the UPDATE and its status event commit or roll back together. ``values``
    are other columns written with the change (error, worker_id, timings, ...); ``event_stage`` is the stage the
    event names."""
    sources = (expect,) if isinstance(expect, str) else tuple(expect)
    if to not in JOB_STATUSES or not sources:
        raise IllegalTransition(f"unknown status {to!r} or no source status")
    for src in sources:
        if not allowed(src, to):
            raise IllegalTransition(f"job status {src} -> {to} is not a transition of the state machine")
    if "status" in values or "hf_token_enc" in values:
        raise IllegalTransition("status and the token are written by the state machine itself")
    now = utcnow()
    cols: dict[str, Any] = {"updated_at": now, **values, "status": to}
    if to in TERMINAL:
        cols["hf_token_enc"] = None  # the token's life ends with the job's
        cols.setdefault("finished_at", now)
    stmt = (update(Job).where(Job.id == job_id, Job.status.in_(sources), *where).values(**cols)
            .execution_options(synchronize_session=False))
    if db.execute(stmt).rowcount != 1:
        return False
    add_event(db, job_id, "status", status=to, stage=event_stage, progress=values.get("progress"), message=message)
    return True
