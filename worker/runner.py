"""Runs one job: claim -> QuantizeConfig -> run_quantization (stage files in the work dir, so a redelivered job
resumes) -> allocation and artifact rows -> push -> final status. Progress and stage events go to job_events; the
cancel flag and the job timeout are polled from inside the pipeline's hooks."""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import DBAPIError, OperationalError

from app.core.security import forget_secret, redact, register_secret
from app.db.models import Artifact, ExpertAllocation, Job, utcnow
from app.services import job_settings, job_state, tenant_files
from app.services.errors import error_code
from app.services.events import add_event
from app.services.storage import StoredFile, get_store, tree_bytes
from mopeq_core.errors import CancelledError, UserInputError
from worker.context import Current, WorkerContext
from worker.recovery import claim, remove_job_files

if TYPE_CHECKING:
    from mopeq_core.engine import RunSummary

log = logging.getLogger("mopeq.worker")
STAGE_ORDER = ("fetch", "calibrate", "sensitivity", "allocate", "quantize", "evaluate", "export", "upload", "push")


class TransientError(Exception):
    """The database, broker or Hub hiccuped; Celery retries the task (the claim was released)."""


class DiskSpaceError(Exception):
    pass


class _Stop(Exception):
    """Internal: the job was finished elsewhere (lost claim)."""


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (OperationalError,)) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return True
    try:
        from kombu.exceptions import OperationalError as KombuOperationalError

        if isinstance(exc, KombuOperationalError):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:  # the object store: connection trouble, throttling and its 5xx answers pass
        from botocore.exceptions import ClientError, ReadTimeoutError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        if isinstance(exc, (BotoConnectionError, ReadTimeoutError)):
            return True
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {}) or {}
            status = int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            return status >= 500 or err.get("Code") in ("SlowDown", "RequestTimeout", "Throttling")
    except ImportError:  # pragma: no cover
        pass
    try:
        from boto3.exceptions import S3UploadFailedError

        if isinstance(exc, S3UploadFailedError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, (ConnectionError, TimeoutError))


def _parse_delays(spec: str) -> dict[str, tuple[float, bool]]:
    """``stage:seconds`` pauses at the start of a stage, polling cancel and the timeout; ``stage:seconds:hang``
    sleeps without polling (code that never checks: only the watchdog can end it)."""
    out: dict[str, tuple[float, bool]] = {}
    for part in spec.split(","):
        bits = [b.strip() for b in part.split(":")]
        if len(bits) in (2, 3):
            try:
                out[bits[0]] = (float(bits[1]), len(bits) == 3 and bits[2] == "hang")
            except ValueError:
                pass
    return out


class JobRun:
    def __init__(self, ctx: WorkerContext, job_id: str):
        self.ctx = ctx
        self.s = ctx.settings
        self.job_id = job_id
        self.token: str | None = None
        self.stage: str | None = None
        self.stage_started = time.monotonic()
        self.timings: dict[str, float] = {}
        self.last_progress_write = 0.0
        self.last_cancel_check = 0.0
        self.cancel_flag = False
        self.timed_out = False
        self.started = time.monotonic()
        self.delays = _parse_delays(self.s.DEBUG_STAGE_DELAY)
        self.store = get_store(self.s)
        self.attempt = 1
        # local store: the engine writes into the shared artifact directory; S3: into this worker's own work dir,
        # and the files reach the API only through the bucket (uploaded by _record_results)
        self.out_dir = self.store.output_dir(job_id)
        self.state_dir = self.s.work_dir / job_id / "state"
        self.model_view = self.s.work_dir / job_id / "model"

    # ---- database helpers -----------------------------------------------------------------------------------------
    def _mine(self):
        return (Job.id == self.job_id, Job.worker_id == self.ctx.worker_id, Job.status == "running")

    def _update(self, event: dict[str, Any] | None = None, **values: Any) -> bool:
        with self.ctx.factory() as db, db.begin():
            res = db.execute(update(Job).where(*self._mine()).values(updated_at=utcnow(), **values))
            if res.rowcount == 1 and event is not None:
                add_event(db, self.job_id, **event)
            return res.rowcount == 1

    def _transition(self, db: Any, to: str, message: str, **values: Any) -> bool:
        """This worker's claimed job from running to ``to`` (the state machine writes it with its event)."""
        return job_state.transition(db, self.job_id, to, expect="running",
                                    where=(Job.worker_id == self.ctx.worker_id,), message=message,
                                    event_stage=self.stage, timings=self.timings, **values)

    def _finish(self, status: str, message: str, *, error: str | None = None, code: str | None = None,
                **values: Any) -> bool:
        with self.ctx.factory() as db, db.begin():
            ok = self._transition(db, status, message, error=error, error_code=code, **values)
        if not ok:
            log.warning("job %s: could not record '%s' (claim lost)", self.job_id, status)
        return ok

    # ---- hooks given to the pipeline ------------------------------------------------------------------------------
    def on_event(self, ev: Any) -> None:
        stage = getattr(ev, "stage", None)
        overall = float(getattr(ev, "overall", 0.0) or 0.0)
        message = getattr(ev, "message", None)
        now = time.monotonic()
        if stage != self.stage:
            if self.stage is not None:
                self.timings[self.stage] = round(self.timings.get(self.stage, 0.0) + now - self.stage_started, 3)
            self.stage, self.stage_started = stage, now
            self._update({"kind": "stage", "stage": stage, "progress": overall,
                          "message": redact(message) if message else f"stage {stage} started"},
                         stage=stage, progress=overall, timings=self.timings)
            self.last_progress_write = now
            self._debug_delay(stage)
        elif now - self.last_progress_write >= 1.0 or message:
            self._update({"kind": "progress", "stage": stage, "progress": overall,
                          "message": redact(message) if message else None}, progress=overall)
            self.last_progress_write = now
        self._raise_if_stopping()

    def _debug_delay(self, stage: str | None) -> None:
        secs, hang = self.delays.get(stage or "", (0.0, False))
        if not secs:
            return
        log.info("job %s: fault-injection %s of %.1f s at the start of %s", self.job_id,
                 "hang" if hang else "delay", secs, stage)
        if hang:
            time.sleep(secs)
            return
        end = time.monotonic() + secs
        while time.monotonic() < end:
            time.sleep(0.1)
            self._raise_if_stopping()

    def should_cancel(self) -> bool:
        now = time.monotonic()
        cur = self.ctx.current
        if cur is not None and cur.lost_claim:
            return True
        if self.ctx.shutdown.is_set():
            return True
        if now - self.started > self.s.JOB_TIMEOUT_S:
            self.timed_out = True
            return True
        if now - self.last_cancel_check >= 0.5:
            self.last_cancel_check = now
            with self.ctx.factory() as db:
                self.cancel_flag = bool(db.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
        return self.cancel_flag

    def _raise_if_stopping(self) -> None:
        if self.should_cancel():
            raise CancelledError("stopped")

    # ---- the run ---------------------------------------------------------------------------------------------------
    def run(self) -> str:
        if not claim(self.ctx, self.job_id):
            with self.ctx.factory() as db:
                job = db.get(Job, self.job_id)
            log.info("job %s not claimed (%s); nothing to do", self.job_id,
                     "unknown job" if job is None else f"status {job.status}, worker {job.worker_id}")
            return "skipped"
        self.ctx.current = Current(self.job_id, time.monotonic())
        try:
            return self._run_claimed()
        finally:
            self.ctx.current = None
            forget_secret(self.token)
            self.token = None
            _free_memory()

    def _run_claimed(self) -> str:
        with self.ctx.factory() as db:
            job = db.get(Job, self.job_id)
            assert job is not None
            db.expunge(job)
        self.timings = dict(job.timings or {})
        self.stage = job.stage
        self.attempt = job.attempts
        try:
            if job.hf_token_enc:
                self.token = self.ctx.keyring.decrypt(job.hf_token_enc)
                register_secret(self.token)
            if job.cancel_requested:
                raise CancelledError("cancelled before start")
            cfg = self._config(job)
            self._check_disk(job)
            from mopeq_core.engine import run

            if job.retry_of:
                self._adopt_stages(job.retry_of)
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            result = run(cfg, self.out_dir, state_dir=self.state_dir, on_event=self.on_event,
                         should_cancel=self.should_cancel, model_identity=self._model_identity(job, cfg))
            self._check_quota_after_export()
            self._close_stage()
            self._hide_server_paths(job)
            self._record_results(job, result)
            if job.push_requested:
                self._push(job)
            self._close_stage()
            ok = self._finish("succeeded", "job succeeded", progress=1.0, stage=None)
            shutil.rmtree(self.s.work_dir / self.job_id, ignore_errors=True)
            return "succeeded" if ok else "lost"
        except CancelledError:
            return self._stopped()
        except UserInputError as exc:
            msg = redact(str(exc))
            self._finish("failed", f"failed: {msg}", error=msg, code=error_code(exc))
            remove_job_files(self.ctx, self.job_id, keep_stages=True)
            return "failed"
        except DiskSpaceError as exc:
            self._finish("failed", f"failed: {exc}", error=str(exc), code="disk_space")
            remove_job_files(self.ctx, self.job_id)
            return "failed"
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                msg = redact(f"disk full in stage {self.stage or 'setup'}: {exc}; the job's files were removed")
                self._finish("failed", f"failed: {msg}", error=msg, code="disk_space")
                remove_job_files(self.ctx, self.job_id)
                return "failed"
            if _is_transient(exc):
                self._release(f"transient error ({type(exc).__name__}); the job will be retried")
                raise TransientError(redact(f"{type(exc).__name__}: {exc}")[:500]) from None
            log.exception("job %s failed in stage %s", self.job_id, self.stage)
            msg = redact(f"internal error in stage {self.stage or 'setup'}: {type(exc).__name__}: {exc}")[:2000]
            self._finish("failed", msg, error=msg, code="internal")
            remove_job_files(self.ctx, self.job_id, keep_stages=True)
            return "failed"

    def _close_stage(self) -> None:
        if self.stage is not None:
            self.timings[self.stage] = round(self.timings.get(self.stage, 0.0) + time.monotonic()
                                             - self.stage_started, 3)
            self.stage_started = time.monotonic()

    def _stopped(self) -> str:
        cur = self.ctx.current
        if cur is not None and cur.lost_claim:
            log.warning("job %s: stopped, another worker owns it now", self.job_id)
            return "lost"
        if self.timed_out:
            msg = f"job timed out after {self.s.JOB_TIMEOUT_S} s (MOPEQ_JOB_TIMEOUT_S)"
            self._finish("failed", msg, error=msg, code="timeout")
            remove_job_files(self.ctx, self.job_id, keep_stages=True)
            return "failed"
        if self.ctx.shutdown.is_set() and not self.cancel_flag:
            with self.ctx.factory() as db:
                cancel = bool(db.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
            if not cancel:
                self._release("worker shutting down; the job is re-queued and resumes from its last finished "
                              "stage", republish=True)
                return "released"
        self._close_stage()
        with self.ctx.factory() as db, db.begin():
            if self._transition(db, "cancelled", "cancelled; its files were removed (its stage files stay for a retry)",
                                error="cancelled by the user", error_code="cancelled"):
                db.execute(delete(ExpertAllocation).where(ExpertAllocation.job_id == self.job_id))
                db.execute(delete(Artifact).where(Artifact.job_id == self.job_id))
        remove_job_files(self.ctx, self.job_id, keep_stages=True)
        return "cancelled"

    def _release(self, message: str, republish: bool = False) -> None:
        try:
            with self.ctx.factory() as db, db.begin():
                # A Celery retry publishes the task again itself (enqueued_at set); otherwise publish below.
                self._transition(db, "queued", message, worker_id=None, heartbeat_at=None,
                                 enqueued_at=None if republish else utcnow())
        except Exception as exc:  # noqa: BLE001 - the database may be what failed; the sweep recovers it later
            log.warning("job %s: could not release the claim (%s)", self.job_id, type(exc).__name__)
            return
        if republish:
            from worker.recovery import _publish

            _publish(self.ctx, self.job_id)

    # ---- pieces ----------------------------------------------------------------------------------------------------
    def _config(self, job: Job):
        if job.model_source == "local":
            # The engine reads a private copy made from files checked as they were opened, never the tenant's
            # directory itself (app.services.tenant_files); data files are checked the same way.
            roots = self.s.model_roots
            view = tenant_files.snapshot_model_dir(Path(job.model_path or job.model), self.model_view, roots,
                                                   where=job.model)
            model, revision = str(view), None
        else:
            model, revision = job.model, job.resolved_revision or job.revision
        cfg = job_settings.to_config(job.settings, model=model, revision=revision, device=self._device(),
                                     allow_pickle=self.s.ALLOW_PICKLE, token=self.token)
        for what, data in (("calibration file", cfg.calib_file), ("evaluation file", cfg.eval_file)):
            if data:
                tenant_files.check_file(Path(data), self.s.model_roots, where=what)
        cfg.validate()
        return cfg

    def _model_identity(self, job: Job, cfg: Any) -> str:
        """What the engine's stage fingerprint names as the model: the model as submitted, with the size and mtime
        of its files when local (the per-job snapshot's path changes, its files may not) and of the data files."""
        files: list[tuple[str, Path]] = []
        if job.model_source == "local":
            files += tenant_files.model_files(Path(job.model_path or job.model), self.s.model_roots, where=job.model)
        files += [(p, Path(p)) for p in (cfg.calib_file, cfg.eval_file) if p]
        h = hashlib.sha256()
        for name, path in sorted(files):
            st = path.stat()
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        return f"{job.model}@{h.hexdigest()[:32]}"

    def _adopt_stages(self, old_id: str) -> None:
        """A retry starts from the stage files its failed or cancelled job left on this worker (the engine reuses
        those whose fingerprint, i.e. inputs and settings, still match). Not here (another machine, pruned): the
        job starts from the beginning. An attempt that already has stage files of its own keeps them."""
        src = self.s.work_dir / old_id / "state"
        if (self.state_dir / "config.sha256").exists() or not (src / "config.sha256").is_file():
            return
        try:
            shutil.copytree(src, self.state_dir, dirs_exist_ok=True)
        except OSError as exc:  # pruned meanwhile: start fresh
            log.warning("job %s: could not copy the stage files of job %s (%s)", self.job_id, old_id, exc)
            shutil.rmtree(self.state_dir, ignore_errors=True)
            return
        done = [s for s in STAGE_ORDER if (self.state_dir / f"{s}.done").exists()]
        self._update({"kind": "log", "message": f"retry of job {old_id}: its finished stages ({', '.join(done)}) "
                                                "are reused where the inputs are unchanged"})

    def _device(self) -> str:
        dev = self.s.WORKER_DEVICE
        if dev != "auto":
            return dev
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def _check_disk(self, job: Job) -> None:
        def free(p: Path) -> int:
            p = p if p.exists() else next((q for q in p.parents if q.exists()), Path("/"))
            return shutil.disk_usage(p).free

        margin = int(self.s.MIN_FREE_DISK_GB * 1e9)
        need_out = int((job.est_output_bytes or 0) * 1.2) + margin
        have_out = free(self.out_dir)
        if have_out < need_out:
            raise DiskSpaceError(f"not enough disk space for the output on the worker: need {need_out / 1e9:.2f} GB "
                                 f"(estimate + MOPEQ_MIN_FREE_DISK_GB), have {have_out / 1e9:.2f} GB")
        quota = self.s.ARTIFACT_MAX_BYTES
        if quota > 0:
            used = self.store.used_bytes(exclude_job=self.job_id)
            need = int((job.est_output_bytes or 0) * 1.2)
            if used + need > quota:
                raise DiskSpaceError(f"the artifact store is full: {used} of MOPEQ_ARTIFACT_MAX_BYTES={quota} bytes "
                                     f"are used and this job's output needs about {need} more")
        if job.model_source == "hub" and job.est_download_bytes:
            from huggingface_hub import constants

            cache = Path(constants.HF_HUB_CACHE)
            need = int(job.est_download_bytes * 1.05) + margin
            have = free(cache)
            if have < need:
                raise DiskSpaceError(f"not enough disk space to download the model into {cache}: need "
                                     f"{need / 1e9:.2f} GB, have {have / 1e9:.2f} GB")

    def _check_quota_after_export(self) -> None:
        """The store may have filled up while the job ran (other jobs, other writers): refuse a result that does not
        fit the quota, before any artifact row is written (the caller removes the job's files)."""
        quota = self.s.ARTIFACT_MAX_BYTES
        if quota <= 0:
            return
        mine = tree_bytes(self.out_dir)
        used = self.store.used_bytes(exclude_job=self.job_id) + mine
        if used > quota:
            raise DiskSpaceError(f"the artifact store is full: {used} bytes used (this job's output: {mine}) > "
                                 f"MOPEQ_ARTIFACT_MAX_BYTES={quota}; the job's files were removed")

    def _hide_server_paths(self, job: Job) -> None:
        """Tenants see no server paths: the artifact's text files name the model as it was submitted and the
        output directory as '.'. The engine wrote its own paths there (bitmap.json, report.json, README.md)."""
        names = {str(self.model_view): job.model, str(self.out_dir): ".", str(self.s.work_dir / self.job_id): "."}
        if job.model_path:
            names[job.model_path] = job.model
        pairs = sorted(names.items(), key=lambda kv: -len(kv[0]))
        for p in self.out_dir.rglob("*"):
            if p.suffix not in (".json", ".md", ".txt", ".yaml", ".yml") or p.is_symlink() or not p.is_file() \
                    or p.stat().st_size > 64 << 20:
                continue
            text = original = p.read_text(errors="surrogateescape")
            for old, new in pairs:
                if p.suffix == ".json":  # as the JSON text spells them
                    old, new = json.dumps(old)[1:-1], json.dumps(new)[1:-1]
                text = text.replace(old, new)
            if text != original:
                p.write_text(text, errors="surrogateescape")

    def _record_results(self, job: Job, result: RunSummary) -> None:
        """One transaction: allocation rows from the run's bit map and one artifact row per file (replacing any
        from an earlier attempt, so a resumed job never has two artifact sets)."""
        bitmap, report = result.bitmap, result.report
        rows: list[ExpertAllocation] = []
        for layer in bitmap["layers"]:
            for e in layer["experts"]:
                rows.append(ExpertAllocation(job_id=self.job_id, layer=int(layer["layer"]), module=layer["module"],
                                             expert=int(e["expert"]), bits=int(e["bits"]),
                                             sensitivity=e["sensitivity"], frequency=e["frequency"],
                                             params=e["params"]))
        stored = self._upload()
        arts = [Artifact(job_id=self.job_id, kind="file", name=f.name, uri=f.uri, sha256=f.sha256, bytes=f.bytes)
                for f in stored]
        summary = {"avg_bits": result.avg_bits, "expert_bytes": int(bitmap["expert_bytes"]),
                   "total_bytes": result.total_bytes, "selected_sensitivity": result.selected_sensitivity,
                   "perplexity": result.perplexity, "coverage": report["calibration"],
                   "calib_tokens": bitmap["sensitivity"]["calib_tokens"], "eval_suites": result.eval_suites,
                   "files": len(arts)}
        revision = result.resolved_revision or job.resolved_revision
        with self.ctx.factory() as db, db.begin():
            owned = db.execute(update(Job).where(*self._mine()).values(
                resolved_revision=revision, result=summary, timings=self.timings,
                stage="push" if job.push_requested else self.stage, updated_at=utcnow()))
            if owned.rowcount != 1:
                raise CancelledError("claim lost")
            db.execute(delete(ExpertAllocation).where(ExpertAllocation.job_id == self.job_id))
            db.execute(delete(Artifact).where(Artifact.job_id == self.job_id, Artifact.kind == "file"))
            db.add_all(rows)
            db.add_all(arts)
            add_event(db, self.job_id, "log", stage=self.stage,
                      message=f"recorded {len(rows)} expert allocations and {len(arts)} artifact files")
        try:  # objects of earlier attempts (a worker killed mid-upload) were never listed; now they go
            pruned = self.store.prune(self.job_id, stored)
            if pruned:
                log.info("job %s: removed %d stored objects of earlier attempts", self.job_id, pruned)
        except Exception as exc:  # noqa: BLE001 - leftovers are invisible and go with the job
            log.warning("job %s: could not prune earlier attempts' objects (%s)", self.job_id, type(exc).__name__)

    def _upload(self) -> list[StoredFile]:
        """Every output file into the store (S3: uploaded, multipart when large, SHA-256 in its metadata) before
        any artifact row exists: a job killed here leaves nothing a client can list or download, and its retry
        uploads again under its own attempt's prefix."""
        if self.store.kind == "local":
            return self.store.publish(self.job_id, self.attempt, self.out_dir)
        self._close_stage()
        self.stage, self.stage_started = "upload", time.monotonic()
        self._update({"kind": "stage", "stage": "upload", "progress": 0.95,
                      "message": f"uploading the artifact files to the {self.store.kind} store"},
                     stage="upload", progress=0.95)
        self._raise_if_stopping()

        def after(name: str, done: int, total: int) -> None:
            self._update({"kind": "progress", "stage": "upload", "progress": 0.95 + 0.02 * done / max(total, 1),
                          "message": f"uploaded {done}/{total} files ({name})"},
                         progress=0.95 + 0.02 * done / max(total, 1))
            if done == 1:
                self._debug_delay("upload")  # fault injection: pause with one file stored and the rest not
            self._raise_if_stopping()

        stored = self.store.publish(self.job_id, self.attempt, self.out_dir, on_file=after)
        self._close_stage()
        return stored

    def _push(self, job: Job) -> None:
        with self.ctx.factory() as db:
            done = db.scalar(select(Artifact).where(Artifact.job_id == self.job_id, Artifact.kind == "hub"))
        if done is not None:
            log.info("job %s: already pushed to %s", self.job_id, done.hub_repo)
            return
        self._close_stage()
        self.stage, self.stage_started = "push", time.monotonic()
        self._update({"kind": "stage", "stage": "push", "progress": 0.97, "message": "pushing to the Hub"},
                     stage="push", progress=0.97)
        self._debug_delay("push")
        self._raise_if_stopping()
        if not self.token:
            raise UserInputError("push needs the job's hf_token, which is no longer available")
        from huggingface_hub.errors import HfHubHTTPError

        from worker.push import push_folder

        avg = (json.loads((self.out_dir / "bitmap.json").read_text()).get("avg_bits")
               if (self.out_dir / "bitmap.json").is_file() else job.settings["budget"]["avg_bits"])
        try:
            res = push_folder(self.out_dir, model=job.model, avg_bits=avg, token=self.token,
                              repo_id=job.push_repo_id, private=job.push_private)
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                raise UserInputError(redact(f"the Hub refused the push (HTTP {status}): {exc}")) from None
            raise ConnectionError(redact(f"Hub push failed (HTTP {status})")) from None
        with self.ctx.factory() as db, db.begin():
            db.add(Artifact(job_id=self.job_id, kind="hub", name=res.repo_id, uri=res.url, hub_repo=res.repo_id,
                            hub_commit=res.commit))
            add_event(db, self.job_id, "log", stage="push", message=f"pushed to {res.repo_id} ({res.commit})")


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
                log.info("GPU memory after the job: %.1f MiB allocated, %.1f MiB reserved",
                         torch.cuda.memory_allocated() / 2**20, torch.cuda.memory_reserved() / 2**20)
        except Exception as exc:  # noqa: BLE001
            log.debug("could not empty the CUDA cache: %s", exc)


def run_job(ctx: WorkerContext, job_id: str) -> str:
    return JobRun(ctx, job_id).run()
