"""The webhook worker: ``python -m worker.webhooks`` (``make serve`` / ``python -m app.serve`` starts one).

A Celery worker on its own queue (``MOPEQ_WEBHOOK_QUEUE``, default ``webhooks``) with a thread pool, so that
deliveries never wait for, or hold up, the GPU workers. A background thread sweeps the database every
``MOPEQ_WEBHOOK_SWEEP_INTERVAL_S``: it creates the message of each job that reached a final status and has a
webhook (an outbox: it does not matter which process finished the job), and publishes messages that have no task
in flight. The task makes one attempt (``app.services.webhooks.deliver``) and, on failure, retries itself with
Celery's ``retry`` after an exponential backoff. Run as many as you like: every attempt claims its message first.

Same as ``celery -A worker.webhooks worker -Q webhooks --pool threads --concurrency 4``."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass

from celery import signals
from sqlalchemy.orm import Session, sessionmaker

from app.core.celery_conf import make_celery
from app.core.config import Settings, get_settings
from app.core.lifeline import die_with_parent
from app.core.security import Keyring, install_log_redaction
from app.db.session import make_engine, make_sessionmaker
from app.services import webhooks as svc

DELIVER_TASK = "mopeq.deliver_webhook"
log = logging.getLogger("mopeq.webhooks")

_settings = get_settings()
webhook_app = make_celery(_settings, main="mopeq-webhooks")
webhook_app.conf.update(
    task_default_queue=_settings.WEBHOOK_QUEUE,
    task_routes={DELIVER_TASK: {"queue": _settings.WEBHOOK_QUEUE}},
    worker_pool="threads",
    worker_concurrency=max(1, _settings.WEBHOOK_CONCURRENCY),
    worker_prefetch_multiplier=4,
)


@dataclass
class _Ctx:
    settings: Settings
    factory: sessionmaker[Session]
    keyring: Keyring
    stop: threading.Event
    thread: threading.Thread | None = None


_ctx: _Ctx | None = None
_lock = threading.Lock()


def context() -> _Ctx:
    global _ctx
    with _lock:
        if _ctx is None:
            s = get_settings()
            s.ensure_dirs()
            _ctx = _Ctx(s, make_sessionmaker(make_engine(s.database_url)), Keyring(s.secret_key()), threading.Event())
        return _ctx


def publish(message_id: str) -> bool:
    ctx = context()
    try:
        webhook_app.send_task(DELIVER_TASK, args=[message_id], queue=ctx.settings.WEBHOOK_QUEUE, retry=True,
                              retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                                            "interval_max": 1.0})
    except Exception as exc:  # noqa: BLE001 - published again by the next sweep (enqueued_at stays as it was)
        log.warning("could not publish webhook %s: %s", message_id, type(exc).__name__)
        return False
    svc.mark_enqueued(ctx.factory, message_id)
    return True


def sweep_once() -> dict[str, int]:
    """Announce finished jobs, then publish every message without a task in flight."""
    ctx = context()
    announced = svc.announce_finished(ctx.factory)
    published = sum(publish(m) for m in svc.messages_to_publish(ctx.factory))
    if announced or published:
        log.info("webhook sweep: %d new message(s), %d published", len(announced), published)
    return {"announced": len(announced), "published": published}


def _loop() -> None:
    ctx = context()
    while True:
        try:
            sweep_once()
        except Exception as exc:  # noqa: BLE001 - keep sweeping through database hiccups
            log.warning("webhook sweep failed: %s: %s", type(exc).__name__, str(exc)[:200])
        if ctx.stop.wait(ctx.settings.WEBHOOK_SWEEP_INTERVAL_S):
            return


@webhook_app.task(name=DELIVER_TASK, bind=True, acks_late=True, max_retries=None)
def deliver_task(self, message_id: str) -> str:
    ctx = context()
    out = svc.deliver(ctx.factory, ctx.keyring, ctx.settings, message_id)
    if out.status == "pending":
        raise self.retry(countdown=out.retry_in)
    return out.status


@signals.setup_logging.connect
def _setup_logging(loglevel=None, logfile=None, **_kw):
    level = loglevel if isinstance(loglevel, int) else getattr(logging, str(loglevel or "INFO").upper(), 20)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s",
                        filename=logfile or None)
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    install_log_redaction()


@signals.worker_ready.connect
def _ready(sender=None, **_kw):
    if getattr(sender, "app", webhook_app) is not webhook_app:
        return
    ctx = context()
    install_log_redaction()
    if ctx.thread is None:
        ctx.thread = threading.Thread(target=_loop, name="mopeq-webhook-sweep", daemon=True)
        ctx.thread.start()
    log.info("webhook deliveries ready (queue %s, pid %s)", ctx.settings.WEBHOOK_QUEUE, os.getpid())


@signals.worker_shutting_down.connect
def _shutting_down(**_kw):
    if _ctx is not None:
        _ctx.stop.set()


def main(argv: list[str] | None = None) -> None:
    die_with_parent()  # started by `make serve`: end with it, however it ends (app.core.lifeline)
    s = get_settings()
    args = ["worker", "--pool=threads", f"--concurrency={max(1, s.WEBHOOK_CONCURRENCY)}",
            f"--queues={s.WEBHOOK_QUEUE}", "--without-mingle", "--without-gossip", "--without-heartbeat",
            f"--hostname=mopeq-webhooks-{os.getpid()}@{socket.gethostname()}",
            f"--loglevel={os.environ.get('MOPEQ_LOG_LEVEL', 'INFO')}"]
    if os.environ.get("MOPEQ_LOG_LEVEL", "INFO").upper() in ("WARNING", "ERROR", "CRITICAL"):
        args.insert(0, "--quiet")  # a global celery option: no start-up banner when only warnings are wanted
    webhook_app.worker_main(args + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
