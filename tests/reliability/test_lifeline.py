"""`make serve` ends as a whole (issue 12): ``python -m app.serve`` on a private home and port, its Celery worker and
its webhook worker (``python -m worker.webhooks``) up, then the top process killed with SIGKILL (no chance to stop
anything), or its whole process group: within 10 s no process of it is left. Its processes are found by an
environment marker set for this run only (every child inherits it), never by name; zombies are not processes of it
any more (nothing runs), and their environment is unreadable anyway."""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from rel_util import Proc, free_port, service_env


def _marked(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment holds ``marker``."""
    found = {}
    needle = f"MOPEQ_TEST_LIFELINE={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue  # ended meanwhile, or not ours to read
    return found


def _serve(tmp_path: Path, marker: str) -> tuple[Proc, dict[int, str]]:
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    env = service_env(home, tmp_path, MOPEQ_PORT=port, MOPEQ_TEST_LIFELINE=marker, MOPEQ_LOG_LEVEL="WARNING")
    proc = Proc([sys.executable, "-m", "app.serve"], env, tmp_path / "serve.log", cwd=home)  # own process group
    end = time.monotonic() + 180
    while time.monotonic() < end:
        assert proc.p.poll() is None, proc.text()[-3000:]
        try:
            up = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            up = False
        procs = _marked(marker)
        workers = [c for c in procs.values() if "-m worker" in c]
        if up and any(c.endswith("-m worker") for c in workers) and any("worker.webhooks" in c for c in workers):
            return proc, procs
        time.sleep(0.5)
    raise AssertionError(f"the service or its workers did not come up: {_marked(marker)}\n{proc.text()[-3000:]}")


@pytest.mark.parametrize("how", ["process", "group"])
def test_sigkill_of_make_serve_leaves_no_process(tmp_path: Path, how: str) -> None:
    marker = uuid.uuid4().hex
    proc, procs = _serve(tmp_path, marker)
    assert proc.pid in procs and len(procs) >= 3, procs  # the API and both workers
    try:
        if how == "process":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGKILL)  # Proc starts it as the leader of its own group
        proc.p.wait(10)
        end = time.monotonic() + 10
        left = _marked(marker)
        while left and time.monotonic() < end:
            time.sleep(0.2)
            left = _marked(marker)
        assert not left, f"left running 10 s after SIGKILL of the {how}: {left}"
    finally:
        for pid in _marked(marker):  # only this run's processes, by their recorded marker
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
