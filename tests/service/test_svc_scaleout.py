"""Beyond one machine (issue 13), every process on loopback: a real S3-compatible server (moto's server mode, a
process speaking S3 over HTTP), PostgreSQL, Redis, two API processes and workers that share nothing with the APIs or
each other but the database, the broker and the bucket (each has its own, empty MOPEQ_HOME; only the input model's
directory, standing in for the Hub, is read by all).

Shown: a job submitted to API 1 runs on a worker and is downloaded through API 2 (a 307 to a presigned URL, then the
checksum); every file is in the bucket and the API never reads a worker's directory; a worker killed with SIGKILL in
the middle of its upload leaves nothing visible and the job still succeeds once; routing by memory: a job needing
more than the ``cpu`` class goes to the larger queue, one bigger than every class gets a 422 naming the memory it
needs; DELETE /v1/jobs/{id} removes the objects too."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from svc_util import (
    BOOT_KEY,
    FAST_JOB,
    Proc,
    auth,
    free_port,
    migrate,
    reset_pg,
    service_env,
    wait_status,
    wait_until,
)
from typer.testing import CliRunner

from app.db.models import Artifact, JobEvent
from app.services.storage import LocalStore, S3Store, parse_s3_url
from mopeq_client import MopeqClient, NotFoundError
from mopeq_client.cli import app as cli_app

BUCKET = "mopeq-artifacts"
PREFIX = "t-" + uuid.uuid4().hex[:8]
# Device memory classes sized for the tiny model (bytes needed by its jobs, app.services.queues.memory_needed):
# FAST_JOB about 1.3 MB -> cpu; 32 x 128 calibration tokens about 3.8 MB -> gpu-big; 512 x 128 about 42 MB -> none.
QUEUES = "cpu:0.002,gpu-big:0.02"
BIG_CALIB = {"samples": 32, "seq_len": 128}
HUGE_CALIB = {"samples": 512, "seq_len": 128}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """moto's S3 server as its own process on a free port, and the bucket."""
    home = tmp_path_factory.mktemp("s3")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = Proc([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env, home / "moto.log",
                cwd=home)
    aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "mopeq-test",
           "AWS_SECRET_ACCESS_KEY": "mopeq-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        wait_until(lambda: _up(aws["AWS_ENDPOINT_URL"]), 60, "the S3 server to listen")
        _client(aws).create_bucket(Bucket=BUCKET)
        yield aws
    finally:
        proc.stop(timeout=10)


def _up(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
        return True
    except httpx.TransportError:
        return False


def _client(aws: dict[str, str]) -> Any:
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"], region_name=aws["AWS_DEFAULT_REGION"],
                        config=Config(s3={"addressing_style": "path"}))


def _objects(aws: dict[str, str], job_id: str) -> dict[str, dict[str, Any]]:
    """The bucket's objects of a job: key -> {"size", "sha256" (its metadata)}."""
    c = _client(aws)
    out = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/{job_id}/"):
        for o in page.get("Contents", []) or []:
            head = c.head_object(Bucket=BUCKET, Key=o["Key"])
            out[o["Key"]] = {"size": o["Size"], "sha256": head["Metadata"].get("sha256")}
    return out


class Fleet:
    def __init__(self, base: Path, env: dict[str, str], db_url: str):
        self.base, self.env = base, env
        self.engine = create_engine(db_url)
        self.apis: list[tuple[Proc, str, Path]] = []
        self.workers: dict[str, tuple[Proc, Path]] = {}

    def _home(self, name: str) -> Path:
        home = self.base / name
        home.mkdir()
        assert not any(home.iterdir())
        return home

    def _env(self, home: Path, **extra: str) -> dict[str, str]:
        return {**self.env, "MOPEQ_HOME": str(home), "HF_HOME": str(home / "hf"), **extra}

    def api(self, name: str) -> str:
        home = self._home(name)
        port = free_port()
        proc = Proc([sys.executable, "-m", "app.serve", "--no-worker"], self._env(home, MOPEQ_PORT=str(port)),
                    self.base / f"{name}.log", cwd=home)
        proc.wait_for("Uvicorn running", timeout=120)
        url = f"http://127.0.0.1:{port}"
        self.apis.append((proc, url, home))
        return url

    def worker(self, name: str, queue: str, **extra: str) -> Proc:
        home = self._home(name)
        proc = Proc([sys.executable, "-m", "worker", "--queue", queue], self._env(home, **extra),
                    self.base / f"{name}.log", cwd=home)
        proc.wait_for(f"ready on queue {queue}", timeout=120)
        self.workers[name] = (proc, home)
        return proc

    def artifacts(self, job_id: str) -> list[Artifact]:
        with Session(self.engine) as db:
            return list(db.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "file")))

    def events(self, job_id: str) -> list[JobEvent]:
        with Session(self.engine) as db:
            return list(db.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))

    def stop(self) -> None:
        for proc, _ in self.workers.values():
            proc.stop(timeout=20)
        for proc, _, _ in self.apis:
            proc.stop(timeout=20)
        self.engine.dispose()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_root: Path, pg_url: str, redis_ns: tuple[str, str],
          s3: dict[str, str]) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("fleet")
    broker, prefix = redis_ns
    migrate(pg_url)
    reset_pg(pg_url)
    env = service_env(base, model_root, database_url=pg_url, broker_url=broker, redis_prefix=prefix + "scale:",
                      MOPEQ_ARTIFACT_STORE=f"s3://{BUCKET}/{PREFIX}", MOPEQ_QUEUES=QUEUES,
                      MOPEQ_SECRET_KEY="scale-" + uuid.uuid4().hex, MOPEQ_HEARTBEAT_STALE_S="30", **s3)
    env.pop("MOPEQ_QUEUE")
    fl = Fleet(base, env, pg_url)
    try:
        fl.api("api1")
        fl.api("api2")
        fl.worker("w-cpu", "cpu")
        fl.worker("w-big", "gpu-big")
        yield fl
    finally:
        fl.stop()


def _submit(url: str, model_root: Path, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/jobs", json={"model": str(model_root / "tiny-moe"), **FAST_JOB, **body},
                      headers=auth(), timeout=60)


def _job(url: str, job_id: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/jobs/{job_id}", headers=auth(), timeout=30).json()


def _no_job_files(home: Path, job_id: str) -> bool:
    return not any(job_id in str(p) for p in home.rglob("*"))


def test_store_backends_roundtrip(s3: dict[str, str], tmp_path: Path) -> None:
    """Both backends behind one interface: publish (S3: multipart above the threshold, SHA-256 in the metadata),
    presigned download, prune of an earlier attempt, delete."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    big = os.urandom(11 << 20)
    (out / "model.safetensors").write_bytes(big)
    (out / "sub" / "bitmap.json").write_text('{"avg_bits": 3.0}')
    old = os.environ.copy()
    os.environ.update(s3)
    try:
        store = S3Store(f"s3://{BUCKET}/unit-{PREFIX}", tmp_path / "work", multipart_threshold=5 << 20,
                        multipart_chunk=5 << 20)
        first = store.publish("job1", 1, out)
        second = store.publish("job1", 2, out)
    finally:
        os.environ.clear()
        os.environ.update(old)
    c = _client(s3)
    key = parse_s3_url(second[0].uri)[1]
    assert key == f"unit-{PREFIX}/job1/a2/model.safetensors"
    head = c.head_object(Bucket=BUCKET, Key=key)
    assert head["Metadata"]["sha256"] == _sha(big) == second[0].sha256 and head["ContentLength"] == len(big)
    assert "-" in head["ETag"], "an 11 MB file above a 5 MB threshold goes up in parts"
    got = httpx.get(store.presigned_url(second[0].uri, "model.safetensors"), timeout=30)
    assert got.status_code == 200 and _sha(got.content) == _sha(big)
    assert store.read_bytes("job1", "sub/bitmap.json", second[1].uri) == b'{"avg_bits": 3.0}'
    assert second[1].name == "sub/bitmap.json"
    assert store.prune("job1", second) == len(first)
    keys = {o["Key"] for o in c.list_objects_v2(Bucket=BUCKET, Prefix=f"unit-{PREFIX}/job1/").get("Contents", [])}
    assert keys == {parse_s3_url(f.uri)[1] for f in second}
    assert store.delete_job("job1") == 2
    assert not c.list_objects_v2(Bucket=BUCKET, Prefix=f"unit-{PREFIX}/").get("Contents")

    local = LocalStore(tmp_path / "artifacts")
    (tmp_path / "artifacts" / "job2").mkdir(parents=True)
    shutil.copytree(out, local.output_dir("job2"), dirs_exist_ok=True)
    files = local.publish("job2", 1, local.output_dir("job2"))
    assert [f.name for f in files] == ["model.safetensors", "sub/bitmap.json"] and files[0].sha256 == _sha(big)
    assert local.local_path("job2", "sub/bitmap.json") is not None and local.presigned_url(files[0].uri, "x") is None
    assert local.read_bytes("job2", "sub/bitmap.json", "file:///elsewhere/on/the/worker") == b'{"avg_bits": 3.0}'
    assert local.local_path("job2", "../job2/../../etc/passwd") is None
    assert local.delete_job("job2") == 2 and not (tmp_path / "artifacts" / "job2").exists()


def test_submit_to_api1_run_on_a_worker_download_through_api2(fleet: Fleet, model_root: Path,
                                                              s3: dict[str, str], tmp_path: Path) -> None:
    (_, api1, home1), (_, api2, home2) = fleet.apis
    r = _submit(api1, model_root)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.json()["queue"] == "cpu" and r.json()["est_memory_bytes"] < 2_000_000
    done = wait_status(lambda: _job(api2, job_id), ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    assert done["timings"]["upload"] >= 0 and done["stage"] is None
    print(f"\nstage seconds of the tiny job: {done['timings']}")
    w_cpu, cpu_home = fleet.workers["w-cpu"]
    w_cpu.wait_for(f"job {job_id}: succeeded", timeout=30)

    # every file is in the bucket, with the checksum the listing shows
    arts = {a.name: a for a in fleet.artifacts(job_id)}
    objs = _objects(s3, job_id)
    assert {"bitmap.json", "report.json", "README.md", "config.json"} <= set(arts)
    assert set(objs) == {f"{PREFIX}/{job_id}/a1/{n}" for n in arts}
    for name, a in arts.items():
        o = objs[f"{PREFIX}/{job_id}/a1/{name}"]
        assert a.uri == f"s3://{BUCKET}/{PREFIX}/{job_id}/a1/{name}"
        assert o["sha256"] == a.sha256 and o["size"] == a.bytes

    # the worker's own directory is gone and never needed: the APIs read the bucket only
    shutil.rmtree(cpu_home / "work", ignore_errors=True)
    for home in (home1, home2):
        assert _no_job_files(home, job_id)
        assert not (home / "artifacts").exists()

    # through API 2: a 307 to a presigned URL on the S3 server, without the API key, then the checksum
    raw = httpx.get(f"{api2}/v1/jobs/{job_id}/artifacts/bitmap.json", headers=auth(), timeout=30)
    assert raw.status_code == 307, raw.text
    location = raw.headers["location"]
    assert location.startswith(s3["AWS_ENDPOINT_URL"] + f"/{BUCKET}/{PREFIX}/{job_id}/a1/bitmap.json?")
    assert "X-Amz-Signature=" in location and BOOT_KEY not in location
    body = httpx.get(location, timeout=30)
    assert body.status_code == 200 and _sha(body.content) == raw.headers["x-checksum-sha256"] == arts[
        "bitmap.json"].sha256
    assert httpx.get(f"{api2}/v1/jobs/{job_id}/bitmap", headers=auth(), timeout=30).json()["avg_bits"] == \
        done["result"]["avg_bits"]
    with MopeqClient(api2, BOOT_KEY) as sdk:
        paths = sdk.download(job_id, tmp_path / "dl")
    assert sorted(p.relative_to(tmp_path / "dl").as_posix() for p in paths) == sorted(arts)
    for p in paths:
        assert _sha(p.read_bytes()) == arts[p.relative_to(tmp_path / "dl").as_posix()].sha256
    for home in (home1, home2):
        assert _no_job_files(home, job_id)


def test_kill9_mid_upload_leaves_nothing_visible_and_the_job_completes_once(fleet: Fleet, model_root: Path,
                                                                           s3: dict[str, str]) -> None:
    (_, api1, _), (_, api2, _) = fleet.apis
    cpu, _ = fleet.workers.pop("w-cpu")
    cpu.stop(timeout=30)  # the slow uploader below is the only one on the cpu queue
    slow = fleet.worker("w-slow", "cpu", MOPEQ_DEBUG_STAGE_DELAY="upload:120")
    job_id = _submit(api1, model_root).json()["id"]
    wait_until(lambda: _job(api2, job_id)["stage"] == "upload" and _objects(s3, job_id), 180,
               "the worker to be half-way through its upload")
    time.sleep(0.5)
    objs = _objects(s3, job_id)
    assert len(objs) == 1, objs  # one file stored, the rest not
    # nothing of it is visible: no listing, no download, no bit map; and the job cannot be deleted while it runs
    assert httpx.get(f"{api2}/v1/jobs/{job_id}/artifacts", headers=auth(), timeout=30).json() == []
    assert httpx.get(f"{api2}/v1/jobs/{job_id}/artifacts/bitmap.json", headers=auth(),
                     timeout=30).status_code == 404
    assert httpx.delete(f"{api1}/v1/jobs/{job_id}", headers=auth(), timeout=30).status_code == 409
    slow.kill9()
    assert fleet.artifacts(job_id) == []

    # a new worker on its own empty directory notices the dead one, re-queues the job and runs it from scratch
    fleet.worker("w-cpu2", "cpu")
    done = wait_status(lambda: _job(api1, job_id), ("succeeded", "failed", "cancelled"), timeout=240)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    finals = [e for e in fleet.events(job_id) if e.kind == "status" and e.status in ("succeeded", "failed")]
    assert len(finals) == 1
    arts = {a.name: a for a in fleet.artifacts(job_id)}
    objs = _objects(s3, job_id)
    assert set(objs) == {f"{PREFIX}/{job_id}/a2/{n}" for n in arts}, "the dead attempt's objects were pruned"
    for name, a in arts.items():
        assert objs[f"{PREFIX}/{job_id}/a2/{name}"]["sha256"] == a.sha256
    with MopeqClient(api2, BOOT_KEY) as sdk:
        assert len(sdk.download(job_id, fleet.base / "dl-kill")) == len(arts)


def test_routing_by_memory_and_refusal_naming_the_figure(fleet: Fleet, model_root: Path) -> None:
    (_, api1, _), (_, api2, _) = fleet.apis
    est = httpx.post(f"{api2}/v1/estimate", json={"model": str(model_root / "tiny-moe"), "quantizer": "rtn",
                                                  "group_size": 64, "calibration": BIG_CALIB},
                     headers=auth(), timeout=60).json()
    assert 2_000_000 < est["memory_bytes"] <= 20_000_000 and est["queue"] == "gpu-big", est
    r = _submit(api1, model_root, calibration=BIG_CALIB)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["queue"] == "gpu-big" and job["est_memory_bytes"] == est["memory_bytes"]
    done = wait_status(lambda: _job(api2, job["id"]), ("succeeded", "failed", "cancelled"), timeout=240)
    assert done["status"] == "succeeded", done
    big, _ = fleet.workers["w-big"]
    big.wait_for(f"job {job['id']}: succeeded", timeout=30)
    assert all(job["id"] not in p.text() for name, (p, _) in fleet.workers.items() if name != "w-big")

    huge = _submit(api2, model_root, calibration=HUGE_CALIB)
    assert huge.status_code == 422, huge.text
    err = huge.json()
    assert err["code"] == "no_queue_fits" and err["memory_needed_bytes"] > 20_000_000
    assert f"{err['memory_needed_bytes'] / 1e9:.3g} GB" in err["detail"] and "gpu-big" in err["detail"]

    ready = httpx.get(f"{api1}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok", "store": "ok"}
    metrics = httpx.get(f"{api1}/metrics", timeout=30).text
    assert 'mopeq_queue_depth{queue="cpu"} 0.0' in metrics and 'mopeq_queue_depth{queue="gpu-big"} 0.0' in metrics
    assert 'mopeq_queue_jobs{queue="gpu-big",status="queued"} 0.0' in metrics


def test_retention_deletes_old_jobs_with_their_objects(fleet: Fleet, s3: dict[str, str], pg_url: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime as dt

    from sqlalchemy import update

    from app.core.config import Settings
    from app.db.models import Job, utcnow
    from app.db.session import make_engine, make_sessionmaker
    from app.services.jobs import expire_finished

    (_, api1, _), _ = fleet.apis
    jobs = httpx.get(f"{api1}/v1/jobs", params={"status": "succeeded"}, headers=auth(), timeout=30).json()["items"]
    assert jobs
    old, kept = jobs[0]["id"], [j["id"] for j in jobs[1:]]
    assert _objects(s3, old) and len(kept) >= 2
    with Session(fleet.engine) as db, db.begin():
        db.execute(update(Job).where(Job.id == old).values(finished_at=utcnow() - dt.timedelta(days=3)))
    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    factory = make_sessionmaker(make_engine(pg_url))
    base = {"ARTIFACT_STORE": f"s3://{BUCKET}/{PREFIX}", "HOME": str(fleet.base / "retention")}
    assert expire_finished(factory, Settings(**base)) == 0  # off by default
    assert expire_finished(factory, Settings(**base, RETENTION_DAYS=7)) == 0  # not old enough
    assert _objects(s3, old)
    assert expire_finished(factory, Settings(**base, RETENTION_DAYS=2)) == 1
    assert _objects(s3, old) == {} and fleet.artifacts(old) == []
    assert httpx.get(f"{api1}/v1/jobs/{old}", headers=auth(), timeout=30).status_code == 404
    for k in kept:
        assert httpx.get(f"{api1}/v1/jobs/{k}", headers=auth(), timeout=30).status_code == 200


def test_delete_removes_rows_and_objects(fleet: Fleet, model_root: Path, s3: dict[str, str]) -> None:
    (_, api1, _), (_, api2, _) = fleet.apis
    jobs = httpx.get(f"{api1}/v1/jobs", params={"status": "succeeded"}, headers=auth(), timeout=30).json()["items"]
    assert jobs
    job_id = jobs[0]["id"]
    assert _objects(s3, job_id)
    other = httpx.post(f"{api1}/v1/admin/keys", json={"name": "other"}, headers=auth(), timeout=30)
    assert other.status_code == 201, other.text  # another tenant cannot delete it (nor see it)
    assert httpx.delete(f"{api1}/v1/jobs/{job_id}", headers=auth(other.json()["api_key"]),
                        timeout=30).status_code == 404
    assert _objects(s3, job_id)
    r = httpx.delete(f"{api2}/v1/jobs/{job_id}", headers=auth(), timeout=30)
    assert r.status_code == 204, r.text
    assert _objects(s3, job_id) == {} and fleet.artifacts(job_id) == []
    assert httpx.get(f"{api1}/v1/jobs/{job_id}", headers=auth(), timeout=30).status_code == 404

    # the SDK and the remote CLI do the same
    second = jobs[1]["id"]
    assert _objects(s3, second)
    res = CliRunner().invoke(cli_app, ["delete", second, "--json"], env={"MOPEQ_URL": api1, "MOPEQ_API_KEY": BOOT_KEY},
                             catch_exceptions=False)
    assert res.exit_code == 0 and json.loads(res.stdout) == {"id": second, "deleted": True}, res.output
    assert _objects(s3, second) == {}
    with MopeqClient(api2, BOOT_KEY) as sdk, pytest.raises(NotFoundError):
        sdk.delete(second)


def test_queue_classes_parse_pick_and_detect() -> None:
    from app.core.config import Settings
    from app.services.errors import ServiceError
    from app.services.queues import for_device, parse_queues, pick

    assert [q.name for q in parse_queues("gpu-80g:80, cpu:16,gpu-24g:24")] == ["cpu", "gpu-24g", "gpu-80g"]
    for bad in ("cpu", "cpu:0", "cpu:x", "c pu:4", "cpu:4,cpu:8"):
        with pytest.raises(ValueError):
            parse_queues(bad)
    with pytest.raises(ValueError):
        Settings(QUEUES="gpu-80g")
    with pytest.raises(ValueError):
        Settings(ARTIFACT_STORE="ftp://bucket/x")
    s = Settings(QUEUES="cpu:16,gpu-24g:24,gpu-80g:80,gpu-141g:141", QUEUE="auto")
    assert pick(s, 15 * 10**9) == "cpu" and pick(s, 16 * 10**9 + 1) == "gpu-24g" and pick(s, 141 * 10**9) == "gpu-141g"
    with pytest.raises(ServiceError) as err:
        pick(s, 150 * 10**9)
    assert err.value.status == 422 and "150 GB" in err.value.detail and err.value.extra["memory_needed_bytes"] == 150e9
    # --queue auto: the largest class the device holds (an H100 80GB reports 85.0e9 bytes), the smallest without one
    assert for_device(s, 85_000_000_000) == "gpu-80g" and for_device(s, 25_769_803_776) == "gpu-24g"
    assert for_device(s, 150_000_000_000) == "gpu-141g" and for_device(s, None) == "cpu"
    assert pick(Settings(QUEUE="gpu"), 10**15) == "gpu"  # no classes: one queue, nothing refused here


def test_memory_needed_holds_one_layer_of_hessians() -> None:
    """GPTQ's Hessians are held one layer at a time: the routing figure adds the largest layer's, not the sum the
    calibration plan reports for the whole model."""
    from types import SimpleNamespace

    from app.services.queues import memory_needed

    layer = SimpleNamespace(experts=8, shapes=[(14336, 4096), (14336, 4096), (4096, 14336)])  # Mixtral-8x7B
    est = SimpleNamespace(non_expert_bytes=3_210_000_000, layers=[layer] * 32)
    rtn = SimpleNamespace(activation_bytes=268_435_456, hessian_bytes=0)
    gptq = SimpleNamespace(activation_bytes=268_435_456, hessian_bytes=32 * 8 * (2 * 4096**2 + 14336**2) * 4)
    one_layer = 8 * (2 * 4096**2 + 14336**2) * 4
    assert memory_needed(est, gptq) - memory_needed(est, rtn) == pytest.approx(one_layer * 1.2, abs=2)
    assert 17e9 < memory_needed(est, rtn) < 18.5e9 and 26e9 < memory_needed(est, gptq) < 28e9
