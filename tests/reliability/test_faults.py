"""Faults injected into a running service (API process, Celery workers, PostgreSQL, Redis, the Hub mock), each
checked with the same audit: jobs lost 0, jobs stuck in ``running`` 0, duplicate artifacts 0, and the job's final
state and reason. The figures are printed at the end of the run (docs/RELIABILITY.md has them).

Workers are forked from a warm zygote (tests/reliability/zygote.py) so that a kill -9 and a replacement cost
seconds, not the 15-20 s of importing torch on a loaded machine; each is still its own process running
``python -m worker``'s code with its own environment and connections."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from rel_util import HF_TOKEN, STAGES, Cluster, wait_until


def record(figures: list, cl: Cluster, fault: str, job_ids: list[str], t0: float, **extra: Any) -> dict:
    a = cl.audit(job_ids)
    rows = [cl.job(j) for j in job_ids]
    outcome = "; ".join(f"{r['status']}" + (f" ({r['error_code']}: {r['error'][:90]})" if r["error"] else "")
                        + f" attempts={r['attempts']}" for r in rows)
    fig = {"fault": fault, **{k: a[k] for k in ("jobs", "lost", "stuck_running", "duplicate_artifacts")},
           "final": a["final"], "outcome": outcome, "seconds": round(time.monotonic() - t0, 1), **extra}
    figures.append(fig)
    assert (a["lost"], a["stuck_running"], a["duplicate_artifacts"]) == (0, 0, 0), a["problems"]
    return fig


def gone(cl: Cluster, job_id: str, work_only: bool = False) -> None:
    """The job's files are removed (just after its final status is written)."""
    dirs = [cl.settings.work_dir / job_id] + ([] if work_only else [cl.settings.artifact_dir / job_id])
    wait_until(lambda: not any(d.exists() for d in dirs), 15, f"the files of job {job_id} to be removed")


# ---- kill -9 in each stage --------------------------------------------------------------------------------------
# `make test` kills in the stages that write the most state (calibration statistics, packed weights, the artifact,
# the Hub push); the other four are marked slow and run with `make reliability` (about 13 s each here).
CI_STAGES = ("calibrate", "quantize", "export", "push")
KILL_STAGES = [pytest.param(s, marks=() if s in CI_STAGES else pytest.mark.slow) for s in STAGES]


@pytest.mark.parametrize("stage", KILL_STAGES)
def test_kill9_in_stage(fresh: Cluster, figures: list, stage: str) -> None:
    """The worker is killed (SIGKILL) while the job sits at the start of ``stage``; a second worker notices the dead
    one (same host, pid gone), re-queues the job and resumes it from its last finished stage."""
    cl, t0 = fresh, time.monotonic()
    victim = cl.worker(f"victim-{stage}", MOPEQ_DEBUG_STAGE_DELAY=f"{stage}:120")
    push = {"hf_token": HF_TOKEN, "push": {"repo_id": f"tester/kill-{stage}-{uuid.uuid4().hex[:6]}"}} \
        if stage == "push" else {}
    job_id = cl.submit(**push)
    cl.wait_stage(job_id, stage)
    survivor = cl.worker(f"survivor-{stage}")  # started only now: the victim had to take the job first
    cl.wait_stage(job_id, stage)  # still there (the delay holds it)
    victim.kill9()
    (done,) = cl.wait_final(job_id, 150)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2 and done["recoveries"] == 1, done
    assert done["worker_id"].split(":")[1] == str(survivor.pid), "the survivor finished it"
    msgs = [e.message or "" for e in cl.events(job_id) if e.kind == "status"]
    assert any("lost; job re-queued" in m for m in msgs) and any("resumed by worker" in m for m in msgs), msgs
    gone(cl, job_id, work_only=True)  # stage files are removed when the job ends
    if stage == "push":
        repo = cl.hub.repos[push["push"]["repo_id"]]
        assert sum(m.startswith("MoPEQ") for m in repo.commit_messages) == 1
    record(figures, cl, f"kill -9 worker in {stage}", [job_id], t0)


# ---- broker and database restarts -------------------------------------------------------------------------------
def test_redis_restart_mid_job(fresh: Cluster, figures: list) -> None:
    """Redis (no persistence) is killed and restarted while a job runs, a second job waits in the queue and a third
    is submitted during the outage. The broker loses every message; nothing is lost: the running job finishes, the
    queued one is published again (the workers notice the broker's restart), the third is published by the sweep."""
    cl, t0 = fresh, time.monotonic()
    cl.worker("redis", MOPEQ_DEBUG_STAGE_DELAY="sensitivity:5")
    running = cl.submit()
    cl.wait_stage(running, "sensitivity")
    waiting = cl.submit()  # published to Redis; the only worker is busy, so the message sits in the queue
    assert cl.job(waiting)["enqueued_at"] is not None
    cl.redis.stop()
    during = cl.submit()  # accepted: the row is committed, the publish fails and is retried by the sweep
    assert cl.job(during)["enqueued_at"] is None
    ready = cl.http.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["broker"].startswith("error")
    time.sleep(2)
    cl.redis.start()
    rows = cl.wait_final([running, waiting, during], 180)
    assert [r["status"] for r in rows] == ["succeeded"] * 3, rows
    assert cl.http.get("/readyz").status_code == 200
    record(figures, cl, "Redis killed and restarted mid-job (2 s down, no persistence)", [running, waiting, during],
           t0)


def test_postgres_restart_mid_job(fresh: Cluster, figures: list) -> None:
    """PostgreSQL is stopped (fast shutdown: every connection dropped) for 3 s while a job runs. The API answers 503
    database_unavailable meanwhile; the worker's next database write fails, the job is retried (transient error)
    and resumes from its last finished stage."""
    cl, t0 = fresh, time.monotonic()
    cl.worker("pg", MOPEQ_DEBUG_STAGE_DELAY="sensitivity:4")
    job_id = cl.submit()
    cl.wait_stage(job_id, "sensitivity")
    cl.pg.stop()
    r = cl.http.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 503 and r.json()["code"] == "database_unavailable" and r.headers["retry-after"], r.text
    r = cl.http.post("/v1/jobs", json={"model": str(cl.model_root / "tiny-moe"), "budget": {"avg_bits": 3}})
    assert r.status_code == 503, r.text  # refused, not half-accepted: the client retries
    time.sleep(3)
    cl.pg.start()
    (done,) = cl.wait_final(job_id, 180)
    assert done["status"] == "succeeded", done
    record(figures, cl, "PostgreSQL stopped 3 s mid-job", [job_id], t0, attempts=done["attempts"])


# ---- the Hub -------------------------------------------------------------------------------------------------------
def test_hub_push_fails_then_succeeds(fresh: Cluster, figures: list) -> None:
    """The Hub answers 503 to the commit of the push (after the repo was created and the weights uploaded), then
    502 to the repo creation of the retry; the third attempt pushes. One commit, one Hub artifact row."""
    cl, t0 = fresh, time.monotonic()
    cl.worker("hub")
    repo_id = f"tester/flaky-{uuid.uuid4().hex[:6]}"
    cl.hub.fail_next = [0, 0, 0, 503, 502]  # create, preupload, lfs batch pass; commit fails; then create fails
    job_id = cl.submit(hf_token=HF_TOKEN, push={"repo_id": repo_id, "private": True})
    (done,) = cl.wait_final(job_id, 180)
    assert done["status"] == "succeeded" and done["attempts"] == 3, done
    assert not cl.hub.fail_next
    repo = cl.hub.repos[repo_id]
    assert repo.private and sum(m.startswith("MoPEQ") for m in repo.commit_messages) == 1
    msgs = [e.message or "" for e in cl.events(job_id) if e.kind == "status"]
    assert sum("transient error" in m for m in msgs) == 2, msgs
    record(figures, cl, "Hub push: 503 on commit, then 502 on create", [job_id], t0)


# ---- a full artifact store -----------------------------------------------------------------------------------------
def _store_bytes(cl: Cluster) -> int:
    return sum(p.stat().st_size for p in cl.settings.artifact_dir.rglob("*") if p.is_file())


def test_full_artifact_store(fresh: Cluster, figures: list) -> None:
    """MOPEQ_ARTIFACT_MAX_BYTES caps the artifact store. (a) The store is already full when the job starts: it
    fails at once (disk_space) before any compute. (b) The store fills up while the job runs (another writer):
    the result is refused after the export, before any artifact row; the job's files are removed."""
    cl, t0 = fresh, time.monotonic()
    room = 10**9
    quota = _store_bytes(cl) + room
    cl.worker("quota", MOPEQ_ARTIFACT_MAX_BYTES=quota, MOPEQ_DEBUG_STAGE_DELAY="calibrate:2")
    filler = cl.settings.artifact_dir / f"filler-{uuid.uuid4().hex[:6]}.bin"
    with open(filler, "wb") as f:  # sparse: counts against the quota without using the disk
        f.truncate(room)
    try:
        early = cl.submit()
        (a,) = cl.wait_final(early, 120)
        assert (a["status"], a["error_code"]) == ("failed", "disk_space"), a
        assert "artifact store is full" in a["error"] and a["attempts"] == 1
        assert "calibrate" not in {e.stage for e in cl.events(early)}, "refused before any compute"
        filler.unlink()
        late = cl.submit()
        cl.wait_stage(late, "calibrate")
        with open(filler, "wb") as f:
            f.truncate(room)
        (b,) = cl.wait_final(late, 120)
        assert (b["status"], b["error_code"]) == ("failed", "disk_space"), b
        assert "MOPEQ_ARTIFACT_MAX_BYTES" in b["error"] and "files were removed" in b["error"]
        gone(cl, late)
    finally:
        filler.unlink(missing_ok=True)
    record(figures, cl, "artifact store full (quota), before and during a job", [early, late], t0)


# ---- a worker that hangs past the job timeout ------------------------------------------------------------------------
def test_job_timeout_while_polling(fresh: Cluster, figures: list) -> None:
    """A stage that runs past MOPEQ_JOB_TIMEOUT_S (but checks cancel): the job fails with code timeout."""
    cl, t0 = fresh, time.monotonic()
    w = cl.worker("slow", MOPEQ_JOB_TIMEOUT_S=10, MOPEQ_DEBUG_STAGE_DELAY="calibrate:300")
    job_id = cl.submit()
    (done,) = cl.wait_final(job_id, 90)
    assert (done["status"], done["error_code"]) == ("failed", "timeout"), done
    assert "timed out after 10 s" in done["error"]
    assert w.alive(), "the worker goes on with the next job"
    record(figures, cl, "stage runs past the job timeout (polling)", [job_id], t0)


def test_worker_hangs_past_the_job_timeout(fresh: Cluster, figures: list) -> None:
    """Code that never polls (a hang in C, a dead-locked collective): the worker's watchdog fails the job with code
    timeout, removes its files and exits (status 70) so that the supervisor starts a fresh worker."""
    cl, t0 = fresh, time.monotonic()
    w = cl.worker("hang", MOPEQ_JOB_TIMEOUT_S=10, MOPEQ_WATCHDOG_GRACE_S=2,
                  MOPEQ_DEBUG_STAGE_DELAY="fetch:600:hang")  # the first thing the job does: no check before it
    job_id = cl.submit()
    cl.wait_stage(job_id, "fetch", 120)
    (done,) = cl.wait_final(job_id, 120)
    assert (done["status"], done["error_code"]) == ("failed", "timeout"), done
    assert "no progress check" in done["error"]
    w.wait_gone(30)
    assert w.returncode == 70, w.text()[-3000:]
    gone(cl, job_id)
    cl.workers.remove(w)
    w.stop()
    record(figures, cl, "worker hangs past the job timeout (no polling)", [job_id], t0)
