"""``python -m worker [--queue NAME|auto] [extra celery worker args]``: one Celery worker with the solo pool on one
queue (``--queue``, else MOPEQ_QUEUE). With MOPEQ_QUEUES set (``cpu:16,gpu-24g:24,gpu-80g:80``), the queue names a
GPU memory class; ``--queue auto`` takes the largest class the visible GPU holds (the smallest without a GPU).

Run one per GPU (``CUDA_VISIBLE_DEVICES=N python -m worker --queue gpu-80g``); the same as
``celery -A worker.celery_app worker --pool solo --concurrency 1 -Q $MOPEQ_QUEUE``."""

from __future__ import annotations

import os
import socket
import sys

from app.core.lifeline import die_with_parent


def _take_queue(argv: list[str]) -> tuple[str | None, list[str]]:
    rest, queue, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--queue" and i + 1 < len(argv):
            queue, i = argv[i + 1], i + 2
            continue
        if a.startswith("--queue="):
            queue = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return queue, rest


def _device_memory() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001 - no usable GPU: the smallest class
        return None
    return None


def resolve_queue(queue: str | None) -> str:
    """The queue this worker serves; sets MOPEQ_QUEUE for the rest of the process (settings are read after)."""
    from app.core.config import get_settings
    from app.services.queues import configured, for_device

    if queue:
        os.environ["MOPEQ_QUEUE"] = queue
        get_settings.cache_clear()
    settings = get_settings()
    name = settings.QUEUE
    if name == "auto":
        name = for_device(settings, _device_memory())
    classes = [q.name for q in configured(settings)]
    if classes and name not in classes:
        raise SystemExit(f"queue {name!r} is not one of MOPEQ_QUEUES ({', '.join(classes)})")
    os.environ["MOPEQ_QUEUE"] = name
    get_settings.cache_clear()
    return name


def main(argv: list[str] | None = None) -> None:
    die_with_parent()  # started by `make serve`: end with it, however it ends (app.core.lifeline)
    queue, rest = _take_queue(list(sys.argv[1:] if argv is None else argv))
    name = resolve_queue(queue)
    from worker.celery_app import celery_app

    args = ["worker", "--pool=solo", "--concurrency=1", f"--queues={name}", "--without-mingle",
            "--without-gossip", "--without-heartbeat", f"--hostname=mopeq-{os.getpid()}@{socket.gethostname()}",
            f"--loglevel={os.environ.get('MOPEQ_LOG_LEVEL', 'INFO')}"]
    if os.environ.get("MOPEQ_LOG_LEVEL", "INFO").upper() in ("WARNING", "ERROR", "CRITICAL"):
        args.insert(0, "--quiet")  # a global celery option: no start-up banner when only warnings are wanted
    celery_app.worker_main(args + rest)


if __name__ == "__main__":
    main()
