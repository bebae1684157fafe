"""Prometheus metrics of the API process: jobs by status, stage durations (from the database, so they cover every
worker), queue depth (from the broker) and HTTP requests."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db.models import JOB_STATUSES, Job
from app.services.queues import queue_names

log = logging.getLogger("mopeq.api")


class _DbCollector(Collector):
    def __init__(self, app_state: Any):
        self.state = app_state

    def collect(self) -> Iterator[Any]:
        jobs = GaugeMetricFamily("mopeq_jobs", "Jobs by status", labels=["status"])
        stages = SummaryMetricFamily("mopeq_stage_duration_seconds", "Duration of finished stages (last 1000 jobs)",
                                     labels=["stage"])
        depth = GaugeMetricFamily("mopeq_queue_depth", "Messages waiting in the broker queue (one series per "
                                  "queue of MOPEQ_QUEUES): what autoscalers of each worker class act on",
                                  labels=["queue"])
        per_queue = GaugeMetricFamily("mopeq_queue_jobs", "Queued and running jobs per queue (from the database)",
                                      labels=["queue", "status"])
        settings = self.state.settings
        names = queue_names(settings)
        try:
            with self.state.sessionmaker() as db:
                counts = dict(db.execute(select(Job.status, func.count()).group_by(Job.status)).all())
                active = db.execute(select(Job.queue, Job.status, func.count())
                                    .where(Job.status.in_(("queued", "running"))).group_by(Job.queue, Job.status)).all()
                timings = db.scalars(select(Job.timings).where(Job.finished_at.is_not(None))
                                     .order_by(Job.finished_at.desc()).limit(1000)).all()
            for s in JOB_STATUSES:
                jobs.add_metric([s], float(counts.get(s, 0)))
            agg: dict[str, list[float]] = {}
            for t in timings:
                for stage, secs in (t or {}).items():
                    if isinstance(secs, (int, float)):
                        a = agg.setdefault(stage, [0, 0.0])
                        a[0] += 1
                        a[1] += float(secs)
            for stage, (n, total) in sorted(agg.items()):
                stages.add_metric([stage], count_value=n, sum_value=total)
            by_queue = {(q or settings.QUEUE, s): float(n) for q, s, n in active}
            for q in sorted(set(names) | {q for q, _ in by_queue}):
                for s in ("queued", "running"):
                    per_queue.add_metric([q, s], by_queue.get((q, s), 0.0))
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the database hiccups
            log.warning("metrics: database unavailable (%s)", type(exc).__name__)
        for name in names:
            try:
                depth.add_metric([name], float(queue_depth(self.state, name)))
            except Exception as exc:  # noqa: BLE001
                log.debug("metrics: broker unavailable (%s)", type(exc).__name__)
                break
        yield jobs
        yield stages
        yield depth
        yield per_queue


def queue_depth(state: Any, queue: str | None = None) -> int:
    settings = state.settings
    queue = queue or settings.QUEUE
    if settings.broker_is_filesystem:
        suffix = f".{queue}.msg"
        return sum(1 for p in (settings.broker_dir / "queue").iterdir() if p.name.endswith(suffix))
    with state.celery.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
        with conn.channel() as ch:
            try:
                return ch.queue_declare(queue=queue, passive=True).message_count
            except Exception as exc:
                if "NOT_FOUND" in str(exc) or "no queue" in str(exc).lower():
                    return 0
                raise


class Metrics:
    def __init__(self, app_state: Any):
        self.registry = CollectorRegistry()
        self.registry.register(_DbCollector(app_state))
        self.requests = Counter("mopeq_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)


class RequestCounter:
    """Counts responses by method, route template and status as a pure ASGI middleware: it only watches the
    response's start message, so the body passes through untouched (no BaseHTTPMiddleware task and stream per
    request). An exception that escapes the app is counted as a 500."""

    def __init__(self, app: ASGIApp, counter: Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")
            self.counter.labels(scope["method"], getattr(route, "path", "unmatched"), str(status)).inc()
