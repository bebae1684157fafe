"""Celery settings shared by the API (which only publishes) and the workers."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

from app.core.config import Settings
from app.core.lifeline import PARENT_ENV, die_with_parent

TASK_NAME = "mopeq.run_job"


def celery_config(settings: Settings) -> dict[str, Any]:
    if settings.broker_is_filesystem:
        q = str(settings.broker_dir / "queue")
        transport: dict[str, Any] = {
            "data_folder_in": q, "data_folder_out": q,
            "control_folder": str(settings.broker_dir / "control"),
            "processed_folder": str(settings.broker_dir / "processed"),
            "store_processed": False, "polling_interval": 0.5,
        }
    else:
        # Longer than the longest job: an unacked message is redelivered only after this long (the database
        # claim makes a redelivery harmless; orphaned jobs are resumed sooner by the worker's sweep).
        transport = {"visibility_timeout": int(settings.JOB_TIMEOUT_S * 2 + 3600)}
        if settings.REDIS_KEY_PREFIX:
            transport["global_keyprefix"] = settings.REDIS_KEY_PREFIX
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.QUEUE,
        "task_routes": {TASK_NAME: {"queue": settings.QUEUE}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_pool": "solo",  # no fork: a CUDA context never crosses a fork; one worker process per GPU
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_enable_remote_control": not settings.broker_is_filesystem,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def make_celery(settings: Settings, main: str = "mopeq") -> Celery:
    settings.ensure_dirs()
    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def enqueue(celery: Celery, settings: Settings, job_id: str, queue: str | None = None) -> None:
    """Publish the job to ``queue`` (the one it was routed to at submit, ``jobs.queue``), else MOPEQ_QUEUE."""
    celery.send_task(TASK_NAME, args=[job_id], queue=queue or settings.QUEUE, retry=True,
                     retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 1.0})


@signals.worker_process_init.connect
def _pool_process_follows_its_worker(**_kw: Any) -> None:
    # A pool process a worker forks (a prefork pool passed on the command line) ends with that worker, as the worker
    # ends with `make serve` (app.core.lifeline); the default solo and thread pools fork nothing.
    if os.environ.get(PARENT_ENV):
        die_with_parent(os.getppid())
