"""One exception type for every error a route answers with, and the mapping from core errors to it."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from app.services.tenant_files import PathRefused
from mopeq_core.errors import (
    InfeasibleBudgetError,
    ModelNotFoundError,
    NotMoEError,
    RemoteCodeRequiredError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
    UserInputError,
)


class ServiceError(Exception):
    """An error answered as ``{"detail": ..., "code": ..., **extra}`` with ``status`` (``response()``)."""

    def __init__(self, status: int, code: str, detail: str, *, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = headers or {}
        self.extra = extra or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.detail, self.headers, **self.extra)


def error_response(status: int, code: str, detail: Any, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    """Every error the API answers has this body."""
    return JSONResponse({"detail": detail, "code": code, **extra}, status_code=status, headers=headers)


def database_unavailable() -> ServiceError:
    return ServiceError(503, "database_unavailable", "the database is unavailable; retry later",
                        headers={"Retry-After": "5"})


_CODES: list[tuple[type[Exception], str]] = [
    (PathRefused, "path_not_allowed"),
    (InfeasibleBudgetError, "infeasible_budget"),
    (ModelNotFoundError, "model_not_found"),
    (NotMoEError, "not_moe"),
    (RemoteCodeRequiredError, "remote_code"),
    (UnsafeCheckpointError, "pickle_only"),
    (UnsupportedArchitectureError, "unsupported_architecture"),
]


def error_code(exc: BaseException) -> str:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return "invalid_input"


def from_user_error(exc: UserInputError) -> ServiceError:
    extra: dict[str, Any] = {}
    if isinstance(exc, InfeasibleBudgetError) and exc.feasible is not None:
        extra["feasible"] = {"unit": exc.unit, "min": exc.feasible[0], "max": exc.feasible[1]}
    return ServiceError(422, error_code(exc), str(exc), extra=extra)


def not_found(what: str = "job") -> ServiceError:
    return ServiceError(404, "not_found", f"no such {what}")
