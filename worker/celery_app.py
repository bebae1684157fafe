"""The worker's Celery application: ``celery -A worker.celery_app worker -Q gpu --pool solo`` (or
``python -m worker``). One worker process per GPU; the solo pool never forks a CUDA context."""

from __future__ import annotations

import logging
import os

from celery import signals

from app.core.celery_conf import make_celery
from app.core.config import get_settings
from app.core.security import install_log_redaction

celery_app = make_celery(get_settings(), main="mopeq-worker")
log = logging.getLogger("mopeq.worker")


@signals.setup_logging.connect
def _setup_logging(loglevel=None, logfile=None, fmt=None, colorize=None, **_kw):
    level = loglevel if isinstance(loglevel, int) else getattr(logging, str(loglevel or "INFO").upper(), 20)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s",
                        filename=logfile or None)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    install_log_redaction()


@signals.worker_ready.connect
def _ready(sender=None, **_kw):
    from worker.context import get_context
    from worker.recovery import sweep

    ctx = get_context()
    ctx.celery = celery_app
    install_log_redaction()
    ctx.register()
    log.info("worker %s ready on queue %s (pid %s)", ctx.worker_id, ctx.settings.QUEUE, os.getpid())
    try:
        sweep(ctx)
    except Exception as exc:  # noqa: BLE001
        log.warning("startup recovery sweep failed: %s", type(exc).__name__)
    ctx.start_background()


@signals.worker_shutting_down.connect
def _shutting_down(**_kw):
    from worker.context import get_context

    get_context().shutdown.set()


@signals.worker_shutdown.connect
def _shutdown(**_kw):
    from worker.context import get_context

    get_context().stop_background()


import worker.tasks  # noqa: F401  (registers the task)
