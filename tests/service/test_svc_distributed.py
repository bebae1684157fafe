"""Production layout: PostgreSQL + Redis, the API (in-process) and real Celery worker processes. Success with
allocation rows matching bitmap.json; kill -9 of a worker mid-stage and a new worker resuming from the stage files
with one artifact set; two workers never running the same job; orphans failing after the resume limit."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from svc_util import (
    FAST_JOB,
    Proc,
    auth,
    migrate,
    planted_settings,
    reset_pg,
    service_env,
    settings_from_env,
    start_worker,
    wait_status,
    wait_until,
)

from app.core.celery_conf import enqueue
from app.db.models import Artifact, ExpertAllocation, Job, JobEvent, Worker, utcnow
from app.db.session import make_engine, make_sessionmaker
from app.main import create_app

DELAY = "sensitivity"


class Cluster:
    def __init__(self, home: Path, env: dict[str, str], client: TestClient, settings: Any, model_root: Path):
        self.home, self.env, self.c, self.settings, self.root = home, env, client, settings, model_root
        self.factory = make_sessionmaker(make_engine(settings.database_url))
        self.workers: list[Proc] = []

    def worker(self, name: str, **env: Any) -> Proc:
        w = start_worker({**self.env, **{k: str(v) for k, v in env.items()}}, self.home / f"{name}.log")
        self.workers.append(w)
        return w

    def submit(self, **body: Any) -> str:
        r = self.c.post("/v1/jobs", json={"model": str(self.root / "tiny-moe"), **FAST_JOB, **body}, headers=auth())
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.c.get(f"/v1/jobs/{job_id}", headers=auth()).json()

    def events(self, job_id: str) -> list[JobEvent]:
        with self.factory() as db:
            return list(db.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))

    def check_results(self, job_id: str) -> None:
        art_dir = self.settings.artifact_dir / job_id
        bitmap = json.loads((art_dir / "bitmap.json").read_text())
        with self.factory() as db:
            rows = db.scalars(select(ExpertAllocation).where(ExpertAllocation.job_id == job_id)
                              .order_by(ExpertAllocation.layer, ExpertAllocation.expert)).all()
            arts = db.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        got = [(r.layer, r.expert, r.bits, r.sensitivity, r.frequency, r.params) for r in rows]
        want = [(la["layer"], e["expert"], e["bits"], e["sensitivity"], e["frequency"], e["params"])
                for la in bitmap["layers"] for e in la["experts"]]
        assert got == want and len(got) == 8
        files = sorted(p.relative_to(art_dir).as_posix() for p in art_dir.rglob("*") if p.is_file())
        assert sorted(a.name for a in arts) == files, "exactly one artifact row per file"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_root: Path, pg_url: str,
            redis_ns: tuple[str, str]) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("cluster")
    broker, prefix = redis_ns
    env = service_env(home, model_root, database_url=pg_url, broker_url=broker, redis_prefix=prefix,
                      queue=f"gpu-{uuid.uuid4().hex[:8]}", MOPEQ_HEARTBEAT_STALE_S=30)
    settings = settings_from_env(env)
    migrate(pg_url)
    reset_pg(pg_url)
    with TestClient(create_app(settings)) as client:
        cl = Cluster(home, env, client, settings, model_root)
        yield cl
        for w in cl.workers:
            w.stop(timeout=20)


def test_submit_succeeds_on_postgres_and_redis(cluster: Cluster) -> None:
    cluster.worker("w1", MOPEQ_DEBUG_STAGE_DELAY=f"{DELAY}:4")
    job_id = cluster.submit()
    done = wait_status(lambda: cluster.job(job_id), ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    cluster.check_results(job_id)
    assert cluster.c.get(f"/v1/jobs/{job_id}/bitmap", headers=auth()).json()["avg_bits"] == done["result"]["avg_bits"]
    ready = cluster.c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    metrics = cluster.c.get("/metrics").text
    assert f'mopeq_queue_depth{{queue="{cluster.settings.QUEUE}"}} 0.0' in metrics
    assert 'mopeq_stage_duration_seconds_count{stage="calibrate"} 1.0' in metrics


def test_kill9_mid_stage_then_a_new_worker_resumes(cluster: Cluster) -> None:
    w1 = cluster.workers[0]
    job_id = cluster.submit()
    wait_until(lambda: cluster.job(job_id)["stage"] == DELAY, 120, f"stage {DELAY}")
    state = cluster.settings.work_dir / job_id / "state"
    assert (state / "calibrate.done").exists()
    calib_mtime = (state / "calibrate.pt").stat().st_mtime_ns
    w1.kill9()
    assert cluster.job(job_id)["status"] == "running"  # nobody knows yet
    # the new worker notices the dead one (same host, pid gone, heartbeats missed), re-queues the job and resumes it
    cluster.worker("w2", MOPEQ_DEBUG_STAGE_DELAY="allocate:4")
    wait_until(lambda: cluster.job(job_id)["stage"] == "allocate", 120, "the resumed job to reach allocate")
    assert (state / "calibrate.pt").stat().st_mtime_ns == calib_mtime, "finished stages are not run again"
    done = wait_status(lambda: cluster.job(job_id), ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    messages = [e.message or "" for e in cluster.events(job_id) if e.kind == "status"]
    assert any("lost; job re-queued" in m for m in messages) and any("resumed by worker" in m for m in messages)
    cluster.check_results(job_id)
    assert not (cluster.settings.work_dir / job_id).exists()


def test_two_workers_never_run_the_same_job(cluster: Cluster) -> None:
    w2 = cluster.workers[-1]
    w3 = cluster.worker("w3")
    job_id = cluster.submit()
    for _ in range(3):  # duplicate deliveries of the same job
        enqueue(cluster.c.app.state.celery, cluster.settings, job_id)
    done = wait_status(lambda: cluster.job(job_id), ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    wait_until(lambda: (w2.text() + w3.text()).count(f"job {job_id} not claimed") >= 3, 60,
               "the duplicate deliveries to be refused")
    starts = [e for e in cluster.events(job_id) if e.kind == "status" and e.status == "running"]
    assert len(starts) == 1
    cluster.check_results(job_id)


def _ctx(cluster: Cluster, worker_id: str) -> SimpleNamespace:
    return SimpleNamespace(settings=cluster.settings, factory=cluster.factory, worker_id=worker_id,
                           hostname="test-host", celery=cluster.c.app.state.celery)


def test_concurrent_claims_have_one_winner(cluster: Cluster) -> None:
    from worker.recovery import claim

    with cluster.factory() as db, db.begin():
        job = Job(owner_key_id="bootstrap", model="m", settings=planted_settings(), timings={},
                  enqueued_at=utcnow())
        db.add(job)
    barrier = threading.Barrier(8)
    wins: list[str] = []

    def go(i: int) -> None:
        barrier.wait()
        if claim(_ctx(cluster, f"racer-{i}"), job.id):
            wins.append(f"racer-{i}")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    with cluster.factory() as db:
        row = db.get(Job, job.id)
        assert (row.status, row.worker_id, row.attempts) == ("running", wins[0], 1)


def test_orphans_are_resumed_then_failed(cluster: Cluster) -> None:
    from worker.recovery import sweep

    long_ago = utcnow() - dt.timedelta(hours=1)
    with cluster.factory() as db, db.begin():
        db.add(Worker(id="ghost:1:x", hostname="elsewhere", pid=1, queue="q", heartbeat_at=long_ago))
        ids = []
        for recoveries in (0, cluster.settings.MAX_RECOVERIES):
            job = Job(owner_key_id="bootstrap", model="m", settings=planted_settings(), timings={}, status="running", worker_id="ghost:1:x", heartbeat_at=long_ago,
                      attempts=recoveries + 1, recoveries=recoveries)
            db.add(job)
            db.flush()
            ids.append(job.id)
    sweep(_ctx(cluster, "sweeper"))  # the live workers' own sweeps may get there first: same outcome

    def settled() -> bool:
        with cluster.factory() as db:
            first, second = db.get(Job, ids[0]), db.get(Job, ids[1])
            return first.recoveries == 1 and first.worker_id != "ghost:1:x" and second.status == "failed"

    wait_until(settled, 30, "the orphans to be handled")
    with cluster.factory() as db:
        second = db.get(Job, ids[1])
        assert second.error_code == "worker_lost" and "lost" in second.error
    assert any("re-queued" in (e.message or "") for e in cluster.events(ids[0]))
