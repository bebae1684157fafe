"""Per-process worker state: identity, database, the job being run, the heartbeat thread and the watchdog."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings, get_settings
from app.core.security import Keyring
from app.db.models import Job, Worker, utcnow
from app.db.session import make_engine, make_sessionmaker
from app.services import job_state

log = logging.getLogger("mopeq.worker")


@dataclass
class Current:
    job_id: str
    started: float  # time.monotonic() when this attempt began
    lost_claim: bool = False


@dataclass
class WorkerContext:
    settings: Settings
    factory: sessionmaker[Session]
    keyring: Keyring
    worker_id: str
    hostname: str
    shutdown: threading.Event = field(default_factory=threading.Event)
    current: Current | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    celery: object | None = None

    # ---- registration and heartbeat -------------------------------------------------------------------------------
    def register(self) -> None:
        with self.factory() as db, db.begin():
            db.merge(Worker(id=self.worker_id, hostname=self.hostname, pid=os.getpid(), queue=self.settings.QUEUE,
                            started_at=utcnow(), heartbeat_at=utcnow(), stopped_at=None, current_job_id=None))

    def beat(self) -> None:
        now = utcnow()
        cur = self.current
        with self.factory() as db, db.begin():
            db.execute(update(Worker).where(Worker.id == self.worker_id).values(
                heartbeat_at=now, current_job_id=cur.job_id if cur else None))
            if cur is not None:
                res = db.execute(update(Job).where(Job.id == cur.job_id, Job.worker_id == self.worker_id,
                                                   Job.status == "running").values(heartbeat_at=now))
                if res.rowcount == 0 and not cur.lost_claim:
                    log.warning("job %s is no longer claimed by this worker; stopping it", cur.job_id)
                    cur.lost_claim = True

    def start_background(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="mopeq-heartbeat", daemon=True)
        self._thread.start()

    def stop_background(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)  # a beat in flight must not land after "stopped"
        try:
            with self.factory() as db, db.begin():
                db.execute(update(Worker).where(Worker.id == self.worker_id).values(
                    stopped_at=utcnow(), current_job_id=None))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not mark worker stopped: %s", type(exc).__name__)

    def _loop(self) -> None:
        from worker.recovery import sweep

        next_sweep = 0.0
        while not self._stop.wait(self.settings.HEARTBEAT_INTERVAL_S):
            try:
                self.beat()
                self._watchdog()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.settings.SWEEP_INTERVAL_S
                    sweep(self)
            except Exception as exc:  # noqa: BLE001 - keep beating through database hiccups
                log.warning("heartbeat/sweep failed: %s: %s", type(exc).__name__, str(exc)[:200])

    def _watchdog(self) -> None:
        """A job that runs past its timeout plus a grace period is stuck in code that does not poll: fail it and
        exit so that the process supervisor starts a fresh worker."""
        cur = self.current
        if cur is None:
            return
        grace = self.settings.WATCHDOG_GRACE_S
        limit = self.settings.JOB_TIMEOUT_S + (grace if grace > 0 else max(60.0, 0.1 * self.settings.JOB_TIMEOUT_S))
        if time.monotonic() - cur.started < limit:
            return
        msg = (f"job timed out: no progress check for {limit:.0f} s past the start (MOPEQ_JOB_TIMEOUT_S="
               f"{self.settings.JOB_TIMEOUT_S}); the worker was restarted")
        with self.factory() as db, db.begin():
            failed = job_state.transition(db, cur.job_id, "failed", expect="running",
                                          where=(Job.worker_id == self.worker_id,), message=msg, error=msg,
                                          error_code="timeout")
        if failed:
            from worker.recovery import remove_job_files

            remove_job_files(self, cur.job_id)  # no partial artifacts or stage files are left behind
        log.error("%s; exiting", msg)
        os._exit(70)


_ctx: WorkerContext | None = None
_lock = threading.Lock()


def get_context() -> WorkerContext:
    global _ctx
    with _lock:
        if _ctx is None:
            settings = get_settings()
            settings.ensure_dirs()
            engine = make_engine(settings.database_url)
            host = socket.gethostname()
            _ctx = WorkerContext(settings=settings, factory=make_sessionmaker(engine),
                                 keyring=Keyring(settings.secret_key()),
                                 worker_id=f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}", hostname=host)
        return _ctx
