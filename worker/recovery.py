"""Claims and orphan recovery.

A job is claimed with one conditional UPDATE (queued -> running, or running with a stale heartbeat), so two
workers never run the same job even when the broker delivers its message twice. A worker that starts, and every
living worker every MOPEQ_SWEEP_INTERVAL_S, re-queues the jobs of dead workers (they resume from their last
finished stage) or fails them after MOPEQ_MAX_RECOVERIES resumes; no job stays ``running`` forever."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
from typing import Any, Protocol

from sqlalchemy import delete, false, func, or_, select, update

from app.core.celery_conf import enqueue
from app.db.models import Artifact, Job, Worker, utcnow
from app.services import job_state
from app.services.storage import get_store


class WorkerContext(Protocol):
    """What recovery needs of ``worker.context.WorkerContext`` (named here, not imported: the context runs the
    periodic sweep, so importing it back would close an import circle)."""

    settings: Any
    factory: Any
    worker_id: str
    hostname: str
    celery: Any

log = logging.getLogger("mopeq.worker")


def claim(ctx: WorkerContext, job_id: str) -> bool:
    """Atomically take the job for this worker. True when this worker now owns it.

    A queued job is taken as is; a running job only when its worker's heartbeat is stale (a redelivered message
    of a dead worker), which counts as a recovery."""
    now = utcnow()
    stale = now - dt.timedelta(seconds=ctx.settings.HEARTBEAT_STALE_S)
    taken = {"worker_id": ctx.worker_id, "heartbeat_at": now, "attempts": Job.attempts + 1,
             "started_at": func.coalesce(Job.started_at, now)}
    with ctx.factory() as db, db.begin():
        row = db.execute(select(Job.attempts, Job.stage).where(Job.id == job_id)).first()
        if row is None:
            return False
        attempts, stage = row
        message = (f"resumed by worker {ctx.worker_id} (attempt {attempts + 1}); finished stages are skipped"
                   if attempts else f"started on worker {ctx.worker_id}")

        def to_running(expect: str, *where: Any, **values: Any) -> bool:
            return job_state.transition(db, job_id, "running", expect=expect, where=where, message=message,
                                        event_stage=stage, **taken, **values)

        # Our own claim, left 'running' when releasing it failed (e.g. the database was down when a transient error
        # hit), is resumed (not a recovery): claim() is only called between jobs, so this worker is not running it.
        # A dead worker's job (stale heartbeat: a redelivered message) counts as a recovery.
        return (to_running("queued")
                or to_running("running", Job.worker_id == ctx.worker_id)
                or to_running("running", Job.worker_id != ctx.worker_id, Job.recoveries < ctx.settings.MAX_RECOVERIES,
                              or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale),
                              recoveries=Job.recoveries + 1))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_worker_ids(ctx: WorkerContext) -> set[str]:
    """Workers known dead: heartbeat older than the stale limit, or on this host with a vanished pid and at least
    two missed heartbeats (so a kill -9 is noticed within seconds, not minutes)."""
    now = utcnow()
    stale = now - dt.timedelta(seconds=ctx.settings.HEARTBEAT_STALE_S)
    missed = now - dt.timedelta(seconds=2 * ctx.settings.HEARTBEAT_INTERVAL_S)
    dead: set[str] = set()
    with ctx.factory() as db:
        for w in db.scalars(select(Worker).where(Worker.id != ctx.worker_id)):
            if w.stopped_at is not None or w.heartbeat_at < stale or w.hostname == ctx.hostname and w.heartbeat_at < missed and not _pid_alive(w.pid):
                dead.add(w.id)
    return dead


def remove_job_files(ctx: WorkerContext, job_id: str, keep_stages: bool = False) -> None:
    """The job's files in this worker's work dir and everything stored for it, after its file artifact rows (a job
    that failed after recording them, e.g. in its push, lists no file that is gone). Hub pushes stay listed.
    ``keep_stages``: a failed or cancelled job's stage files stay (MOPEQ_RETRY_STATE_HOURS) for a retry to reuse."""
    work = ctx.settings.work_dir / job_id
    if keep_stages and ctx.settings.RETRY_STATE_HOURS > 0 and (work / "state").is_dir():
        for p in work.iterdir():
            if p.name != "state":
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    try:
        with ctx.factory() as db, db.begin():
            db.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "file"))
    except Exception as exc:  # noqa: BLE001 - the database is down: keep the files the rows point to
        log.warning("job %s: could not remove its artifact rows (%s); its files stay", job_id, type(exc).__name__)
        return
    try:
        get_store(ctx.settings).delete_job(job_id)
    except Exception as exc:  # noqa: BLE001 - invisible leftovers; they go with the job (DELETE /v1/jobs/{id})
        log.warning("job %s: could not remove its stored files (%s)", job_id, type(exc).__name__)


def sweep(ctx: WorkerContext) -> dict[str, int]:
    """Re-queue or fail orphaned jobs; publish jobs whose first publish failed. Returns counts."""
    s = ctx.settings
    now = utcnow()
    stale = now - dt.timedelta(seconds=s.HEARTBEAT_STALE_S)
    dead = dead_worker_ids(ctx)
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "published": 0}
    _forget_lost_publishes(ctx)
    try:
        from app.services.jobs import expire_finished

        counts["expired"] = expire_finished(ctx.factory, s, now)
    except Exception as exc:  # noqa: BLE001 - retention is retried by the next sweep
        log.warning("retention: could not delete expired jobs (%s)", type(exc).__name__)
    cur = getattr(ctx, "current", None)
    with ctx.factory() as db:
        # Another worker's job with a stale heartbeat or a dead worker, or one of our own that we are not running
        # any more (its claim could not be released) and whose heartbeat went stale.
        orphans = list(db.scalars(select(Job).where(
            Job.status == "running",
            or_(Job.worker_id != ctx.worker_id, Job.id != (cur.job_id if cur is not None else "")),
            or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale,
                Job.worker_id.in_(dead) if dead else false()))))
        unpublished = list(db.scalars(select(Job.id).where(
            Job.status == "queued", Job.enqueued_at.is_(None), Job.created_at < now - dt.timedelta(seconds=10))))
    for job in orphans:
        mine = (Job.worker_id == job.worker_id,
                Job.heartbeat_at == job.heartbeat_at if job.heartbeat_at else Job.heartbeat_at.is_(None))
        who = job.worker_id or "unknown"
        with ctx.factory() as db, db.begin():
            if job.cancel_requested:
                if job_state.transition(db, job.id, "cancelled", expect="running", where=mine,
                                        message=f"worker {who} lost; job cancelled", error_code="cancelled",
                                        error="cancelled (its worker was lost)", finished_at=now):
                    counts["cancelled"] += 1
                    remove_job_files(ctx, job.id, keep_stages=True)
                continue
            if job.recoveries >= s.MAX_RECOVERIES:
                msg = (f"its worker was lost {job.recoveries + 1} times (last: {who}); giving up after "
                       f"MOPEQ_MAX_RECOVERIES={s.MAX_RECOVERIES} resumes")
                if job_state.transition(db, job.id, "failed", expect="running", where=mine, message=msg, error=msg,
                                        error_code="worker_lost", finished_at=now):
                    counts["failed"] += 1
                    remove_job_files(ctx, job.id, keep_stages=True)
                continue
            requeued = job_state.transition(
                db, job.id, "queued", expect="running", where=mine, event_stage=job.stage,
                message=f"worker {who} lost; job re-queued, it resumes from its last finished stage",
                worker_id=None, heartbeat_at=None, recoveries=Job.recoveries + 1, enqueued_at=None)
        if requeued:
            counts["requeued"] += 1
            _publish(ctx, job.id)
    for job_id in unpublished:
        if _publish(ctx, job_id):
            counts["published"] += 1
    counts["pruned"] = prune_work_dirs(ctx, now)
    if any(counts.values()):
        log.info("recovery sweep: %s", counts)
    return counts


def prune_work_dirs(ctx: WorkerContext, now: dt.datetime) -> int:
    """Remove the work dirs of jobs that are gone (deleted, expired), and the stage files kept for a retry once the
    job finished more than MOPEQ_RETRY_STATE_HOURS ago. Returns how many went."""
    root = ctx.settings.work_dir
    names = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if not names:
        return 0
    cutoff = now - dt.timedelta(hours=ctx.settings.RETRY_STATE_HOURS)
    with ctx.factory() as db:
        rows = dict(db.execute(select(Job.id, Job.finished_at).where(Job.id.in_(names))).all())
    gone = [n for n in names if n not in rows or (rows[n] is not None and rows[n] < cutoff)]
    for name in gone:
        shutil.rmtree(root / name, ignore_errors=True)
    return len(gone)


def _forget_lost_publishes(ctx: WorkerContext) -> None:
    """A Redis broker that restarted without persistence lost every message it held: queued jobs published before
    it started are marked unpublished, so that the sweep publishes them again (a duplicate message is harmless:
    only one claim succeeds)."""
    s = ctx.settings
    if not s.broker_url.startswith(("redis://", "rediss://", "unix://")):
        return
    try:
        import redis

        client = redis.Redis.from_url(s.broker_url, socket_connect_timeout=2, socket_timeout=2)
        try:
            uptime = int(client.info("server")["uptime_in_seconds"])
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - the broker is down: nothing to compare yet
        log.debug("broker uptime unknown: %s", type(exc).__name__)
        return
    if uptime > 24 * 3600:
        return
    # uptime is whole seconds: err towards 'later' (a job published just after the restart may go out twice)
    started = utcnow() - dt.timedelta(seconds=uptime - 2)
    with ctx.factory() as db, db.begin():
        res = db.execute(update(Job).where(Job.status == "queued", Job.enqueued_at.is_not(None),
                                           Job.enqueued_at < started).values(enqueued_at=None)
                         .execution_options(synchronize_session=False))
    if res.rowcount:
        log.warning("the broker restarted %d s ago; %d queued job(s) published before that will be published "
                    "again", uptime, res.rowcount)


def _publish(ctx: WorkerContext, job_id: str) -> bool:
    try:
        with ctx.factory() as db:
            queue = db.scalar(select(Job.queue).where(Job.id == job_id))
        enqueue(ctx.celery, ctx.settings, job_id, queue)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - retried by the next sweep (enqueued_at stays NULL)
        log.warning("could not publish job %s: %s", job_id, type(exc).__name__)
        return False
    with ctx.factory() as db, db.begin():
        db.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(enqueued_at=utcnow()))
    return True
