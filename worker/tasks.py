"""Celery task of the GPU queue. The task is idempotent: it does nothing unless its database claim succeeds."""

from __future__ import annotations

import logging

from celery import shared_task
from celery.exceptions import Reject

from app.core.celery_conf import TASK_NAME
from app.core.config import get_settings
from app.services import job_state
from worker.context import get_context
from worker.runner import TransientError, run_job

log = logging.getLogger("mopeq.worker")


@shared_task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True,
             max_retries=get_settings().TRANSIENT_RETRIES)
def run_job_task(self, job_id: str) -> str:
    ctx = get_context()
    if ctx.shutdown.is_set():
        # Received while shutting down (e.g. the job this worker just released): hand it back to the broker.
        raise Reject("worker shutting down", requeue=True)
    try:
        outcome = run_job(ctx, job_id)
    except TransientError as exc:
        if self.request.retries >= self.max_retries:
            msg = f"gave up after {self.max_retries} retries of a transient error: {exc}"
            with ctx.factory() as db, db.begin():
                job_state.transition(db, job_id, "failed", expect="queued", message=msg, error=msg,
                                     error_code="transient")
            return "failed"
        countdown = min(60, 2 ** self.request.retries)
        log.warning("job %s: %s; retrying in %s s", job_id, exc, countdown)
        raise self.retry(countdown=countdown) from None
    log.info("job %s: %s", job_id, outcome)
    return outcome
