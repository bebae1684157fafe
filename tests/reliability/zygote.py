"""A fork server for worker processes in the reliability tests.

Importing torch, transformers and the engine takes 15-20 s of wall time on a loaded two-core machine, and the fault
tests start (and kill -9) many workers. This process imports them once, then forks one child per request; each
child is a separate process with its own session, environment, database and broker connections that runs exactly
``python -m worker`` (``worker.__main__.main``). Nothing the worker evaluates from its settings is imported here
(``worker.celery_app`` reads them at import), so each child reads its own environment.

Protocol on stdin/stdout, one JSON object per line: ``{"env": {...}, "log": PATH, "args": [...]}`` answers
``{"pid": N}``; ``{"status": N}`` answers ``{"exit": CODE}`` (null while it runs; a negative code is the signal
that ended it); EOF on stdin ends the server (its children are left to the caller, which stops them by pid).
Children are reaped as soon as they exit, so a killed worker's pid vanishes at once, as under a real supervisor."""

from __future__ import annotations

import json
import os
import signal
import sys


def _preload() -> None:
    import celery  # noqa: F401
    import huggingface_hub  # noqa: F401
    import kombu  # noqa: F401
    import psycopg  # noqa: F401
    import redis  # noqa: F401
    import safetensors.torch  # noqa: F401
    import sqlalchemy  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import MixtralForCausalLM, PreTrainedTokenizerFast  # noqa: F401

    import mopeq_core.engine  # noqa: F401
    from mopeq_core import (  # noqa: F401
        allocate,
        apply,
        artifact,
        calibrate,
        data,
        errors,
        evaluate,
        loading,
        moe,
        sensitivity,
    )


def _die_with_parent() -> None:
    """SIGTERM (a warm shutdown) when the zygote goes away, e.g. because the test run that owns it was killed."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001, S110 - not Linux: the caller stops its workers by pid anyway
        pass


def _child(req: dict) -> None:
    os.setsid()
    _die_with_parent()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req.get("cwd") or os.getcwd())
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    sys.argv = ["python -m worker", *req.get("args", [])]
    code = 0
    try:
        from worker.__main__ import main

        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


EXITS: dict[int, int] = {}


def _reap(_signum: int, _frame: object) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        EXITS[pid] = os.waitstatus_to_exitcode(status)


def main() -> None:
    _preload()
    signal.signal(signal.SIGCHLD, _reap)
    out = sys.stdout
    out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        req = json.loads(line)
        if "status" in req:
            out.write(json.dumps({"exit": EXITS.get(int(req["status"]))}) + "\n")
            out.flush()
            continue
        pid = os.fork()
        if pid == 0:
            _child(req)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
