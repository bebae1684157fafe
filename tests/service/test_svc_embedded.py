"""The embedded default end to end: ``python -m app.serve`` (SQLite, filesystem broker, local artifact store, one
worker subprocess) driven over real HTTP with the real pipeline on a tiny MoE. Covers success with allocation rows
matching bitmap.json, SSE over HTTP, downloads with checksums, cancel mid-run, push to the Hub mock with a token
that appears nowhere, and a clean shutdown that re-queues a running job which then resumes."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from svc_util import (
    FAST_JOB,
    HF_TOKEN,
    Proc,
    auth,
    free_port,
    service_env,
    wait_status,
    wait_until,
)

DELAY_STAGE = "sensitivity"


class Server:
    def __init__(self, home: Path, env: dict[str, str], port: int):
        self.home, self.env, self.port = home, env, port
        self.base = f"http://127.0.0.1:{port}"
        self.proc: Proc | None = None
        self.c = httpx.Client(base_url=self.base, timeout=30, headers=auth())
        self.responses: list[str] = []  # every body this test read from the API

    def start(self) -> None:
        self.proc = Proc([sys.executable, "-m", "app.serve"], self.env, self.home / "serve.log", cwd=self.home)
        self.proc.wait_for("Uvicorn running", timeout=60)
        self.proc.wait_for("ready on queue", timeout=90)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        r = self.c.get(path, **kw)
        self.responses.append(r.text)
        return r

    def post(self, path: str, **kw: Any) -> httpx.Response:
        r = self.c.post(path, **kw)
        self.responses.append(r.text)
        return r

    def job(self, job_id: str) -> dict:
        return self.get(f"/v1/jobs/{job_id}").json()

    def submit(self, **body: Any) -> dict:
        r = self.post("/v1/jobs", json={"model": "tiny-moe", **FAST_JOB, **body})
        assert r.status_code == 202, r.text
        return r.json()

    def sse(self, job_id: str, last_event_id: int | None = None) -> list[dict]:
        events, cur = [], {}
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id else {}
        with self.c.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=300) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                self.responses.append(line)
                if not line:
                    if "event" in cur:
                        events.append(cur)
                    cur = {}
                elif line.startswith(("event:", "id:", "data:")):
                    k, v = line.split(":", 1)
                    cur[k] = json.loads(v) if k == "data" else v.strip()
        return events


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_root: Path, hub) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("embedded")
    port = free_port()
    env = service_env(home / ".mopeq", model_root, hub_url=hub.url, MOPEQ_PORT=port,
                      MOPEQ_DEBUG_STAGE_DELAY=f"{DELAY_STAGE}:5")
    env.pop("MOPEQ_QUEUE")  # the embedded defaults: queue "gpu", SQLite, filesystem broker
    srv = Server(home, env, port)
    srv.start()
    yield srv
    if srv.proc is not None:
        srv.proc.stop()


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_submit_follow_and_download(server: Server) -> None:
    job = server.submit()
    events = server.sse(job["id"])
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "end" and events[-1]["data"] == {"status": "succeeded"}, kinds
    stages = [e["data"]["stage"] for e in events if e["event"] == "stage"]
    assert stages == ["fetch", "calibrate", "sensitivity", "allocate", "quantize", "evaluate", "export"]
    progress = [e["data"]["progress"] for e in events if e["event"] in ("stage", "progress")]
    assert progress == sorted(progress) and 0 <= progress[0] and progress[-1] <= 1

    done = server.job(job["id"])
    assert done["status"] == "succeeded" and done["progress"] == 1.0 and done["attempts"] == 1
    assert set(done["timings"]) >= {"fetch", "calibrate", "sensitivity", "allocate", "quantize", "export"}
    art_dir = server.home / ".mopeq" / "artifacts" / job["id"]
    bitmap = json.loads((art_dir / "bitmap.json").read_text())
    assert server.get(f"/v1/jobs/{job['id']}/bitmap").json() == bitmap
    assert done["result"]["avg_bits"] == bitmap["avg_bits"]

    allocs = server.get(f"/v1/jobs/{job['id']}/allocations").json()
    expected = [{"layer": la["layer"], "module": la["module"], "expert": e["expert"], "bits": e["bits"],
                 "sensitivity": e["sensitivity"], "frequency": e["frequency"], "params": e["params"]}
                for la in bitmap["layers"] for e in la["experts"]]
    assert allocs == expected and len(allocs) == 8

    arts = server.get(f"/v1/jobs/{job['id']}/artifacts").json()
    on_disk = {p.relative_to(art_dir).as_posix(): p for p in art_dir.rglob("*") if p.is_file()}
    assert {a["name"] for a in arts} == set(on_disk)
    assert {"bitmap.json", "report.json", "README.md", "config.json"} <= set(on_disk)
    for a in arts:
        assert a["sha256"] == _sha(on_disk[a["name"]]) and a["bytes"] == on_disk[a["name"]].stat().st_size
    r = server.c.get(f"/v1/jobs/{job['id']}/artifacts/bitmap.json")
    assert r.status_code == 200 and r.headers["x-checksum-sha256"] == hashlib.sha256(r.content).hexdigest()
    assert server.c.get(f"/v1/jobs/{job['id']}/artifacts/../../secret_key").status_code == 404
    assert server.c.get(f"/v1/jobs/{job['id']}/artifacts/%2e%2e/%2e%2e/secret_key").status_code == 404
    # temporary files are gone; the artifact store keeps the result
    assert not (server.home / ".mopeq" / "work" / job["id"]).exists()
    # SSE resume from the middle replays exactly the rest
    ids = [int(e["id"]) for e in events if "id" in e]
    tail = server.sse(job["id"], last_event_id=ids[4])
    assert [int(e["id"]) for e in tail if "id" in e] == ids[5:]


def test_delete_a_finished_job_removes_its_local_files(server: Server) -> None:
    jobs = server.get("/v1/jobs?status=succeeded").json()["items"]
    assert jobs
    job_id = jobs[-1]["id"]
    art_dir = server.home / ".mopeq" / "artifacts" / job_id
    assert (art_dir / "bitmap.json").is_file()
    r = server.c.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 204, r.text
    assert not art_dir.exists()
    assert server.c.get(f"/v1/jobs/{job_id}").status_code == 404
    assert server.c.delete(f"/v1/jobs/{job_id}").status_code == 404


def test_cancel_mid_run_cleans_files(server: Server) -> None:
    job = server.submit()
    wait_until(lambda: server.job(job["id"])["stage"] == DELAY_STAGE, 120, f"stage {DELAY_STAGE}")
    work = server.home / ".mopeq" / "work" / job["id"]
    assert (work / "state" / "calibrate.done").exists(), "finished stages left their files"
    r = server.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"] is True
    done = wait_status(lambda: server.job(job["id"]), ("cancelled", "succeeded", "failed"), 60)
    assert done["status"] == "cancelled", done
    # only the stage files stay, for a retry (MOPEQ_RETRY_STATE_HOURS); no artifact is left
    assert [p.name for p in work.iterdir()] == ["state"]
    assert not (server.home / ".mopeq" / "artifacts" / job["id"]).exists()
    assert server.get(f"/v1/jobs/{job['id']}/artifacts").json() == []
    assert server.get(f"/v1/jobs/{job['id']}/allocations").json() == []
    assert server.c.delete(f"/v1/jobs/{job['id']}").status_code == 204
    wait_until(lambda: not work.exists(), 30, "the worker's sweep to remove a deleted job's stage files")


def test_push_and_the_token_appears_nowhere(server: Server, hub) -> None:
    job = server.submit(hf_token=HF_TOKEN, push={"private": True})
    done = wait_status(lambda: server.job(job["id"]), ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done
    repo = hub.repos["tester/tiny-moe-MoPEQ-3b"]
    art_dir = server.home / ".mopeq" / "artifacts" / job["id"]
    assert repo.private and repo.files == {p.relative_to(art_dir).as_posix(): p.read_bytes()
                                           for p in art_dir.rglob("*") if p.is_file()}
    arts = server.get(f"/v1/jobs/{job['id']}/artifacts").json()
    hub_art = [a for a in arts if a["kind"] == "hub"]
    assert len(hub_art) == 1 and hub_art[0]["hub_repo"] == repo.repo_id and hub_art[0]["hub_commit"] == repo.sha
    assert any(r["authorization"] == f"Bearer {HF_TOKEN}" for r in hub.requests), "the job's token was used"

    server.sse(job["id"])
    db = server.home / ".mopeq" / "mopeq.db"
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT hf_token_enc FROM jobs WHERE id = ?", (job["id"],)).fetchone() == (None,)
        dump = "\n".join(con.iterdump())
    finally:
        con.close()
    assert HF_TOKEN not in dump
    for f in (server.home / ".mopeq").rglob("*"):  # database files (with WAL), logs, artifacts, broker
        if f.is_file():
            assert HF_TOKEN.encode() not in f.read_bytes(), f
    assert HF_TOKEN not in server.proc.text()  # API and worker logs
    assert all(HF_TOKEN not in body for body in server.responses)


def test_a_failed_push_is_retried(server: Server, hub) -> None:
    hub.fail_next = [503, 502]  # the Hub hiccups twice on repo creation
    job = server.submit(hf_token=HF_TOKEN, push={"repo_id": "tester/retried", "private": False})
    done = wait_status(lambda: server.job(job["id"]), ("succeeded", "failed", "cancelled"), timeout=420)
    assert done["status"] == "succeeded" and done["attempts"] == 3, done
    assert "tester/retried" in hub.repos and not hub.fail_next
    msgs = [e["data"]["message"] for e in server.sse(job["id"]) if e["event"] == "status"]
    assert sum("transient error" in (m or "") for m in msgs) == 2, msgs
    arts = server.get(f"/v1/jobs/{job['id']}/artifacts").json()
    assert [a["hub_repo"] for a in arts if a["kind"] == "hub"] == ["tester/retried"]


def test_a_refused_push_fails_the_job_and_lists_no_removed_file(server: Server, hub) -> None:
    hub.fail_next = [403]  # the Hub refuses the repo creation: the job fails after its files were recorded
    job = server.submit(hf_token=HF_TOKEN, push={"repo_id": "tester/refused", "private": False})
    done = wait_status(lambda: server.job(job["id"]), ("succeeded", "failed", "cancelled"), timeout=300)
    assert done["status"] == "failed" and "refused the push" in done["error"], done
    assert server.get(f"/v1/jobs/{job['id']}/artifacts").json() == []
    assert not (server.home / ".mopeq" / "artifacts" / job["id"]).exists()


def test_shutdown_requeues_a_running_job_which_resumes(server: Server) -> None:
    job = server.submit()
    wait_until(lambda: server.job(job["id"])["stage"] == DELAY_STAGE, 120, f"stage {DELAY_STAGE}")
    assert server.proc.stop(timeout=60) == 0
    with sqlite3.connect(server.home / ".mopeq" / "mopeq.db") as con:
        status, worker = con.execute("SELECT status, worker_id FROM jobs WHERE id = ?", (job["id"],)).fetchone()
        alive = con.execute("SELECT count(*) FROM workers WHERE stopped_at IS NULL").fetchone()[0]
    assert (status, worker, alive) == ("queued", None, 0)
    server.start()
    done = wait_status(lambda: server.job(job["id"]), ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    msgs = [e["data"]["message"] for e in server.sse(job["id"]) if e["event"] == "status"]
    assert any("shutting down" in (m or "") for m in msgs) and any("resumed" in (m or "") for m in msgs), msgs
