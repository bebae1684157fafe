"""Business logic of jobs: validate, create (one transaction, enqueue after commit), read, cancel."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.core.security import Keyring
from app.db.models import TERMINAL, ExpertAllocation, IdempotencyRecord, Job, JobWebhook, utcnow
from app.schemas.estimate import EstimateIn
from app.schemas.jobs import JobCreate
from app.services import job_settings, job_state, limits, queues, quota, refusals, tenant_files
from app.services import models as model_svc
from app.services.errors import ServiceError, from_user_error, not_found
from app.services.events import add_event
from app.services.job_view import job_out
from mopeq_core.config import Budget, QuantizeConfig
from mopeq_core.errors import UserInputError
from mopeq_core.formats import calib_rows_per_batch

log = logging.getLogger("mopeq.api")


@dataclass
class Principal:
    key_id: str
    scope: str
    name: str
    rate_limit_per_minute: int
    max_concurrent_jobs: int

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"


def request_hash(body: JobCreate) -> str:
    exclude: dict[str, Any] = {"hf_token": True, "webhook": {"secret"}}  # secrets never enter the hash
    canonical = json.dumps(body.model_dump(mode="json", exclude=exclude), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def quantize_config(body: JobCreate) -> QuantizeConfig:
    """The core's config for this body (paths as given); raises a 422 for out-of-range knobs."""
    try:
        cfg = QuantizeConfig(
            model=body.model, revision=body.revision,
            budget=Budget(avg_bits=body.budget.avg_bits, gb=body.budget.gb), bits=tuple(body.bits),
            sensitivity=body.sensitivity, allocator=body.allocator, scope=body.scope, granularity=body.granularity,
            quantizer=body.quantizer, cost=body.cost, sequential=body.sequential, group_size=body.group_size,
            symmetric=body.symmetric,
            act_order=body.act_order, probes=body.probes, probe_tol=body.probe_tol, calib_file=body.calibration.file,
            calib_samples=body.calibration.samples, seq_len=body.calibration.seq_len,
            calib_all_experts=body.calibration.all_experts,
            eval_file=body.evaluation.file if body.evaluation else None,
            eval_samples=body.evaluation.samples if body.evaluation else 64,
            eval_suites=tuple(body.evaluation.suites) if body.evaluation else (),
            eval_suite_limit=body.evaluation.suite_limit if body.evaluation else None, format=body.format,
            low_memory=body.low_memory, seed=body.seed, trust_remote_code=body.trust_remote_code)
        cfg.validate()
    except UserInputError as exc:
        raise from_user_error(exc) from exc
    except ValueError as exc:
        raise ServiceError(422, "invalid_input", str(exc)) from exc
    return cfg


def _data_file(value: str | None, settings: Settings, what: str) -> str | None:
    if value is None:
        return None
    path = model_svc.resolve_local_path(value, settings, what=what)
    if path is None or not path.is_file():
        raise ServiceError(422, "invalid_input",
                           f"{what} '{value}' must be a .txt or .jsonl file under the server's model roots "
                           "(MOPEQ_MODEL_ROOTS)")
    if path.suffix not in (".txt", ".jsonl"):
        raise ServiceError(422, "invalid_input", f"{what} '{value}' must end in .txt or .jsonl")
    try:
        tenant_files.check_file(path, settings.model_roots, where=what)  # the worker checks again
    except UserInputError as exc:
        raise from_user_error(exc) from exc
    return str(path)


def calibration_plan(body: JobCreate | EstimateIn, config: dict[str, Any], layers: list[Any],
                     settings: Settings) -> limits.CalibrationPlan:
    """The job's (or estimate request's) calibration sizes, checked against the model and the server's bounds."""
    calib = body.calibration
    ev = getattr(body, "evaluation", None)
    return limits.plan_calibration(
        settings, config, layers, samples=calib.samples,
        seq_len=calib.seq_len if "seq_len" in calib.model_fields_set else None,
        eval_samples=ev.samples if ev is not None and (ev.file or ev.suites) else None,
        probes=getattr(body, "probes", 1), quantizer=getattr(body, "quantizer", "gptq"))


@dataclass
class Created:
    status_code: int
    body: dict[str, Any]
    job_id: str
    replayed: bool
    enqueue: bool
    queue: str | None = None


def _replay(rec: IdempotencyRecord, rhash: str) -> Created:
    if rec.request_hash != rhash:
        raise ServiceError(422, "idempotency_mismatch",
                           "this Idempotency-Key was used with a different request body; use a new key for a new "
                           "job, or resend the first body to get the first answer")
    return Created(rec.response_status, rec.response_body, rec.job_id, replayed=True, enqueue=False)


def create_job(factory: sessionmaker[Session], settings: Settings, keyring: Keyring, who: Principal,
               body: JobCreate, idem_key: str | None,
               on_insert: Callable[[Session, Job], None] | None = None) -> Created:
    """``on_insert(db, job)`` adds rows in the job's own transaction (a watch's trigger row: its unique constraint
    then rolls the job back too, and the IntegrityError propagates when there is no idempotency key)."""
    rhash = request_hash(body)
    if idem_key is not None:
        if not (1 <= len(idem_key) <= 200) or not idem_key.isprintable():
            raise ServiceError(422, "invalid_input", "Idempotency-Key must be 1..200 printable characters")
        with factory() as db:
            rec = db.get(IdempotencyRecord, (who.key_id, idem_key))
            if rec is not None:
                return _replay(rec, rhash)

    with factory() as db:  # early, unlocked refusal; admit() below decides under the key's lock
        limits.check_active_jobs(db, who.key_id, who.max_concurrent_jobs)

    # Everything is checked before anything is written.
    cfg = quantize_config(body)
    # what the engine would refuse once running, refused now; the auto-samples bound at its lowest (image+text data,
    # one example a batch) until the model and the data are known below
    refusals.check_job(cfg, rows_per_batch=1)
    ref = model_svc.resolve_model(body.model, settings)
    calib = _data_file(body.calibration.file, settings, "calibration file")
    eval_file = _data_file(body.evaluation.file if body.evaluation else None, settings, "evaluation file")
    token = body.hf_token.get_secret_value() if body.hf_token else None
    if body.push is not None and not token:
        raise ServiceError(422, "invalid_input", "push needs an hf_token with write access to the target namespace")
    hook = None
    if body.webhook is not None:
        from app.services.webhooks import prepare

        hook = prepare(body.webhook, settings, keyring)
    ck = model_svc.inspect(ref, settings, revision=body.revision, token=token,
                           trust_remote_code=body.trust_remote_code)
    image_processor = bool({"processor_config.json", "preprocessor_config.json"} & set(ck.files))
    refusals.check_job(cfg, calib_rows_per_batch(calib, image_processor))  # the engine's model-aware bound
    est = model_svc.estimate(ck, bits=list(cfg.bits), group_size=cfg.group_size, symmetric=cfg.symmetric)
    try:
        est.check_budget(avg_bits=body.budget.avg_bits, gb=body.budget.gb)
    except UserInputError as exc:
        raise from_user_error(exc) from exc
    plan = calibration_plan(body, ck.config, est.layers, settings)
    limits.check_output_size(settings, est.max_bytes)
    need = queues.memory_needed(est, plan)
    queue = queues.pick(settings, need)

    doc = job_settings.document(dataclasses.replace(cfg, calib_file=calib, eval_file=eval_file, seq_len=plan.seq_len))
    job = Job(
        owner_key_id=who.key_id, model=body.model, model_source=ref.source,
        model_path=str(ref.path) if ref.path else None, revision=body.revision,
        resolved_revision=ck.revision if ref.source == "hub" else None, settings=doc,
        push_requested=body.push is not None, push_repo_id=body.push.repo_id if body.push else None,
        push_private=body.push.private if body.push else False,
        hf_token_enc=keyring.encrypt(token) if token else None,
        est_download_bytes=est.stored_bytes if ref.source == "hub" else 0, est_output_bytes=est.max_bytes,
        est_memory_bytes=need, queue=queue, timings={})
    try:
        with factory() as db, db.begin():
            limits.admit(db, who.key_id, who.max_concurrent_jobs)  # first: it takes the key's lock
            quota.check_storage(db, who.key_id, est.max_bytes)  # under the key's lock: no overshoot
            job_state.new_job(db, job)
            if hook is not None:
                db.add(JobWebhook(job_id=job.id, url=hook.url, secret_enc=hook.secret_enc))
            if on_insert is not None:
                on_insert(db, job)
            out = job_out(job).model_dump(mode="json")
            if idem_key is not None:
                db.add(IdempotencyRecord(api_key_id=who.key_id, key=idem_key, request_hash=rhash, job_id=job.id,
                                         response_status=202, response_body=out))
    except IntegrityError:
        if idem_key is None:
            raise
        with factory() as db:  # a concurrent request with the same key won the race
            rec = db.get(IdempotencyRecord, (who.key_id, idem_key))
            if rec is None:
                raise
            return _replay(rec, rhash)
    return Created(202, out, job.id, replayed=False, enqueue=True, queue=queue)


RETRYABLE = ("failed", "cancelled")


def retry_job(factory: sessionmaker[Session], keyring: Keyring, who: Principal, job_id: str,
              token: str | None) -> Created:
    """A failed or cancelled job again, as a new queued job with the same model (pinned to the same commit) and
    settings document, linked by ``retry_of``; the worker reuses its finished stages where it still has them."""
    with factory() as db:
        old = get_owned(db, who, job_id)
        if old.owner_key_id != who.key_id:
            raise not_found()  # a job is retried by its owner only, admins included
        if old.status not in RETRYABLE:
            raise ServiceError(409, "not_retryable", f"job {old.id} is {old.status}; only a failed or cancelled job "
                                                     "can be retried")
        db.expunge(old)
    if old.push_requested and not token:
        raise ServiceError(422, "invalid_input", f"job {old.id} pushes to the Hub: send an hf_token for the retry "
                                                 "(the old job's token was deleted when it ended)")
    job = Job(owner_key_id=who.key_id, model=old.model, model_source=old.model_source, model_path=old.model_path,
              revision=old.revision, resolved_revision=old.resolved_revision, settings=dict(old.settings),
              retry_of=old.id, push_requested=old.push_requested, push_repo_id=old.push_repo_id,
              push_private=old.push_private, hf_token_enc=keyring.encrypt(token) if token else None,
              est_download_bytes=old.est_download_bytes, est_output_bytes=old.est_output_bytes,
              est_memory_bytes=old.est_memory_bytes, queue=old.queue, timings={})
    with factory() as db, db.begin():
        limits.admit(db, who.key_id, who.max_concurrent_jobs)  # first: it takes the key's lock
        quota.check_storage(db, who.key_id, job.est_output_bytes or 0)
        job_state.new_job(db, job, message=f"job queued (retry of {old.id})")
        out = job_out(job).model_dump(mode="json")
    log.info("job %s retries job %s", job.id, old.id)
    return Created(202, out, job.id, replayed=False, enqueue=True, queue=job.queue)


def queue_of(factory: sessionmaker[Session], job_id: str) -> str | None:
    """The queue the job was routed to at submit (None: the deployment's default)."""
    with factory() as db:
        return db.scalar(select(Job.queue).where(Job.id == job_id))


def get_owned(db: Session, who: Principal, job_id: str) -> Job:
    job = db.get(Job, job_id) if len(job_id) <= 64 else None
    if job is None or (job.owner_key_id != who.key_id and not who.is_admin):
        raise not_found()
    return job


def list_jobs(db: Session, who: Principal, *, status: str | None, model: str | None, limit: int,
              offset: int) -> tuple[list[Job], int]:
    q = select(Job)
    if not who.is_admin:
        q = q.where(Job.owner_key_id == who.key_id)
    if status:
        q = q.where(Job.status == status)
    if model:
        q = q.where(Job.model == model)
    total = db.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = list(db.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit).offset(offset)))
    return rows, total


def cancel_job(factory: sessionmaker[Session], who: Principal, job_id: str) -> Job:
    with factory() as db, db.begin():
        job = get_owned(db, who, job_id)
        if job.status in TERMINAL:
            raise ServiceError(409, "not_cancellable", f"job {job.id} already {job.status}")
        if not job_state.transition(db, job.id, "cancelled", expect="queued", message="cancelled before it started",
                                    cancel_requested=True, error="cancelled by the user before it started",
                                    error_code="cancelled"):
            db.execute(update(Job).where(Job.id == job.id, Job.status == "running").values(
                cancel_requested=True, updated_at=utcnow()))
            add_event(db, job.id, "log", message="cancel requested; the worker stops at its next check")
    with factory() as db:
        return get_owned(db, who, job_id)


def delete_job(factory: sessionmaker[Session], settings: Settings, who: Principal, job_id: str) -> None:
    """Delete a finished job: its stored files (objects first), then its row (events, allocations, artifacts,
    webhooks and idempotency records cascade)."""
    with factory() as db:
        job = get_owned(db, who, job_id)
        if job.status not in TERMINAL:
            raise ServiceError(409, "not_deletable", f"job {job.id} is {job.status}; cancel it and delete it once "
                                                     "it has stopped")
    purge(factory, settings, job_id)


def purge(factory: sessionmaker[Session], settings: Settings, job_id: str) -> int:
    """Remove a finished job for good: its stored objects or files first (a failure leaves the row, so the delete
    can be repeated), then its row. Returns how many stored files went."""
    from app.services.storage import get_store

    n = get_store(settings).delete_job(job_id)
    with factory() as db, db.begin():
        db.execute(delete(Job).where(Job.id == job_id, Job.status.in_(TERMINAL)))
    log.info("job %s deleted with %d stored files", job_id, n)
    return n


def expire_finished(factory: sessionmaker[Session], settings: Settings, now: dt.datetime | None = None,
                    limit: int = 100) -> int:
    """Retention (MOPEQ_RETENTION_DAYS > 0): purge up to ``limit`` jobs that finished longer ago, with their stored
    files. Run by every worker's sweep; two sweeps purging the same job is harmless."""
    if settings.RETENTION_DAYS <= 0:
        return 0
    cutoff = (now or utcnow()) - dt.timedelta(days=settings.RETENTION_DAYS)
    with factory() as db:
        ids = list(db.scalars(select(Job.id).where(Job.status.in_(TERMINAL), Job.finished_at < cutoff)
                              .order_by(Job.finished_at).limit(limit)))
    for job_id in ids:
        purge(factory, settings, job_id)
    return len(ids)


def allocations(db: Session, job_id: str) -> list[ExpertAllocation]:
    return list(db.scalars(select(ExpertAllocation).where(ExpertAllocation.job_id == job_id)
                           .order_by(ExpertAllocation.layer, ExpertAllocation.expert)))
