"""Fixtures of the SDK/CLI tests: the REAL embedded service (``python -m app.serve``: API + one Celery worker on
SQLite, the filesystem broker and a local artifact store) on a free port, a tiny random Mixtral under its model
root, and one finished job shared by the tests that only read it.

The service's process and environment helpers come from the service tests (``tests/service/svc_util.py``), the
model from ``tests/tiny_models.py``."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

_HERE = Path(__file__).resolve().parent
for _p in (_HERE, _HERE.parent / "service", _HERE.parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from client_util import FAST, MODEL, REPO, Service
from svc_util import BOOT_KEY, Proc, free_port, service_env

from mopeq_client import MopeqClient


def _build_model(root: Path) -> None:
    """tests/tiny_models.py's Mixtral (2 layers × 4 experts, hidden 32), saved like the Hub does."""
    from tiny_models import build_model

    out = build_model("mixtral", root)
    if out.name != MODEL:
        out.rename(root / MODEL)


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    base = tmp_path_factory.mktemp("client-svc")
    root = base / "models"
    root.mkdir()
    _build_model(root)
    text = (REPO / "mopeq_core" / "data" / "calib_default.txt").read_text()
    (root / "eval.txt").write_text(text[-6000:])  # held out for perplexity
    (root / "short.txt").write_text("too short")  # passes the API's checks, fails calibration in the worker
    home = base / ".mopeq"
    port = free_port()
    # A warm worker runs the tiny job in about a second; the fault-injection pause at the start of calibrate
    # (the worker polls the cancel flag during it) gives the cancel and --timeout tests a deterministic window.
    env = service_env(home, root, MOPEQ_PORT=port, MOPEQ_RATE_LIMIT_PER_MINUTE=100000,
                      MOPEQ_MAX_CONCURRENT_JOBS=100, MOPEQ_DEBUG_STAGE_DELAY="calibrate:2")
    env.pop("MOPEQ_QUEUE", None)  # embedded defaults: queue "gpu", SQLite, filesystem broker
    proc = Proc([sys.executable, "-m", "app.serve"], env, base / "serve.log", cwd=base)
    svc = Service(url=f"http://127.0.0.1:{port}", key=BOOT_KEY, root=root, home=home, proc=proc)
    try:
        proc.wait_for("Uvicorn running", timeout=90)
        proc.wait_for("ready on queue", timeout=120)
        end = time.monotonic() + 30
        while httpx.get(f"{svc.url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < end, f"/readyz never became ready:\n{svc.log_tail()}"
            time.sleep(0.3)
        yield svc
    finally:
        proc.stop(timeout=30)


@pytest.fixture
def client(service: Service) -> Iterator[MopeqClient]:
    with MopeqClient(service.url, service.key, max_retries=2) as c:
        yield c


@pytest.fixture(scope="session")
def done_job(service: Service):
    """One successful job with a measured perplexity, submitted and followed through the SDK; the events wait()
    reported are in ``done_job.seen``."""
    seen = []
    with MopeqClient(service.url, service.key) as c:
        job = c.submit(MODEL, eval_file=service.eval_file, eval_samples=4, **FAST)
        final = c.wait(job.id, progress=seen.append, timeout=300)
    assert final.status == "succeeded", f"{final.error}\n{service.log_tail()}"
    final.seen = seen  # type: ignore[attr-defined]
    return final
