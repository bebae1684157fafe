from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorOut(BaseModel):
    """Every error the API returns has this shape; ``detail`` says what went wrong and what to change."""

    detail: str | list[Any] = Field(description="What went wrong and what to do about it")
    code: str = Field(description="Machine-readable error code, e.g. not_moe, infeasible_budget, rate_limited")
    feasible: dict[str, Any] | None = Field(None, description="For infeasible_budget: the feasible budget range")


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "Malformed request (body is not valid JSON)",
        401: "Missing or invalid API key",
        403: "The API key lacks the scope this route needs",
        404: "No such job (or it belongs to another key)",
        409: "The job is not in a state that allows this",
        413: "Request body too large",
        422: "Invalid input; the message says what to change",
        429: "Rate or concurrency limit reached; retry after the Retry-After header's seconds",
        503: "A dependency (database, broker or the Hub) is unreachable; retry later",
    }
    return {c: {"model": ErrorOut, "description": text.get(c, "Error")} for c in codes}
