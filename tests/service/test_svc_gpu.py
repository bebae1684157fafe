"""On a CUDA machine (kept out of CI): a worker on the GPU runs two jobs back to back and frees GPU memory between
them. Run with ``pytest tests/service/test_svc_gpu.py -m requires_gpu``."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from svc_util import FAST_JOB, auth, migrate, service_env, settings_from_env, start_worker, wait_status

from app.main import create_app

pytestmark = pytest.mark.requires_gpu


def test_gpu_worker_runs_jobs_and_frees_memory(tmp_path: Path, model_root: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    env = service_env(tmp_path / "home", model_root, queue=f"gpu-{uuid.uuid4().hex[:8]}", MOPEQ_WORKER_DEVICE="cuda")
    settings = settings_from_env(env)
    migrate(settings.database_url)
    worker = start_worker(env, tmp_path / "gpu-worker.log")
    try:
        with TestClient(create_app(settings)) as c:
            ids = []
            for _ in range(2):
                r = c.post("/v1/jobs", json={"model": str(model_root / "tiny-moe"), **FAST_JOB}, headers=auth())
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
            for job_id in ids:
                done = wait_status(lambda job_id=job_id: c.get(f"/v1/jobs/{job_id}", headers=auth()).json(),
                                   ("succeeded", "failed", "cancelled"), 600)
                assert done["status"] == "succeeded", done
    finally:
        worker.stop()
    freed = [float(m) for m in re.findall(r"GPU memory after the job: ([0-9.]+) MiB allocated", worker.text())]
    assert len(freed) == 2 and max(freed) < 64, freed
