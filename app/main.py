"""The FastAPI application (``create_app``). Never imports torch."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.job_read_lane import JobReadLane
from app.api.routes import admin, estimate, health, hooks, jobs, watches
from app.core.bodylimit import BodyLimitMiddleware
from app.core.celery_conf import make_celery
from app.core.config import Settings, get_settings
from app.core.metrics import Metrics, RequestCounter
from app.core.security import Keyring, redact
from app.db.session import make_engine, make_sessionmaker
from app.schemas.common import document_errors
from app.schemas.jobs import state_server_bounds
from app.services.errors import ServiceError, database_unavailable, error_response
from app.services.job_reads import job_reader
from app.services.keys import PrincipalCache
from app.services.ratelimit import RateLimiter
from app.services.streams import StreamSlots

log = logging.getLogger("mopeq.api")

DESCRIPTION = """Quantization-as-a-service for Mixture-of-Experts models (MoPEQ: per-expert mixed precision).

Authenticate with `Authorization: Bearer <api key>`. Every error is `{"detail": ..., "code": ...}`."""


# FastAPI's own OpenTelemetry hooks look up the global providers on every request; this service exports Prometheus
# metrics (/metrics) and no traces, so they stay off (bench/bench_api.py's constant app runs with the same setting).
TELEMETRY_OFF = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}


def _clean_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Never echo inputs back: a rejected field may hold a token.
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e["loc"] if x != "body") or "body"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def _client_went_away(exc: BaseException) -> bool:
    import anyio

    gone = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)
    if isinstance(exc, BaseExceptionGroup):
        return all(_client_went_away(e) for e in exc.exceptions)
    return isinstance(exc, gone)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.ensure_dirs()
    app = FastAPI(title="MoPEQ service", version="0.1.0", description=DESCRIPTION, telemetry=TELEMETRY_OFF)
    app.add_middleware(JobReadLane, route=jobs.read_route())  # GET /v1/jobs/{id} without routing (inside the limits: 431s still apply)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.MAX_BODY_BYTES)  # JSON 413s, chunked bodies too
    app.state.settings = settings
    app.state.engine = make_engine(settings.database_url)
    app.state.sessionmaker = make_sessionmaker(app.state.engine)
    app.state.job_reader = job_reader(app.state.engine)
    app.state.keyring = Keyring(settings.secret_key())
    app.state.celery = make_celery(settings, main="mopeq-api")
    app.state.principals = PrincipalCache(settings.AUTH_CACHE_TTL_S)
    app.state.ratelimiter = RateLimiter(settings.redis_url, settings.REDIS_KEY_PREFIX)
    app.state.streams = StreamSlots(settings.redis_url, settings.REDIS_KEY_PREFIX)
    app.state.metrics = Metrics(app.state)
    app.add_middleware(RequestCounter, counter=app.state.metrics.requests)  # outermost of ours: counts 413s too

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _clean_errors(list(exc.errors()))
        if any(e["type"] in ("json_invalid", "json_type") for e in errors):
            return error_response(400, "malformed_json", "the request body is not valid JSON: "
                          + _validation_message(errors), errors=errors)
        return error_response(422, "invalid_request", _validation_message(errors), errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "malformed_json", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    async def _db_down(request: Request, exc: OperationalError) -> JSONResponse:
        log.error("database error on %s: %s", request.url.path, redact(str(exc.orig))[:500])
        return database_unavailable().response()

    @app.exception_handler(DataError)
    async def _bad_data(request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value taken from the request (PostgreSQL: a NUL character in a path, query or body
        # string, a string longer than its column): bad input, not a server fault. The value is not echoed.
        log.info("database refused a request value on %s: %s", request.url.path, type(exc.orig).__name__)
        return error_response(422, "invalid_request", "a value in the request cannot be stored or searched (NUL "
                              "characters are not allowed in text)")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        if _client_went_away(exc):  # an SSE client disconnected mid-stream: nothing to answer, nothing wrong
            log.debug("client disconnected from %s", request.url.path)
            return error_response(499, "client_closed", "client closed the connection")
        log.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, redact(str(exc))[:500])
        return error_response(500, "internal", "internal server error")

    app.include_router(health.router)
    app.include_router(jobs.router, prefix="/v1")
    app.include_router(estimate.router, prefix="/v1")
    app.include_router(admin.router, prefix="/v1")
    app.include_router(watches.router, prefix="/v1")
    app.include_router(hooks.router, prefix="/v1")
    document_errors(app)
    state_server_bounds(app, settings)  # MOPEQ_MAX_* as the job body's maxima
    return app
