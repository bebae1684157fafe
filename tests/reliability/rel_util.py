"""Helpers of the reliability tests and of scripts/soak.py: throwaway PostgreSQL and Redis servers that a test may
stop and restart (never the machine's shared ones), a fork server for worker processes, a cluster (API process,
workers, Hub mock) and the audit that counts lost jobs, jobs stuck in ``running`` and duplicate artifacts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
SERVICE_TESTS = HERE.parent / "service"
for _p in (str(SERVICE_TESTS), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from svc_util import (
    BOOT_KEY,
    FAST_JOB,
    HF_TOKEN,
    REPO,
    Proc,
    auth,
    free_port,
    service_env,
    settings_from_env,
    wait_until,
)

TERMINAL = ("succeeded", "failed", "cancelled")
STAGES = ("fetch", "calibrate", "sensitivity", "allocate", "quantize", "evaluate", "export", "push")


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not cands:
        raise FileNotFoundError(f"PostgreSQL's {name} was not found (apt-get install postgresql)")
    return str(cands[-1])


def _as_postgres() -> dict[str, Any]:
    """PostgreSQL refuses to run as root: run its programs as the 'postgres' user then."""
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


def _wait_port(port: int, timeout: float = 30) -> None:
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class PgServer:
    """A private PostgreSQL cluster in a temporary directory, on its own port (trust auth, loopback only)."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="mopeq-rel-pg-"))
        self.data = self.base / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.base / "postgres.log"
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        subprocess.run([_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                        "--no-sync", "--no-instructions"], check=True, capture_output=True, **_as_postgres())
        self.start()
        import psycopg

        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE mopeq")

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/mopeq"

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - inherited by the server
        self.proc = subprocess.Popen(
            [_pg_bin("postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.base),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off",
             "-c", "synchronous_commit=off", "-c", "max_connections=200"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **_as_postgres())
        log.close()
        import psycopg

        end = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(self.admin_dsn, connect_timeout=2).close()
                return
            except Exception:  # noqa: BLE001
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"postgres did not start:\n{self.log_path.read_text()[-3000:]}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: clients are disconnected
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


class RedisServer:
    """A private, non-persistent Redis on its own port: a restart loses every message, as a crash would."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="mopeq-rel-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self.base / "redis.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(self.base)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        _wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # a crash: no chance to save anything
            self.proc.wait(10)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


# ---- worker processes ----------------------------------------------------------------------------------------------
class Zygote:
    """Client of tests/reliability/zygote.py: forks warm worker processes."""

    def __init__(self, env: dict[str, str], log: Path):
        self._log = open(log, "ab")  # noqa: SIM115
        self.p = subprocess.Popen([sys.executable, str(HERE / "zygote.py")], env=env, cwd=REPO,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                  start_new_session=True)
        line = self.p.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the zygote died: see {log}")
        assert json.loads(line)["ready"]

    def spawn(self, env: dict[str, str], log: Path) -> int:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(json.dumps({"env": env, "log": str(log), "cwd": str(REPO)}) + "\n")
        self.p.stdin.flush()
        return int(json.loads(self.p.stdout.readline())["pid"])

    def exit_code(self, pid: int) -> int | None:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(json.dumps({"status": pid}) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())["exit"]

    def close(self) -> None:
        if self.p.poll() is None:
            assert self.p.stdin is not None
            self.p.stdin.close()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self._log.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (not reaped yet) is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ZWorker:
    """A worker process forked by the zygote (the same surface as svc_util.Proc)."""

    def __init__(self, pid: int, log: Path, offset: int, zygote: Zygote):
        self.pid, self.log_path, self._offset, self.zygote = pid, log, offset, zygote

    @property
    def returncode(self) -> int | None:
        return self.zygote.exit_code(self.pid)

    def text(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def wait_for(self, needle: str, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if needle in self.text():
                return
            if not self.alive():
                raise AssertionError(f"worker {self.pid} exited before '{needle}':\n{self.text()[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for '{needle}':\n{self.text()[-4000:]}")

    def wait_gone(self, timeout: float = 30) -> None:
        wait_until(lambda: not self.alive(), timeout, f"worker {self.pid} to exit")

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.wait_gone(10)

    def stop(self, timeout: float = 30) -> None:
        if not self.alive():
            return
        os.kill(self.pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while self.alive() and time.monotonic() < end:
            time.sleep(0.1)
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.wait_gone(10)


# ---- the cluster ---------------------------------------------------------------------------------------------------
@dataclass
class Cluster:
    """API process (``python -m app.serve --no-worker``) + workers, on a private PostgreSQL and Redis."""

    home: Path
    model_root: Path
    pg: PgServer
    redis: RedisServer
    hub: Any
    env: dict[str, str] = field(default_factory=dict)
    api: Proc | None = None
    zygote: Zygote | None = None
    workers: list[Any] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)
    base: str = ""

    def __post_init__(self) -> None:
        port = free_port()
        self.env = service_env(self.home, self.model_root, database_url=self.pg.url, broker_url=self.redis.url,
                               queue=f"gpu-{uuid.uuid4().hex[:8]}", hub_url=self.hub.url, MOPEQ_PORT=port,
                               MOPEQ_HEARTBEAT_STALE_S=20, MOPEQ_TRANSIENT_RETRIES=8, MOPEQ_MAX_RECOVERIES=3)
        self.env.pop("HF_HUB_OFFLINE", None)
        self.base = f"http://127.0.0.1:{port}"
        self.settings = settings_from_env(self.env)
        self.http = httpx.Client(base_url=self.base, timeout=30, headers=auth())
        from app.db.session import make_engine, make_sessionmaker

        self.engine = make_engine(self.pg.url)
        self.factory = make_sessionmaker(self.engine)

    # processes
    def start_api(self) -> None:
        self.api = Proc([sys.executable, "-m", "app.serve", "--no-worker"], self.env, self.home / "api.log")
        self.api.wait_for("Uvicorn running", timeout=90)

    def start_zygote(self) -> None:
        self.zygote = Zygote(self.env, self.home / "zygote.log")

    def worker(self, name: str, cold: bool = False, **env: Any) -> Any:
        """Start a worker and wait until it consumes. ``cold`` starts ``python -m worker`` afresh; otherwise it is
        forked from the warm zygote."""
        wenv = {**self.env, **{k: str(v) for k, v in env.items()}}
        log = self.home / f"worker-{name}.log"
        if cold or self.zygote is None:
            w: Any = Proc([sys.executable, "-m", "worker"], wenv, log)
        else:
            log.touch()
            offset = log.stat().st_size
            w = ZWorker(self.zygote.spawn(wenv, log), log, offset, self.zygote)
        self.workers.append(w)  # tracked at once: stopped at the end even if it never gets ready
        w.wait_for("ready on queue", timeout=120)
        return w

    def stop_workers(self) -> None:
        for w in self.workers:
            w.stop(timeout=20)
        self.workers.clear()

    def close(self) -> None:
        self.stop_workers()
        if self.zygote is not None:
            self.zygote.close()
        if self.api is not None:
            self.api.stop()
        self.http.close()
        self.engine.dispose()

    # API
    def submit(self, key: str = BOOT_KEY, **body: Any) -> str:
        payload = {"model": str(self.model_root / "tiny-moe"), **FAST_JOB, **body}
        r = self.http.post("/v1/jobs", json=payload, headers=auth(key))
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        self.submitted.append(job_id)
        return job_id

    def job(self, job_id: str) -> dict:
        """The job row (read from the database, so that it works while the API is down or degraded)."""
        from app.db.models import Job

        with self.factory() as db:
            j = db.get(Job, job_id)
            assert j is not None, job_id
            return {c: getattr(j, c) for c in ("id", "status", "stage", "worker_id", "attempts", "recoveries",
                                               "error", "error_code", "enqueued_at", "push_repo_id")}

    def wait_stage(self, job_id: str, stage: str, timeout: float = 120) -> dict:
        def hit() -> dict | None:
            j = self.job(job_id)
            if j["status"] in TERMINAL:
                raise AssertionError(f"job ended before stage {stage}: {j}")
            return j if j["status"] == "running" and j["stage"] == stage else None

        return wait_until(hit, timeout, f"job {job_id} to run stage {stage}")

    def wait_final(self, job_ids: list[str] | str, timeout: float = 180) -> list[dict]:
        ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
        end = time.monotonic() + timeout
        while True:
            rows = [self.job(i) for i in ids]
            if all(r["status"] in TERMINAL for r in rows) or time.monotonic() > end:
                return rows
            time.sleep(0.3)

    def events(self, job_id: str) -> list[Any]:
        from sqlalchemy import select

        from app.db.models import JobEvent

        with self.factory() as db:
            return list(db.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))

    # the audit
    def audit(self, job_ids: list[str] | None = None) -> dict[str, Any]:
        return audit(self.factory, self.settings, self.hub, job_ids or self.submitted)


def app_routes(include_hidden: bool = True) -> set[tuple[str, str]]:
    """Every (method, path) the app serves, read from its router (FastAPI keeps included routers nested: walk
    them), with path converters removed ('{name:path}' -> '{name}')."""
    import re

    from app.main import create_app

    with tempfile.TemporaryDirectory(prefix="mopeq-routes-") as home:
        app = create_app(settings_from_env(service_env(Path(home), Path("/nonexistent"))))
        app.state.engine.dispose()
    try:
        from fastapi.routing import iter_route_contexts

        routes: list[Any] = list(iter_route_contexts(app.routes))
    except ImportError:  # older FastAPI: a flat list
        routes = list(app.routes)
    out = set()
    for r in routes:
        if not include_hidden and not getattr(r, "include_in_schema", True):
            continue
        for m in getattr(r, "methods", None) or ():
            if m not in ("HEAD", "OPTIONS"):
                out.add((m, re.sub(r"\{(\w+):[^}]+\}", r"{\1}", r.path)))
    return out


def audit(factory: Any, settings: Any, hub: Any, job_ids: list[str]) -> dict[str, Any]:
    """Counts over the given jobs: lost (accepted but unknown, or not final), stuck in running, duplicate artifacts
    (an artifact row twice, files and rows that differ, two Hub pushes or two Hub commits of one job, files left by a
    job that did not succeed), and the final states."""
    from sqlalchemy import select

    from app.db.models import Artifact, Job

    out: dict[str, Any] = {"jobs": len(job_ids), "lost": 0, "stuck_running": 0, "duplicate_artifacts": 0,
                           "final": Counter(), "problems": []}
    with factory() as db:
        for job_id in job_ids:
            job = db.get(Job, job_id)
            if job is None:
                out["lost"] += 1
                out["problems"].append(f"{job_id}: not in the database")
                continue
            out["final"][job.status] += 1
            if job.status == "running":
                out["stuck_running"] += 1
                out["problems"].append(f"{job_id}: still running (stage {job.stage})")
            elif job.status == "queued":
                out["lost"] += 1
                out["problems"].append(f"{job_id}: still queued (enqueued_at {job.enqueued_at})")
            arts = list(db.scalars(select(Artifact).where(Artifact.job_id == job_id)))
            keys = Counter((a.kind, a.name) for a in arts)
            dups = sum(n - 1 for n in keys.values() if n > 1)
            hub_rows = [a for a in arts if a.kind == "hub"]
            dups += max(0, len(hub_rows) - 1)
            art_dir = settings.artifact_dir / job_id
            on_disk = sorted(p.relative_to(art_dir).as_posix() for p in art_dir.rglob("*") if p.is_file()) \
                if art_dir.exists() else []
            if job.status == "succeeded":
                rows = sorted(a.name for a in arts if a.kind == "file")
                if rows != on_disk:
                    dups += 1
                    out["problems"].append(f"{job_id}: artifact rows {rows} != files {on_disk}")
            elif on_disk or arts:
                dups += 1
                out["problems"].append(f"{job_id}: {job.status} but left {len(on_disk)} files, {len(arts)} rows")
            if hub is not None and hub_rows:
                repo = hub.repos.get(hub_rows[0].hub_repo)
                commits = sum(1 for m in (repo.commit_messages if repo else []) if m.startswith("MoPEQ"))
                if commits != 1:
                    dups += abs(commits - 1)
                    out["problems"].append(f"{job_id}: {commits} Hub commits in {hub_rows[0].hub_repo}")
            if dups:
                out["duplicate_artifacts"] += dups
    out["final"] = dict(out["final"])
    return out


__all__ = [
    "BOOT_KEY",
    "FAST_JOB",
    "HF_TOKEN",
    "REPO",
    "STAGES",
    "TERMINAL",
    "Cluster",
    "PgServer",
    "RedisServer",
    "ZWorker",
    "Zygote",
    "app_routes",
    "audit",
    "auth",
    "free_port",
    "pid_alive",
    "wait_until",
]
