"""``python -m app.serve``: the embedded service (``make serve``).

Runs the database migrations, then serves the API with uvicorn on 127.0.0.1:$MOPEQ_PORT and supervises one
Celery worker subprocess on the same settings (restarted if it dies), plus one webhook worker
(``python -m worker.webhooks``: outgoing webhooks on their own queue). SIGINT/SIGTERM stop the API, then ask the
worker for a warm shutdown: a running job stops at its next check and is re-queued, so it resumes from its last
finished stage on the next start.

Options: ``--no-worker`` (API only), ``--workers N`` (N worker processes, e.g. one per GPU with
CUDA_VISIBLE_DEVICES set per process by your supervisor instead)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from app.core.config import get_settings
from app.core.lifeline import PARENT_ENV
from app.core.security import install_log_redaction
from app.services.queues import queue_names

log = logging.getLogger("mopeq.serve")


class WorkerSupervisor:
    def __init__(self, index: int, env: dict[str, str], module: str = "worker"):
        self.index, self.env, self.module = index, env, module
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"worker-supervisor-{index}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Its own session: a Ctrl-C in the terminal reaches the API only; we stop the worker ourselves. If this
        # process dies without stopping it (SIGKILL, a crash), the child ends too: MOPEQ_PARENT_PID makes it call
        # app.core.lifeline.die_with_parent(), which ties it to this thread (it lives as long as the child).
        env = {**self.env, PARENT_ENV: str(os.getpid())}
        return subprocess.Popen([sys.executable, "-m", self.module], env=env, start_new_session=True)

    def _run(self) -> None:
        backoff = 1.0
        while not self.stopping.is_set():
            started = time.monotonic()
            self.proc = self._spawn()
            log.info("%s %d started (pid %d)", self.module, self.index, self.proc.pid)
            rc = self.proc.wait()
            if self.stopping.is_set():
                return
            log.warning("worker %d exited with %s; restarting in %.0f s", self.index, rc, backoff)
            if time.monotonic() - started > 60:
                backoff = 1.0
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, 30.0)

    def stop(self, timeout: float) -> None:
        self.stopping.set()
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)  # warm shutdown: the running job is released and re-queued
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("worker %d did not stop in %.0f s; killing it (its job resumes on the next start)",
                        self.index, timeout)
            p.kill()
            p.wait()


def uvicorn_config(app: Any, host: str, port: int) -> Any:
    """The API's uvicorn settings (also used by bench/bench_api.py's constant app, so both run alike): uvloop and
    httptools when installed (``loop="auto"``/``http="auto"`` pick them), no access log."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--no-worker", action="store_true", help="serve the API only")
    parser.add_argument("--workers", type=int, default=1, help="embedded worker processes (default 1)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)

    logging.basicConfig(level=os.environ.get("MOPEQ_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    install_log_redaction()
    settings = get_settings()
    settings.ensure_dirs()
    settings.secret_key()  # generate the shared secret before the worker starts

    from app.db.migrate import upgrade

    log.info("database: migrating %s", settings.database_url.split("@")[-1])
    upgrade(settings.database_url)

    import uvicorn

    from app.main import create_app

    app = create_app(settings)
    supervisors: list[WorkerSupervisor] = []
    if not args.no_worker:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # With MOPEQ_QUEUES, one worker per memory class at least (this host serves every class it is asked to).
        classes = queue_names(settings) if settings.QUEUES else [settings.QUEUE]
        for i in range(max(1, args.workers, len(classes))):
            sup = WorkerSupervisor(i, {**env, "MOPEQ_QUEUE": classes[i % len(classes)]})
            sup.start()
            supervisors.append(sup)
        hooks = WorkerSupervisor(0, env, module="worker.webhooks")  # outgoing webhooks, on their own queue
        hooks.start()
        supervisors.append(hooks)
    server = uvicorn.Server(uvicorn_config(app, settings.HOST, settings.PORT))
    log.info("MoPEQ API on http://%s:%d (broker %s, artifacts %s)", settings.HOST, settings.PORT,
             "filesystem" if settings.broker_is_filesystem else settings.broker_url.split("@")[-1],
             settings.ARTIFACT_STORE or settings.artifact_dir)
    stop_signals: list[int] = []

    def _remember(signum: int, _frame: object) -> None:
        # uvicorn captures SIGINT/SIGTERM while it runs and re-raises them after its shutdown; with this handler
        # in place the re-raise lands here instead of killing the process before the workers are stopped.
        stop_signals.append(signum)
        server.should_exit = True

    signal.signal(signal.SIGINT, _remember)
    signal.signal(signal.SIGTERM, _remember)
    try:
        server.run()
    finally:
        log.info("stopping %d worker(s)", len(supervisors))
        for sup in supervisors:
            sup.stop(args.shutdown_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
