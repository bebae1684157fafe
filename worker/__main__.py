"""``python -m worker [extra celery worker args]``: one Celery worker on the GPU queue with the solo pool.

Run one per GPU (``CUDA_VISIBLE_DEVICES=N python -m worker``); the same as
``celery -A worker.celery_app worker --pool solo --concurrency 1 -Q $MOPEQ_QUEUE``."""

from __future__ import annotations

import os
import socket
import sys


def main(argv: list[str] | None = None) -> None:
    from app.core.config import get_settings
    from worker.celery_app import celery_app

    args = ["worker", "--pool=solo", "--concurrency=1", f"--queues={get_settings().QUEUE}", "--without-mingle",
            "--without-gossip", "--without-heartbeat", f"--hostname=mopeq-{os.getpid()}@{socket.gethostname()}",
            f"--loglevel={os.environ.get('MOPEQ_LOG_LEVEL', 'INFO')}"]
    if os.environ.get("MOPEQ_LOG_LEVEL", "INFO").upper() in ("WARNING", "ERROR", "CRITICAL"):
        args.insert(0, "--quiet")  # a global celery option: no start-up banner when only warnings are wanted
    celery_app.worker_main(args + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
