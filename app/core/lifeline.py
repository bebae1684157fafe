"""Child processes that end when the process that started them ends, however it ends (SIGKILL included).

``app.serve`` starts its workers with ``MOPEQ_PARENT_PID`` set to its own pid; each worker calls
``die_with_parent()`` first thing (and again in every pool process Celery forks, through ``worker_process_init``).

- Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` through ctypes: the kernel kills the child when its parent dies.
  The signal follows the *thread* that forked the child, so the parent starts children from threads that outlive
  them (``app.serve``'s supervisor threads wait on their child). A parent that died before the call is caught by
  comparing ``getppid()`` with ``MOPEQ_PARENT_PID``.
- Elsewhere (macOS, the BSDs: no such call): a daemon thread polls ``getppid()`` once a second and kills the process
  when the parent is gone (re-parented to init or a subreaper).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

PARENT_ENV = "MOPEQ_PARENT_PID"
PR_SET_PDEATHSIG = 1


def _gone(parent: int) -> bool:
    return os.getppid() != parent


def die_with_parent(parent: int | None = None) -> str | None:
    """Arrange for this process to be killed when ``parent`` (default: the pid in MOPEQ_PARENT_PID) ends; returns
    how ("prctl" or "poll"), or None when no parent is named."""
    if parent is None:
        value = os.environ.get(PARENT_ENV, "")
        if not value.isdigit():
            return None
        parent = int(value)
    how = "poll"
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            how = "prctl"
    if how == "poll":
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(1.0):
                if _gone(parent):
                    os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="mopeq-lifeline", daemon=True).start()
    if _gone(parent):  # the parent died before the arrangement above was in place
        os.kill(os.getpid(), signal.SIGKILL)
    return how

