"""/healthz (process up), /readyz (database and broker reachable), /metrics (Prometheus)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.services.storage import get_store

log = logging.getLogger("mopeq.api")
router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def check_broker(request: Request) -> None:
    settings = request.app.state.settings
    if settings.broker_is_filesystem:
        q = settings.broker_dir / "queue"
        if not q.is_dir():
            raise RuntimeError(f"broker folder {q} is missing")
        return
    conn = request.app.state.celery.connection_for_write()
    try:
        conn.ensure_connection(max_retries=1, timeout=2)
    finally:
        conn.release()


@router.get("/readyz", summary="Readiness: database, broker (and an S3 artifact store) reachable",
            responses={503: {"description": "The database, the broker or the S3 store is unreachable"}})
def readyz(request: Request) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        with request.app.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        check_broker(request)
        checks["broker"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["broker"] = f"error: {type(exc).__name__}"
    settings = request.app.state.settings
    if settings.artifact_store_is_s3:  # the local store is checked by the disk checks of the workers
        try:
            get_store(settings).check()
            checks["store"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["store"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(generate_latest(request.app.state.metrics.registry).decode(),
                             media_type=CONTENT_TYPE_LATEST)
