"""A job row as the API shows it (``GET /v1/jobs/{id}``). Its own module: the job service and the webhook
messages both render jobs, and the job service prepares webhooks, so neither may import the other for this."""

from __future__ import annotations

from app.db.models import Job
from app.schemas.jobs import BudgetOut, CalibrationIn, EvaluationIn, JobOut, PushOut
from app.services.job_settings import check

# Every column job_out reads: the job read path (app.services.job_reads) loads only these.
VIEW_COLUMNS = ("id", "status", "stage", "progress", "model", "revision", "resolved_revision", "retry_of", "settings",
                "push_repo_id", "push_private", "push_requested", "cancel_requested", "attempts", "queue",
                "est_memory_bytes", "error", "error_code", "timings", "result", "created_at", "started_at",
                "finished_at")


def job_out(job: Job) -> JobOut:
    s = check(job.settings)
    evaluation = None
    if s["eval_file"] or s["eval_suites"]:
        evaluation = EvaluationIn(file=s["eval_file"], samples=s["eval_samples"], suites=list(s["eval_suites"]),
                                  suite_limit=s["eval_suite_limit"])
    return JobOut(
        id=job.id, status=job.status, stage=job.stage, progress=job.progress, model=job.model,
        revision=job.revision, resolved_revision=job.resolved_revision, retry_of=job.retry_of,
        settings=job.settings, budget=BudgetOut(**s["budget"]), bits=list(s["bits"]),
        sensitivity=s["sensitivity"], allocator=s["allocator"], scope=s["scope"], granularity=s["granularity"],
        quantizer=s["quantizer"], group_size=s["group_size"], symmetric=s["symmetric"], probes=s["probes"],
        probe_tol=s.get("probe_tol"), cost=s.get("cost"), sequential=s.get("sequential"),
        calibration=CalibrationIn(file=s["calib_file"], samples=s["calib_samples"], seq_len=s["seq_len"],
                                  all_experts=bool(s.get("calib_all_experts", False))),
        evaluation=evaluation, format=s["format"], trust_remote_code=s["trust_remote_code"],
        push=PushOut(repo_id=job.push_repo_id, private=job.push_private) if job.push_requested else None,
        cancel_requested=job.cancel_requested, attempts=job.attempts, queue=job.queue,
        est_memory_bytes=job.est_memory_bytes, error=job.error, error_code=job.error_code,
        timings=dict(job.timings or {}), result=job.result, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at)
