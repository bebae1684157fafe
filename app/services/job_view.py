"""A job row as the API shows it (``GET /v1/jobs/{id}``). Its own module: the job service and the webhook
messages both render jobs, and the job service prepares webhooks, so neither may import the other for this."""

from __future__ import annotations

from app.db.models import Job
from app.schemas.jobs import BudgetOut, CalibrationIn, EvaluationIn, JobOut, PushOut


def job_out(job: Job) -> JobOut:
    opts = job.options or {}
    return JobOut(
        id=job.id, status=job.status, stage=job.stage, progress=job.progress, model=job.model,
        revision=job.revision, resolved_revision=job.resolved_revision,
        budget=BudgetOut(avg_bits=job.budget_avg_bits, gb=job.budget_gb), bits=list(job.bits),
        sensitivity=job.sensitivity, allocator=job.allocator, scope=job.scope, granularity=job.granularity,
        quantizer=job.quantizer, group_size=job.group_size, symmetric=job.symmetric, probes=job.probes,
        probe_tol=opts.get("probe_tol"), cost=opts.get("cost"), sequential=opts.get("sequential"),
        calibration=CalibrationIn(file=job.calib_file, samples=job.calib_samples, seq_len=job.seq_len,
                                  all_experts=bool(opts.get("calib_all_experts", False))),
        evaluation=EvaluationIn(file=job.eval_file, samples=job.eval_samples,
                                suites=list((job.options or {}).get("eval_suites") or []),
                                suite_limit=(job.options or {}).get("eval_suite_limit"))
        if job.eval_file or (job.options or {}).get("eval_suites") else None,
        format=job.format, trust_remote_code=job.trust_remote_code,
        push=PushOut(repo_id=job.push_repo_id, private=job.push_private) if job.push_requested else None,
        cancel_requested=job.cancel_requested, attempts=job.attempts, queue=job.queue,
        est_memory_bytes=job.est_memory_bytes, error=job.error, error_code=job.error_code,
        timings=dict(job.timings or {}), result=job.result, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at)
